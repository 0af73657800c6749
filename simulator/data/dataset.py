"""The in-memory dataset every loader returns, the dataset plugin's interface, and the helpers loaders share."""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass
from typing import Any, ClassVar

import numpy as np

from simulator.config import DataConfig
from simulator.data.ordering import by_label
from simulator.registry import NoSettings


@dataclass(frozen=True)
class Dataset:
    """A train/test pair of arrays with integer labels ``0 .. num_classes - 1``.

    Inputs are float32 and C-contiguous, shaped ``(N, C, H, W)`` for images and
    ``(N, D)`` for vectors; labels are int64 of shape ``(N,)``. ``groups_train``
    holds the natural client of each training sample where the source has one
    (synthetic data), for the ``natural`` partition.
    """

    name: str
    x_train: np.ndarray
    y_train: np.ndarray
    x_test: np.ndarray
    y_test: np.ndarray
    num_classes: int
    groups_train: np.ndarray | None = None
    blank: np.ndarray | None = None  # where standardised: a zero (black) input's value, per channel (1, C, 1, 1)

    def __post_init__(self) -> None:
        splits = ((self.x_train, self.y_train, "train"), (self.x_test, self.y_test, "test"))
        for x, y, split in splits:
            if x.dtype != np.float32 or not x.flags.c_contiguous:
                raise ValueError(f"{self.name}: x_{split} must be C-contiguous float32")
            if y.dtype != np.int64 or y.shape != (len(x),):
                raise ValueError(f"{self.name}: y_{split} must be int64 of shape ({len(x)},)")
            if len(y) and (y.min() < 0 or y.max() >= self.num_classes):
                raise ValueError(f"{self.name}: y_{split} outside 0..{self.num_classes - 1}")
        if self.x_test.shape[1:] != self.input_shape:
            raise ValueError(f"{self.name}: test and train inputs differ in shape")
        if self.groups_train is not None and self.groups_train.shape != self.y_train.shape:
            raise ValueError(f"{self.name}: groups_train must have one entry per training sample")

    @property
    def input_shape(self) -> tuple[int, ...]:
        """The shape of one input, without the sample axis."""
        return tuple(self.x_train.shape[1:])


def scaled(x: np.ndarray, max_value: float) -> np.ndarray:
    """``x / max_value`` as a new C-contiguous float32 array (pixel values to [0, 1])."""
    return np.ascontiguousarray(x, dtype=np.float32) / np.float32(max_value)


def standardized(dataset: Dataset) -> Dataset:
    """``dataset`` with inputs standardised by its training set: per channel for images (``(N, C, H, W)``: the
    CIFAR-100 training set gives the familiar 0.507, 0.487, 0.441 and 0.267, 0.256, 0.276), per feature for
    vectors. A constant channel or feature is only centred. ``data.normalize``."""
    mean, std = _moments(dataset.x_train)
    std[std == 0] = 1.0
    mean, std = mean.astype(np.float32), std.astype(np.float32)

    def scaled_split(x: np.ndarray) -> np.ndarray:
        out = np.subtract(x, mean, dtype=np.float32)  # one new array; the source may be a loader's cache
        out /= std
        return out

    return dataclasses.replace(
        dataset, x_train=scaled_split(dataset.x_train), x_test=scaled_split(dataset.x_test), blank=-mean / std
    )


def _moments(x: np.ndarray, chunk: int = 4096) -> tuple[np.ndarray, np.ndarray]:
    """Per-channel (images) or per-feature mean and standard deviation of ``x``, summed in float64 a chunk of
    samples at a time: no float64 copy of the whole set (4.9 GB of Tiny-ImageNet would take 9.8 GB more)."""
    axes = (0, 2, 3) if x.ndim == 4 else (0,)
    total = np.zeros([1 if i in axes else n for i, n in enumerate(x.shape)], dtype=np.float64)
    squares, count = total.copy(), len(x) * (np.prod([x.shape[i] for i in axes[1:]]) if x.ndim == 4 else 1)
    for start in range(0, len(x), chunk):
        block = x[start : start + chunk].astype(np.float64)
        total += block.sum(axis=axes, keepdims=True)
        squares += np.square(block).sum(axis=axes, keepdims=True)
    mean = total / max(count, 1)
    return mean, np.sqrt(np.maximum(squares / max(count, 1) - np.square(mean), 0.0))


def split_dataset(
    name: str,
    x: np.ndarray,
    y: np.ndarray,
    num_classes: int,
    test_fraction: float,
    rng: np.random.Generator,
) -> Dataset:
    """Hold out ``test_fraction`` of each class, at random, for sources without a test split.

    Each class contributes ``round(count * test_fraction)`` test samples, so
    both splits keep the source's label proportions. Both splits stay in the
    source's order.
    """
    y = np.asarray(y, dtype=np.int64)
    order, rank = by_label(y, rng)
    counts = np.bincount(y, minlength=num_classes)
    is_test = np.zeros(len(y), dtype=bool)
    is_test[order] = rank < np.round(counts * test_fraction)[y[order]]
    return Dataset(
        name=name,
        x_train=x[~is_test],
        y_train=y[~is_test],
        x_test=x[is_test],
        y_test=y[is_test],
        num_classes=num_classes,
    )


class DatasetSource:
    """A dataset plugin: ``data.dataset`` names one (a short name, or a user's class by dotted path).

    :meth:`load` returns the whole :class:`Dataset`; its random parts (a test
    split, generated data) draw only from ``generator``, seeded from the run
    seed. ``Settings``: its own hyperparameters, from ``data.<section>``.
    ``reads_files``: it reads ``data.path``, and ``data.scale`` divides its inputs.
    """

    Settings: ClassVar[type] = NoSettings
    section: ClassVar[str | None] = None  # None: the class name
    reads_files: ClassVar[bool] = False

    @classmethod
    def load(cls, data: DataConfig, settings: Any, num_clients: int, generator: np.random.Generator) -> Dataset:
        """The dataset, by ``data`` (its ``path``, ``scale``, ``test_fraction``) and ``settings``."""
        raise NotImplementedError
