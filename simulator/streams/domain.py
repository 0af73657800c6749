"""Domain-incremental streams: same labels, a new input domain per task.

Task t applies a fixed transform to every input: a pixel permutation
(Permuted MNIST, Goodfellow et al. 2013; Kirkpatrick et al. 2017) or a rotation
(Rotated MNIST, Lopez-Paz & Ranzato 2017). Task 0 is the original data. The
transformed copies are built once, stacked, and indexed like any other data:
task t's sample i is row ``t * N + i``. Each client keeps its ``data.partition``
share across tasks, seeing it in the live task's domain.
"""

from __future__ import annotations

import math
from abc import abstractmethod
from dataclasses import dataclass

import numpy as np
import torch
import torch.nn.functional as F

from simulator.config import ConfigError, ExperimentConfig
from simulator.data import Dataset
from simulator.seeding import Draw, Purpose, rng
from simulator.streams.base import Stream


@dataclass(frozen=True)
class DomainSettings:
    """``stream.permuted.*``."""

    num_tasks: int = 5

    def problems(self) -> list[tuple[str, str]]:
        return [("num_tasks", "must be at least 1")] if self.num_tasks < 1 else []


@dataclass(frozen=True)
class RotatedSettings(DomainSettings):
    """``stream.rotated.*``."""

    max_angle: float = 90.0  # task t rotates by t * max_angle / (num_tasks - 1) degrees


class DomainStream(Stream):
    """Subclasses say how task t transforms a batch of inputs; the rest is shared."""

    Settings = DomainSettings

    def __init__(self, config: ExperimentConfig, dataset: Dataset) -> None:
        super().__init__(config, dataset)
        self.num_tasks = self.settings.num_tasks
        self.parts = self.split(self.y_train, dataset.groups_train)
        self.x_train = np.concatenate([self.transform(dataset.x_train, t) for t in range(self.num_tasks)])
        self.x_test = np.concatenate([self.transform(dataset.x_test, t) for t in range(self.num_tasks)])
        self.y_train = np.tile(dataset.y_train, self.num_tasks)
        self.y_test = np.tile(dataset.y_test, self.num_tasks)
        self.train_size, self.test_size = len(dataset.y_train), len(dataset.y_test)

    @abstractmethod
    def transform(self, x: np.ndarray, task: int) -> np.ndarray:
        """``x`` as seen in task ``task``'s domain."""

    def train_indices(self, server_round: int, client: int) -> np.ndarray:
        return self.parts[client] + self.client_task(server_round, client) * self.train_size

    def task_train_indices(self, task: int) -> np.ndarray:
        return np.arange(self.train_size) + task * self.train_size

    def task_test_indices(self, task: int) -> np.ndarray:
        return np.arange(self.test_size) + task * self.test_size


class PermutedStream(DomainStream):
    """Task t shuffles the input features with its own seeded permutation."""

    section = "permuted"

    def transform(self, x: np.ndarray, task: int) -> np.ndarray:
        if task == 0:
            return x
        flat = x.reshape(len(x), -1)
        permutation = rng(self.seed, Purpose.DATA, Draw.PIXEL_PERMUTATION + task).permutation(flat.shape[1])
        return np.ascontiguousarray(flat[:, permutation]).reshape(x.shape)


class RotatedStream(DomainStream):
    """Task t rotates images by ``t * max_angle / (num_tasks - 1)`` degrees (bilinear)."""

    Settings = RotatedSettings
    section = "rotated"

    def __init__(self, config: ExperimentConfig, dataset: Dataset) -> None:
        self.blank = dataset.blank  # standardised data: what a rotation brings in at the corners is black
        super().__init__(config, dataset)

    def transform(self, x: np.ndarray, task: int) -> np.ndarray:
        if x.ndim != 4:
            raise ConfigError(
                f"stream.kind = 'rotated' needs images; data.dataset = "
                f"{self.config.data.dataset!r} gives inputs of shape {x.shape[1:]}"
            )
        if task == 0:
            return x
        angle = math.radians(task * self.settings.max_angle / max(self.num_tasks - 1, 1))
        cos, sin = math.cos(angle), math.sin(angle)
        theta = torch.tensor([[cos, -sin, 0.0], [sin, cos, 0.0]], dtype=torch.float32)
        images = torch.from_numpy(x if self.blank is None else x - self.blank)
        grid = F.affine_grid(theta.expand(len(x), 2, 3), list(images.shape), align_corners=False)
        rotated = F.grid_sample(images, grid, align_corners=False).numpy()  # zero outside the image
        return rotated if self.blank is None else rotated + self.blank
