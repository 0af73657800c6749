"""Random orders within labels, shared by the test split and the partitioners."""

from __future__ import annotations

import numpy as np


def by_label(labels: np.ndarray, rng: np.random.Generator) -> tuple[np.ndarray, np.ndarray]:
    """Sample indices grouped by ascending label, in random order within each label.

    Returns ``(order, rank)``: ``order`` as described, and ``rank[i]`` the
    position of ``order[i]`` among the samples with its label.
    """
    order = rng.permutation(len(labels))
    order = order[np.argsort(labels[order], kind="stable")]
    sorted_labels = labels[order]
    starts = np.flatnonzero(np.r_[True, sorted_labels[1:] != sorted_labels[:-1]])
    rank = np.arange(len(labels)) - np.repeat(starts, np.diff(np.r_[starts, len(labels)]))
    return order, rank
