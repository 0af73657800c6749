"""Evaluating the global model: on every task's test set, and on each client's own data mix.

The engine calls these at evaluation points with the server's model holding
the global weights. A client's accuracy is measured on a test sample drawn
like its current training data (its task, its label mix), so the spread across
clients shows who the global model serves badly.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

import numpy as np
import torch

from clients.base import masked
from simulator.seeding import Purpose, rng
from simulator.streams import Stream
from simulator.worker import evaluate


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
    model: torch.nn.Module, stream: Stream, server_round: int, seed: int,
    max_clients: int, test_size: int, batch_size: int,
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


def _tensor(mask: np.ndarray | None) -> torch.Tensor | None:
    return None if mask is None else torch.from_numpy(mask)
