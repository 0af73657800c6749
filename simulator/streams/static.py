"""One task that never changes: each client keeps its partition every round."""

from __future__ import annotations

import numpy as np

from simulator.config import ExperimentConfig
from simulator.data import Dataset
from simulator.streams.base import Stream


class StaticStream(Stream):
    """``data.partition`` of the training set, the whole test set as the one task."""

    section = "static"

    def __init__(self, config: ExperimentConfig, dataset: Dataset) -> None:
        super().__init__(config, dataset)
        self.parts = self.split(self.y_train, dataset.groups_train)

    def train_indices(self, server_round: int, client: int) -> np.ndarray:
        return self.parts[client]

    def task_test_indices(self, task: int) -> np.ndarray:
        return np.arange(len(self.y_test))
