"""Representation probes: how well the frozen global encoder's features still separate each task's classes.

Davari et al. 2022 (CVPR), "Probing Representation Forgetting in Supervised and
Unsupervised Continual Learning", show that much of what a continual learner
forgets is in its head, not its representation: a classifier fitted afresh on
the frozen features recovers most of the old tasks. Two such classifiers,
both fitted on the features of the training data of the tasks seen so far (at
most about ``eval.probe_samples`` of it, a seeded sample with every class in it):

- ``ncm``: nearest class mean (Rebuffi et al. 2017, iCaRL): features and class
  means L2-normalised, each sample given the class of the nearest mean;
- ``probe``: a linear probe, multinomial logistic regression with an L2
  penalty on whitened features, fitted to convergence by full-batch
  accelerated gradient steps (deterministic, a few hundred steps).

Each is then scored on every task's test set, its predictions restricted to
the task's labels where the stream restricts the head's (task-incremental).
Any model with a ``features(x)`` method can be probed.
"""

from __future__ import annotations

import logging
import math
import weakref
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any, NamedTuple

import numpy as np
import torch

from simulator import metrics
from simulator.evaluation import accuracy_record
from simulator.hooks import Hook, RoundView
from simulator.seeding import Purpose, rng
from simulator.streams import Stream

PROBES = ("probe", "ncm")  # metrics.jsonl keys <name>_acc_per_task, <name>_acc_seen, <name>_acc_all_tasks
log = logging.getLogger("fedstream")
PENALTY = 1e-3  # the linear probe's L2 penalty on its (whitened) weights
TOLERANCE = 1e-5  # its gradient norm at convergence
MAX_STEPS = 2000


@dataclass(frozen=True)
class FittedProbe:
    """A classifier on features: a score for each of ``classes`` (the labels it was fitted on)."""

    classes: np.ndarray
    scores: Callable[[np.ndarray], np.ndarray]  # (n, features) -> (n, len(classes))

    def predict(self, features: np.ndarray, allowed: np.ndarray | None = None) -> np.ndarray:
        """The label of each row, among ``allowed`` labels (a mask over all labels) if given; -1: none allowed."""
        scores = self.scores(features)
        if allowed is not None:
            scores = np.where(allowed[self.classes], scores, -np.inf)
        predicted = self.classes[scores.argmax(axis=1)]
        return np.where(np.isfinite(scores.max(axis=1)), predicted, -1)


def _unit(features: np.ndarray) -> np.ndarray:
    return features / np.maximum(np.linalg.norm(features, axis=1, keepdims=True), 1e-12)


def fit_ncm(features: np.ndarray, labels: np.ndarray) -> FittedProbe:
    """Nearest class mean on L2-normalised features: the score of a class is the cosine to its mean."""
    classes = np.unique(labels)
    unit = _unit(features.astype(np.float64))
    means = _unit(np.stack([unit[labels == c].mean(axis=0) for c in classes]))
    return FittedProbe(classes, lambda f: _unit(f.astype(np.float64)) @ means.T)


def fit_linear_probe(features: np.ndarray, labels: np.ndarray) -> FittedProbe:
    """Multinomial logistic regression with an L2 penalty, fitted to convergence on whitened features.

    Whitening (centred, decorrelated, unit variance; directions without variance
    dropped) bounds the loss's curvature by 1/2, so Nesterov's accelerated
    gradient with step ``1 / (1/2 + PENALTY)`` converges from zero weights in
    a few hundred full-batch steps, on the driver's CPU, deterministically.
    """
    classes, target = np.unique(labels, return_inverse=True)
    x = torch.from_numpy(features).double()
    mean = x.mean(dim=0)
    variances, directions = torch.linalg.eigh((x - mean).T @ (x - mean) / len(x))
    kept = variances > 1e-8 * variances.max().clamp(min=1e-300)
    whiten = directions[:, kept] / variances[kept].sqrt()

    def inputs(f: np.ndarray) -> torch.Tensor:
        z = (torch.from_numpy(f).double() - mean) @ whiten
        return torch.cat([z, torch.ones(len(z), 1, dtype=z.dtype)], dim=1)  # and a bias

    z = inputs(features)
    onehot = torch.nn.functional.one_hot(torch.from_numpy(target), len(classes)).double()
    step, momentum = _nesterov(curvature=0.5 + PENALTY, convexity=PENALTY)
    weights = lookahead = torch.zeros(z.shape[1], len(classes), dtype=z.dtype)
    for _ in range(MAX_STEPS):
        gradient = z.T @ (torch.softmax(z @ lookahead, dim=1) - onehot) / len(z) + PENALTY * lookahead
        if float(gradient.norm()) < TOLERANCE:
            weights = lookahead
            break
        weights, previous = lookahead - step * gradient, weights
        lookahead = weights + momentum * (weights - previous)
    else:
        log.warning("the linear probe's gradient norm is still %.1e after %d steps", float(gradient.norm()), MAX_STEPS)
    return FittedProbe(classes, lambda f: (inputs(f) @ weights).numpy())


def _nesterov(curvature: float, convexity: float) -> tuple[float, float]:
    """Step size and momentum of Nesterov's method for a ``convexity``-strongly convex, ``curvature``-smooth loss."""
    ratio = math.sqrt(convexity / curvature)
    return 1.0 / curvature, (1.0 - ratio) / (1.0 + ratio)


