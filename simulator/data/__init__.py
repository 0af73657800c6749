"""The data layer: datasets in memory, and how they are split across clients.

``DATASETS`` ships the datasets ``data.dataset`` names (loaders in ``embedded``,
``files``, ``tiny_imagenet`` and ``synthetic``, each a :class:`DatasetSource` returning a
``Dataset``); a user's is the dotted path of a ``DatasetSource`` subclass, with
its settings under ``data.<section>``. ``partition`` splits a training set
over the clients, and ``sample_by_label`` draws samples with given label
weights (a client's test sample, a label-shift draw).
"""

from __future__ import annotations

import numpy as np

from simulator.config import ConfigError, DataConfig, normalizes
from simulator.data.dataset import Dataset, DatasetSource, standardized
from simulator.data.embedded import Digits, MNIST5k
from simulator.data.files import CIFAR10Files, CIFAR100Files, FashionMNISTFiles, MNISTFiles, NpzFile
from simulator.data.partition import PARTITIONERS, partition, sample_by_label
from simulator.data.synthetic import Synthetic
from simulator.data.tiny_imagenet import TinyImageNetFiles
from simulator.registry import Registry
from simulator.seeding import Purpose, rng

__all__ = ["DATASETS", "PARTITIONERS", "Dataset", "DatasetSource", "load_dataset", "partition", "sample_by_label"]

DATASETS: Registry[type[DatasetSource]] = Registry(
    "dataset",
    "data.dataset",
    {
        "digits": Digits,
        "mnist5k": MNIST5k,
        "synthetic": Synthetic,
        "mnist": MNISTFiles,
        "fashion_mnist": FashionMNISTFiles,
        "cifar10": CIFAR10Files,
        "cifar100": CIFAR100Files,
        "tiny_imagenet": TinyImageNetFiles,
        "npz": NpzFile,
    },
    "a simulator.data.DatasetSource subclass",
    lambda plugin: isinstance(plugin, type) and issubclass(plugin, DatasetSource),
)


def load_dataset(data: DataConfig, num_clients: int, seed: int) -> Dataset:
    """Load ``data.dataset``, standardised where ``data.normalize`` says; its random parts (test split,
    synthetic data) depend only on ``seed``.

    ``num_clients`` matters only to a dataset that makes one group per client (``synthetic``).
    """
    source = DATASETS.resolve(data.dataset)
    settings = source.Settings() if data.settings is None else data.settings  # None: not read by plugins
    dataset = source.load(data, settings, num_clients, rng(seed, Purpose.DATA))
    for name in ("x_train", "x_test"):
        inputs = getattr(dataset, name)
        if not np.isfinite(inputs).all():
            bad = int(np.count_nonzero(~np.isfinite(inputs).reshape(len(inputs), -1).all(axis=1)))
            where = f"data.path = {data.path!r}" if data.path else f"data.dataset = {data.dataset!r}"
            raise ConfigError(f"{where}: {bad} samples of {name} hold NaN or infinite values")
    return standardized(dataset) if normalizes(data) else dataset
