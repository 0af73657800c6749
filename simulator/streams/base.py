"""What a stream is: per round and client, which samples a client trains on; per task, a test set.

A stream never loops over rounds: the engine asks it about round r and client c,
and the answer is a function of (seed, r, c), so asking twice gives the same
answer. Indices point into the stream's ``x_train`` / ``x_test``, which a
domain-incremental stream stores once per domain.
"""

from __future__ import annotations

from abc import ABC, abstractmethod
from typing import Any, ClassVar

import numpy as np

from simulator.config import ExperimentConfig
from simulator.data import Dataset, partition, sample_by_label
from simulator.registry import NoSettings
from simulator.seeding import Purpose, rng


class Stream(ABC):
    """A sequence of tasks over ``num_clients`` clients."""

    num_tasks: int = 1
    Settings: ClassVar[type] = NoSettings  # the kind's own settings, from stream.<section>
    section: ClassVar[str | None] = None  # None: the class name

    def __init__(self, config: ExperimentConfig, dataset: Dataset) -> None:
        self.config = config
        self.rounds_per_task = config.stream.rounds_per_task
        # None where the config was not read through simulator.plugins (a script's own): the defaults.
        self.settings = self.Settings() if config.stream.settings is None else config.stream.settings
        self.seed = config.seed
        self.num_clients = config.federation.num_clients
        self.num_classes = dataset.num_classes
        self.x_train, self.y_train = dataset.x_train, dataset.y_train
        self.x_test, self.y_test = dataset.x_test, dataset.y_test

    def use_arrays(self, x_train: np.ndarray, y_train: np.ndarray, x_test: np.ndarray, y_test: np.ndarray) -> None:
        """Read the samples from these arrays from now on: the same values in another place.

        The Ray backend copies the arrays into its object store; reading that
        copy (zero-copy, read-only) lets the driver's own copy go.
        """
        self.x_train, self.y_train, self.x_test, self.y_test = x_train, y_train, x_test, y_test

    def split(self, labels: np.ndarray, groups: np.ndarray | None = None, *keys: int) -> list[np.ndarray]:
        """``data.partition`` applied to ``labels``; ``keys`` tell apart several splits of one run."""
        generator = rng(self.seed, Purpose.PARTITION, *keys)
        return partition(labels, self.num_clients, self.config.data.partition, generator, groups)

    @property
    def default_rounds(self) -> int | None:
        """Rounds the stream lasts when the config leaves ``rounds`` unset (None: no default)."""
        return self.num_tasks * self.rounds_per_task if self.num_tasks > 1 else None

    def derived(self) -> dict[str, Any]:
        """What the stream derived from its settings and the data, for the run directory to show."""
        return {"num_tasks": self.num_tasks}

    def task_of_round(self, server_round: int) -> int:
        """The live task at ``server_round`` (1-based); the last task lasts past its rounds."""
        return min((server_round - 1) // self.rounds_per_task, self.num_tasks - 1)

    def seen_tasks(self, server_round: int) -> np.ndarray:
        """Boolean mask over tasks: which some client has trained on by ``server_round``."""
        return np.arange(self.num_tasks) <= self.task_of_round(server_round)

    def client_task(self, server_round: int, client: int) -> int:
        """The task client ``client`` trains on at ``server_round``."""
        return self.task_of_round(server_round)

    def available_clients(self, server_round: int) -> list[int]:
        """The clients present at ``server_round``: the strategy samples among them."""
        return list(range(self.num_clients))

    @abstractmethod
    def train_indices(self, server_round: int, client: int) -> np.ndarray:
        """Indices into ``x_train`` that ``client`` trains on at ``server_round``."""

    def task_train_indices(self, task: int) -> np.ndarray:
        """Indices into ``x_train`` of task ``task``'s training data, all clients' (what probes fit on)."""
        return np.arange(len(self.y_train))

    @abstractmethod
    def task_test_indices(self, task: int) -> np.ndarray:
        """Indices into ``x_test`` of task ``task``'s test set."""

    def task_classes(self, task: int) -> np.ndarray | None:
        """The labels of ``task`` where predictions are restricted to them (task-incremental)."""
        return None

    def task_mask(self, task: int) -> np.ndarray | None:
        """Boolean mask over labels that predictions for ``task`` are restricted to, or None."""
        classes = self.task_classes(task)
        if classes is None:
            return None
        mask = np.zeros(self.num_classes, dtype=bool)
        mask[classes] = True
        return mask

    def class_mask(self, server_round: int, client: int) -> np.ndarray | None:
        """The mask of the task ``client`` trains on at ``server_round``."""
        return self.task_mask(self.client_task(server_round, client))

    def client_label_distribution(self, server_round: int, client: int) -> np.ndarray:
        """The label distribution of what ``client`` trains on at ``server_round``."""
        counts = np.bincount(self.y_train[self.train_indices(server_round, client)], minlength=self.num_classes)
        return counts / max(counts.sum(), 1)

    def client_test_indices(self, server_round: int, client: int, size: int) -> np.ndarray:
        """A test sample of ``size`` drawn like ``client``'s data: its task's test set, its label mix."""
        pool = self.task_test_indices(self.client_task(server_round, client))
        weights = self.client_label_distribution(server_round, client)
        generator = rng(self.seed, Purpose.CLIENT_EVAL, server_round, client)
        return pool[sample_by_label(self.y_test[pool], weights, size, generator)]
