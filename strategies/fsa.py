"""FSA: Panos et al. 2023, "First Session Adaptation: A Strong Replay-Free Baseline for Class-Incremental
Learning" (ICCV).

The encoder adapts on the first task only and is frozen from its end on; a head
computed in closed form from class statistics, updated exactly as classes
arrive, does the rest. Federated here as a FedAvg (``strategies/class_statistics.py``
freezes the encoder: it puts the first task's encoder back after every later
round's aggregation and tells clients to train the head only), whose
``on_task_end`` asks the present clients for per-class feature counts, means and
covariances (``class_feature_statistics``), pools them exactly (the same
:func:`~strategies.class_statistics.pooled_statistics` as CCVR; a class measured
in two tasks is pooled across both) and writes into the linear head, for every
class seen so far:

- ``head=lda`` (the paper's head), Fisher's linear discriminant with a shared
  covariance: ``w_c = S^-1 mu_c``, ``b_c = -mu_c^T S^-1 mu_c / 2``, equal class
  priors (no log prior, as the authors' code). ``S`` is the pooled within-class
  covariance of all seen classes, ``sum_c (n_c - 1) S_c / (N - C)``, shrunk
  towards a scaled identity: ``(1 - shrinkage) S + shrinkage tr(S)/d I``. The
  authors' code (``compute_lda_head``, github.com/aresPanos/fsa) regularises
  instead by adding the identity to the covariance of all seen features
  (between-class spread included), in the units of its EfficientNet features;
  a fraction of the covariance's own scale serves any encoder. ``shrinkage``
  0.01 is the better of 0.001-1.0 on seed 7 of digits_class_incremental (0.947
  final accuracy at 0.01, 0.916 at 0.1, 0.515 at 1.0) and of 0.01 and 0.1 on
  seed 7 of fashion_class_incremental (0.738, 0.690); the reported seeds are 0-2;
- ``head=ncm``, the nearest class mean: ``w_c = mu_c``, ``b_c = -|mu_c|^2 / 2``
  (argmax equals argmin of the Euclidean distance to the means).

Classes never seen get weight 0 and a bias far below every seen class's logit.
"""

from __future__ import annotations

from typing import Any

import numpy as np
from flwr.app import ArrayRecord
from flwr.serverapp import Grid

from simulator.config import ConfigError
from simulator.protocol import CLASS_FEATURE_STATISTICS
from strategies.class_statistics import ClassStatistics, FrozenEncoderHead, merged, pooled_statistics
from strategies.queries import ask_clients

HEADS = ("lda", "ncm")


class FSA(FrozenEncoderHead):
    """FedAvg on the first task, then a frozen encoder under an LDA (or nearest-class-mean) head from class
    statistics, rebuilt at every task end."""

    name = "fsa"

    def __init__(self, *args: Any, head: str = "lda", shrinkage: float = 0.01, **kwargs: Any) -> None:
        super().__init__(*args, **kwargs)
        if head not in HEADS:
            raise ConfigError(f"strategy.head = {head!r}: expected one of {', '.join(HEADS)}")
        if isinstance(shrinkage, bool) or not isinstance(shrinkage, (int, float)) or not 0 <= shrinkage <= 1:
            raise ConfigError(f"strategy.shrinkage = {shrinkage!r}: expected a number in [0, 1]")
        self.head = head
        self.shrinkage = float(shrinkage)

    def rebuilt_rows(self, arrays: ArrayRecord, grid: Grid) -> tuple[dict[int, tuple[np.ndarray, float]], float]:
        measured = pooled_statistics(ask_clients(grid, arrays, CLASS_FEATURE_STATISTICS))
        self.class_statistics = merged(self.class_statistics, measured)
        rows = (
            lda_rows(self.class_statistics, self.shrinkage) if self.head == "lda" else ncm_rows(self.class_statistics)
        )
        return rows, feature_reach(self.class_statistics)


def ncm_rows(statistics: ClassStatistics) -> dict[int, tuple[np.ndarray, float]]:
    """The nearest class mean as a linear head: per class, ``(mu_c, -|mu_c|^2 / 2)``."""
    return {label: (mean, -0.5 * float(mean @ mean)) for label, (_, mean, _) in sorted(statistics.items())}


def lda_rows(statistics: ClassStatistics, shrinkage: float) -> dict[int, tuple[np.ndarray, float]]:
    """Fisher's LDA with the shrunk pooled within-class covariance ``S`` (equal priors): per class,
    ``(S^-1 mu_c, -mu_c^T S^-1 mu_c / 2)``."""
    labels = sorted(statistics)
    means = np.stack([statistics[c][1] for c in labels])  # classes x features
    try:
        precision_means = np.linalg.solve(shrunk(within_class_covariance(statistics), shrinkage), means.T).T
    except np.linalg.LinAlgError:
        raise ValueError(
            f"the pooled within-class covariance of the classes {labels} is singular with strategy.shrinkage = "
            f"{shrinkage}; raise it above 0"
        ) from None
    return {c: (w, -0.5 * float(mu @ w)) for c, mu, w in zip(labels, means, precision_means)}


def within_class_covariance(statistics: ClassStatistics) -> np.ndarray:
    """The pooled within-class covariance ``sum_c (n_c - 1) S_c / (N - C)`` (zero with one sample a class)."""
    scatter = sum((count - 1) * covariance for count, _, covariance in statistics.values())
    return scatter / max(sum(count for count, _, _ in statistics.values()) - len(statistics), 1)


def shrunk(covariance: np.ndarray, shrinkage: float) -> np.ndarray:
    """``(1 - shrinkage) S + shrinkage tr(S)/d I`` (the identity's scale 1 where ``S`` is zero)."""
    dim = len(covariance)
    scale = np.trace(covariance) / dim
    return (1 - shrinkage) * covariance + shrinkage * (scale if scale > 0 else 1.0) * np.eye(dim)


def feature_reach(statistics: ClassStatistics) -> float:
    """How far from the origin the seen classes' features reach: the largest mean norm plus the root-mean-square
    distance of a class's features from its mean."""
    return max(
        float(np.linalg.norm(mean)) + (float(np.sqrt(max(np.trace(cov), 0.0))) if cov is not None else 0.0)
        for _, mean, cov in statistics.values()
    )
