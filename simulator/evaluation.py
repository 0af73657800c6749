"""Evaluating the global model: on every task's test set, and on each client's own data mix.

The :class:`HeadEvaluation` and :class:`FederatedEvaluation` hooks call these at
evaluation points with the server's model holding the global weights. A client's accuracy is measured on a test sample drawn
like its current training data (its task, its label mix), so the spread across
clients shows who the global model serves badly.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

import numpy as np
import torch
from flwr.app import ConfigRecord

from clients.base import masked
from clients.models import evaluate
from simulator.hooks import Hook, RoundView, RunSetup, evaluation_due, metric_value
from simulator.metrics import accuracy_spread
from simulator.protocol import ACCURACY
from simulator.seeding import Draw, Purpose, derive_seed, rng, seeded_global_state
from simulator.streams import Stream


def task_accuracies(model: torch.nn.Module, stream: Stream, batch_size: int) -> list[float]:
    """Accuracy on each task's test set, seen or not (unseen ones feed forward transfer)."""
    accuracies = []
    for task in range(stream.num_tasks):
        idx = stream.task_test_indices(task)
        x, y = torch.from_numpy(stream.x_test[idx]), torch.from_numpy(stream.y_test[idx])
        accuracies.append(evaluate(model, x, y, batch_size, _tensor(stream.task_mask(task)))[1])
    return accuracies


def accuracy_record(prefix: str, accuracies: list[float], stream: Stream, seen_tasks: np.ndarray) -> dict[str, Any]:
    """``accuracies`` (one per task) as metrics.jsonl keys: per seen task, on the seen tasks, on all tasks."""
    return {
        f"{prefix}_per_task": [a if s else None for a, s in zip(accuracies, seen_tasks)],
        f"{prefix}_seen": seen_accuracy(stream, seen_tasks, accuracies),
        f"{prefix}_all_tasks": accuracies,
    }


def seen_accuracy(stream: Stream, seen_tasks: np.ndarray, accuracies: list[float]) -> float:
    """Accuracy on the union of the seen tasks' test sets (each task weighted by its size)."""
    seen = np.flatnonzero(seen_tasks)
    sizes = np.array([len(stream.task_test_indices(t)) for t in seen], dtype=float)
    return float(np.dot(np.array(accuracies)[seen], sizes) / sizes.sum())


@torch.no_grad()
def client_accuracies(
    model: torch.nn.Module,
    stream: Stream,
    server_round: int,
    seed: int,
    max_clients: int,
    test_size: int,
    batch_size: int,
    personalize: Callable[[int], None] | None = None,
) -> np.ndarray:
    """Accuracy of each of up to ``max_clients`` present clients (a seeded sample) on its own mix.

    With ``personalize``, each client is scored with its own model: ``personalize(client)``
    puts the client's personal head into ``model``, which the shared features then go through.
    """
    clients = np.array(stream.available_clients(server_round))
    if len(clients) > max_clients:
        clients = np.sort(rng(seed, Purpose.CLIENT_EVAL, server_round).choice(clients, max_clients, replace=False))
    samples = [stream.client_test_indices(server_round, int(c), test_size) for c in clients]
    unique, position = np.unique(np.concatenate(samples), return_inverse=True)
    model.eval()
    batches = torch.from_numpy(stream.x_test[unique]).split(batch_size)
    outputs = torch.cat([(model if personalize is None else model.features)(xb) for xb in batches])
    labels = torch.from_numpy(stream.y_test[unique])
    accuracies, start = [], 0
    for client, sample in zip(clients, samples):
        rows = torch.from_numpy(position[start : start + len(sample)])
        start += len(sample)
        if personalize is None:
            logits = outputs[rows]
        else:
            personalize(int(client))
            logits = model.head(outputs[rows])
        predicted = masked(logits, _tensor(stream.class_mask(server_round, int(client)))).argmax(1)
        accuracies.append(int((predicted == labels[rows]).sum()) / len(sample))
    return np.array(accuracies)


class HeadEvaluation(Hook):
    """The global model on every task's test set and on each client's own data mix (and, where the
    client method keeps personal layers, each client's own model: ``client_acc_personal_*``)."""

    def after_round(self, view: RoundView) -> dict[str, Any]:
        setup, config = self.setup, self.setup.config
        if not evaluation_due(config, view):
            return {}
        model = view.global_model()
        scored = (
            setup.stream,
            view.server_round,
            config.seed,
            config.eval.max_clients,
            config.eval.client_test_size,
            config.eval.batch_size,
        )
        measured = {
            **accuracy_record(
                "acc",
                task_accuracies(model, setup.stream, config.eval.batch_size),
                setup.stream,
                setup.stream.seen_tasks(view.server_round),
            ),
            **accuracy_spread(client_accuracies(model, *scored)),
        }
        if setup.method.personal_prefixes:
            measured.update(accuracy_spread(self._personal_accuracies(model, scored), "client_acc_personal"))
        return measured

    def _personal_accuracies(self, model: torch.nn.Module, scored: tuple) -> np.ndarray:
        """Each client's accuracy with its own model: the global encoder under its personal head."""
        method, states = self.setup.method, self.setup.states
        initial = {k: v.clone() for k, v in model.state_dict().items() if k.startswith(method.personal_prefixes)}

        def personalize(client: int) -> None:
            model.load_state_dict(initial, strict=False)
            method.personalize(model, states.get(client))

        try:
            return client_accuracies(model, *scored, personalize=personalize)
        finally:
            model.load_state_dict(initial, strict=False)


class FederatedEvaluation(Hook):
    """The strategy's own client-side evaluation: sampled clients on their local test samples
    (each its own model where the client method keeps personal layers: ``federated_acc_personal``)."""

    def __init__(self, setup: RunSetup) -> None:
        super().__init__(setup)
        self.key = "federated_acc_personal" if setup.method.personal_prefixes else "federated_acc"

    def after_round(self, view: RoundView) -> dict[str, Any]:
        if not evaluation_due(self.setup.config, view):
            return {}
        with (
            self.setup.grid.round(view.server_round),
            seeded_global_state(
                derive_seed(self.setup.config.seed, Purpose.STRATEGY, view.server_round, Draw.EVALUATE_CALL)
            ),
        ):
            messages = view.strategy.configure_evaluate(view.server_round, view.arrays, ConfigRecord(), self.setup.grid)
            aggregated = view.strategy.aggregate_evaluate(view.server_round, self.setup.grid.send_and_receive(messages))
        return {self.key: metric_value(aggregated, ACCURACY)}


def _tensor(mask: np.ndarray | None) -> torch.Tensor | None:
    return None if mask is None else torch.from_numpy(mask)
