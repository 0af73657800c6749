"""The data layer: datasets in memory, and how they are split across clients.

``load_dataset`` reads or generates the dataset that ``data.dataset`` names
(loaders in ``embedded``, ``files`` and ``synthetic``, each returning a
``Dataset``); ``partition`` splits its training set over the clients, and
``sample_by_label`` draws samples with given label weights (a client's test sample, a label-shift draw).
"""

from __future__ import annotations

from collections.abc import Callable

import numpy as np

from simulator.config import ConfigError, DataConfig
from simulator.data.dataset import Dataset
from simulator.data.embedded import load_digits, load_mnist5k
from simulator.data.files import load_cifar10, load_cifar100, load_mnist, load_npz
from simulator.data.partition import PARTITIONERS, sample_by_label, partition
from simulator.data.synthetic import make_synthetic
from simulator.seeding import Purpose, rng

__all__ = [
    "DATASETS",
    "PARTITIONERS",
    "Dataset",
    "sample_by_label",
    "load_dataset",
    "partition",
]

Loader = Callable[[DataConfig, int, np.random.Generator], Dataset]

DATASETS: dict[str, Loader] = {
    "digits": lambda cfg, num_clients, gen: load_digits(cfg.test_fraction, gen),
    "mnist5k": lambda cfg, num_clients, gen: load_mnist5k(cfg.test_fraction, gen),
    "mnist": lambda cfg, num_clients, gen: load_mnist(cfg.path, cfg.scale),
    "cifar10": lambda cfg, num_clients, gen: load_cifar10(cfg.path, cfg.scale),
    "cifar100": lambda cfg, num_clients, gen: load_cifar100(cfg.path, cfg.scale),
    "npz": lambda cfg, num_clients, gen: load_npz(cfg.path, cfg.test_fraction, gen, cfg.scale),
    "synthetic": lambda cfg, num_clients, gen: make_synthetic(
        cfg.synthetic, num_clients, cfg.test_fraction, gen
    ),
}


def load_dataset(cfg: DataConfig, num_clients: int, seed: int) -> Dataset:
    """Load ``cfg.dataset``; its random parts (test split, synthetic data) depend only on ``seed``.

    ``num_clients`` matters only to ``synthetic``, which makes one group per client.
    """
    if cfg.dataset not in DATASETS:
        raise ConfigError(
            f"data.dataset = {cfg.dataset!r}: unknown dataset; valid: {sorted(DATASETS)}"
        )
    dataset = DATASETS[cfg.dataset](cfg, num_clients, rng(seed, Purpose.DATA))
    for name in ("x_train", "x_test"):
        inputs = getattr(dataset, name)
        if not np.isfinite(inputs).all():
            bad = int(np.count_nonzero(~np.isfinite(inputs).reshape(len(inputs), -1).all(axis=1)))
            where = f"data.path = {cfg.path!r}" if cfg.path else f"data.dataset = {cfg.dataset!r}"
            raise ConfigError(f"{where}: {bad} samples of {name} hold NaN or infinite values")
    return dataset