FIT: dict[str, Callable[[np.ndarray, np.ndarray], FittedProbe]] = {"probe": fit_linear_probe, "ncm": fit_ncm}


def stratified_sample(indices: np.ndarray, labels: np.ndarray, size: int, generator: np.random.Generator) -> np.ndarray:
    """About ``size`` of ``indices``, each label in proportion to its share but never fewer than one; all of
    them where there are no more than ``size``.

    A class left out of the sample could never be predicted, and its task would
    read as forgotten.
    """
    if len(indices) <= size:
        return indices
    classes, counts = np.unique(labels, return_counts=True)
    quotas = np.maximum(1, counts * size // len(labels))
    chosen = [generator.choice(indices[labels == c], q, replace=False) for c, q in zip(classes, quotas)]
    return np.sort(np.concatenate(chosen))


@torch.no_grad()
def encode(model: torch.nn.Module, x: np.ndarray, batch_size: int) -> np.ndarray:
    """``model.features`` of ``x``, in batches, in float64."""
    model.eval()
    return torch.cat([model.features(xb) for xb in torch.from_numpy(x).split(batch_size)]).double().numpy()


class Probes(Hook):
    """The probes at every task end and every ``eval.probe_every`` rounds; at the end, their
    matrices (``probe_matrix.csv``, ``ncm_matrix.csv``) and metrics in the summary."""

    def after_round(self, view: RoundView) -> dict[str, Any]:
        every = self.setup.config.eval.probe_every
        due = every and view.server_round % every == 0 and not view.task_ended  # task ends: at_task_end
        return self._probe(view) if due else {}

    def at_task_end(self, view: RoundView) -> dict[str, Any]:
        return self._probe(view)

    def _probe(self, view: RoundView) -> dict[str, Any]:
        sample, batch_size = encoded_probe_sample(view), self.setup.config.eval.batch_size
        return probe_record(view.global_model(), self.setup.stream, view.server_round, sample, batch_size)

    def at_end(self, view: RoundView) -> dict[str, Any]:
        """Each probe's matrix and its metrics as ``<probe>_<metric>``; no forward transfer (the
        untrained encoder is not probed). Probes run at every task end, so each task's last record has them."""
        outputs, summary = self.setup.outputs, {}
        for probe in PROBES:
            R = outputs.accuracy_matrix(f"{probe}_acc")
            outputs.write_matrix(R, f"{probe}_matrix.csv")
            summary[f"{probe}_final_accuracy"] = outputs.records[-1][f"{probe}_acc_seen"]
            summary.update({f"{probe}_{k}": v for k, v in metrics.summarize(R).items() if k != "fwt"})
        return summary


def probe_sample(stream: Stream, server_round: int, seed: int, max_samples: int) -> np.ndarray:
    """Indices into ``x_train`` that the probes fit on at ``server_round``: the training data of the tasks
    seen so far, or where there is more, a seeded stratified sample of about ``max_samples`` of it."""
    seen = np.flatnonzero(stream.seen_tasks(server_round))
    indices = np.unique(np.concatenate([stream.task_train_indices(t) for t in seen]))
    return stratified_sample(indices, stream.y_train[indices], max_samples, rng(seed, Purpose.PROBE, server_round))


class EncodedSample(NamedTuple):
    """The probe sample of a round and the global encoder's features of it."""

    indices: np.ndarray  # into x_train
    features: np.ndarray  # a row per sample, float64


_encoded: tuple[weakref.ref[RoundView], EncodedSample] | None = None  # the last round's, while its view lives


def encoded_probe_sample(view: RoundView) -> EncodedSample:
    """The probe sample of ``view``'s round and its features, encoded once for every hook that asks that
    round (the probes, and the diagnostics of ``simulator/diagnostics.py`` at task ends): the same inputs
    through the same weights give the same features, and encoding them is most of what either costs."""
    global _encoded
    if _encoded is None or _encoded[0]() is not view:
        stream, config = view.setup.stream, view.setup.config
        indices = probe_sample(stream, view.server_round, config.seed, config.eval.probe_samples)
        features = encode(view.global_model(), stream.x_train[indices], config.eval.batch_size)
        _encoded = (weakref.ref(view), EncodedSample(indices, features))
    return _encoded[1]


def probe_record(
    model: torch.nn.Module, stream: Stream, server_round: int, sample: EncodedSample, batch_size: int
) -> dict[str, Any]:
    """Each probe's accuracy per task (``<probe>_acc_per_task`` etc.), the probes fitted on ``sample``."""
    seen = stream.seen_tasks(server_round)
    labels = stream.y_train[sample.indices]
    probes = {name: FIT[name](sample.features, labels) for name in PROBES}
    accuracies: dict[str, list[float]] = {name: [] for name in probes}
    for task in range(stream.num_tasks):
        test = stream.task_test_indices(task)
        test_features, allowed = encode(model, stream.x_test[test], batch_size), stream.task_mask(task)
        for name, probe in probes.items():
            accuracies[name].append(float(np.mean(probe.predict(test_features, allowed) == stream.y_test[test])))
    record: dict[str, Any] = {}
    for name, values in accuracies.items():
        record.update(accuracy_record(f"{name}_acc", values, stream, seen))
    return record
