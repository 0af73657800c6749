"""Continual-learning metrics as pure functions of the accuracy matrix.

``R[i][j]`` is the accuracy on task j's test set at the end of task i, for the
T tasks the run reached (i, j = 0..T-1); columns of tasks never reached (a run
stopped early) are ignored. A run with no tasks is one task: R is 1x1, and the
metrics that compare tasks are ``None``, being means over an empty set.
"""

from __future__ import annotations

import numpy as np


def average_accuracy(R: np.ndarray) -> float:
    """Mean accuracy over all tasks after the last one: mean_j R[T-1][j]."""
    return float(np.mean(R[-1]))


def average_incremental_accuracy(R: np.ndarray) -> float:
    """Mean over i of the mean over j <= i of R[i][j] (Rebuffi et al. 2017)."""
    return float(np.mean([np.mean(R[i, : i + 1]) for i in range(len(R))]))


def forgetting(R: np.ndarray) -> float | None:
    """Mean over j < T-1 of (max over l < T-1 of R[l][j]) - R[T-1][j] (Chaudhry et al. 2018)."""
    T = len(R)
    if T < 2:
        return None
    return float(np.mean(R[: T - 1, : T - 1].max(axis=0) - R[T - 1, : T - 1]))


def backward_transfer(R: np.ndarray) -> float | None:
    """Mean over j < T-1 of R[T-1][j] - R[j][j] (Lopez-Paz & Ranzato 2017)."""
    T = len(R)
    if T < 2:
        return None
    return float(np.mean([R[T - 1, j] - R[j, j] for j in range(T - 1)]))


def forward_transfer(R: np.ndarray, initial: np.ndarray | None) -> float | None:
    """Mean over j > 0 of R[j-1][j] - b[j], b[j] the initial model's accuracy on task j.

    Lopez-Paz & Ranzato 2017; ``None`` when there is one task or ``initial`` was not measured.
    """
    T = len(R)
    if T < 2 or initial is None:
        return None
    return float(np.mean([R[j - 1, j] - initial[j] for j in range(1, T)]))


def forgetting_after_training(R: np.ndarray) -> float | None:
    """Mean over j < T-1 of R[j][j] - R[T-1][j]: accuracy just after training minus at the end.

    Equal to -bwt; reported under its own name because papers use both.
    """
    T = len(R)
    if T < 2:
        return None
    return float(np.mean([R[j, j] - R[T - 1, j] for j in range(T - 1)]))


def accuracy_spread(accuracies: np.ndarray, prefix: str = "client_acc") -> dict[str, float]:
    """Mean, standard deviation and worst-10% mean of per-client accuracies, as ``<prefix>_mean`` etc."""
    worst = np.sort(accuracies)[: max(1, int(np.ceil(0.1 * len(accuracies))))]
    return {
        f"{prefix}_mean": float(np.mean(accuracies)),
        f"{prefix}_std": float(np.std(accuracies)),
        f"{prefix}_worst10": float(np.mean(worst)),
    }


def summarize(R: np.ndarray, initial: np.ndarray | None = None) -> dict[str, float | None]:
    """Every matrix metric, under the names ``summary.json`` uses."""
    R = R[:, : len(R)]  # tasks reached
    return {
        "average_accuracy": average_accuracy(R),
        "average_incremental_accuracy": average_incremental_accuracy(R),
        "forgetting": forgetting(R),
        "forgetting_after_training": forgetting_after_training(R),
        "bwt": backward_transfer(R),
        "fwt": forward_transfer(R, initial),
    }
