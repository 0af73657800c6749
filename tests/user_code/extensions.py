"""A user's own plugins of every kind, named by dotted path (``extensions.<Name>``), no library edit.

Each one is the smallest plugin of its kind that shows its settings and its
behaviour in a run's numbers (tests/test_extensions.py):

- :class:`ScaledSGD`, a client method (``client.method``), settings under ``client.scaled``;
- :class:`TemperedHead`, a head (``model.head``), settings under ``model.tempered``;
- :class:`ClassBlocks`, a stream kind (``stream.kind``), settings under ``stream.blocks``;
- :class:`Blobs`, a dataset (``data.dataset``), settings under ``data.blobs``;
- :func:`label_sums`, a client query handler, and :class:`RecordsLabelSums`, the
  strategy (``strategy._target_``) that asks it at every task end.
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass
from typing import Any

import numpy as np
import torch
from flwr.app import ArrayRecord
from flwr.serverapp import Grid
from flwr.serverapp.strategy import FedAvg
from torch import nn

from clients.base import Batch, ClientMethod, TrainContext
from simulator.config import DataConfig, ExperimentConfig
from simulator.data import Dataset, DatasetSource
from simulator.data.dataset import split_dataset
from simulator.protocol import NUM_SAMPLES, Query
from simulator.streams.base import Stream
from strategies.queries import ask_clients

# --- a client method ----------------------------------------------------------------------------------


class ScaledSGD(ClientMethod):
    """Plain SGD on ``loss_scale`` times the cross-entropy, counting each client's rounds in its state.

    The count grows by ``count_step`` each round the client trains; it is kept
    in the client's state (returned from :meth:`new_state`) and reported as the
    metric ``rounds_trained`` (``train/rounds_trained`` in the records).
    """

    @dataclass(frozen=True)
    class Settings:
        """``client.scaled.<key>``."""

        loss_scale: float = 1.0  # 0: no gradient, the global model never moves
        count_step: int = 1  # what one round adds to the client's count

        def problems(self) -> list[tuple[str, str]]:
            found = []
            if self.loss_scale < 0:
                found.append(("loss_scale", "expected a number >= 0"))
            if self.count_step < 1:
                found.append(("count_step", "expected an integer >= 1"))
            return found

    section = "scaled"

    def loss(self, model: nn.Module, batch: Batch, context: TrainContext) -> torch.Tensor:
        return self.settings.loss_scale * super().loss(model, batch, context)

    def rounds_trained(self, context: TrainContext) -> int:
        """The client's count once this round is done."""
        return int(context.state.get("rounds_trained", 0)) + self.settings.count_step

    def end(self, model: nn.Module, context: TrainContext) -> dict[str, float]:
        return {"rounds_trained": float(self.rounds_trained(context))}

    def new_state(self, model: nn.Module, context: TrainContext) -> Mapping[str, Any]:
        return {**context.state, "rounds_trained": self.rounds_trained(context)}


# --- a head -------------------------------------------------------------------------------------------


@dataclass(frozen=True)
class TemperedSettings:
    """``model.tempered.<key>``."""

    scale: float = 1.0  # logits = scale * (W h + b)

    def problems(self) -> list[tuple[str, str]]:
        return [("scale", "expected a number >= 0")] if self.scale < 0 else []


class TemperedHead(nn.Module):
    """A linear head whose logits are multiplied by ``scale`` (0: every class equally likely)."""

    Settings = TemperedSettings
    section = "tempered"

    def __init__(
        self, feature_dim: int, num_classes: int, settings: TemperedSettings, generator: torch.Generator
    ) -> None:
        super().__init__()
        self.linear = nn.Linear(feature_dim, num_classes)  # drawn from the generator by build_model
        self.scale = settings.scale

    def forward(self, features: torch.Tensor) -> torch.Tensor:
        return self.scale * self.linear(features)


# --- a stream kind ------------------------------------------------------------------------------------


class ClassBlocks(Stream):
    """``num_tasks`` tasks, each a block of consecutive labels (``np.array_split`` of the labels).

    Within a task, the task's training samples are split over the clients by
    ``data.partition``; a task's test set is the test samples of its labels.
    """

    @dataclass(frozen=True)
    class Settings:
        """``stream.blocks.<key>``."""

        num_tasks: int = 2

        def problems(self) -> list[tuple[str, str]]:
            return [("num_tasks", "expected an integer >= 1")] if self.num_tasks < 1 else []

    section = "blocks"

    def __init__(self, config: ExperimentConfig, dataset: Dataset) -> None:
        super().__init__(config, dataset)
        self.num_tasks = self.settings.num_tasks
        self.blocks = np.array_split(np.arange(self.num_classes), self.num_tasks)
        self.parts = []  # per task, per client: indices into x_train
        for task in range(self.num_tasks):
            pool = self.task_train_indices(task)
            self.parts.append([pool[p] for p in self.split(self.y_train[pool], None, task)])

    def train_indices(self, server_round: int, client: int) -> np.ndarray:
        return self.parts[self.client_task(server_round, client)][client]

    def task_train_indices(self, task: int) -> np.ndarray:
        return np.flatnonzero(np.isin(self.y_train, self.blocks[task]))

    def task_test_indices(self, task: int) -> np.ndarray:
        return np.flatnonzero(np.isin(self.y_test, self.blocks[task]))


# --- a dataset ----------------------------------------------------------------------------------------


class Blobs(DatasetSource):
    """``num_classes`` Gaussian blobs in ``dim`` dimensions, ``per_class`` samples each, drawn from the
    run's data generator; ``data.test_fraction`` of each class held out for testing."""

    @dataclass(frozen=True)
    class Settings:
        """``data.blobs.<key>``."""

        num_classes: int = 3
        dim: int = 4
        per_class: int = 50
        spread: float = 0.1  # the blobs' standard deviation; their centres are N(0, 4 I)

        def problems(self) -> list[tuple[str, str]]:
            found = []
            if self.num_classes < 2:
                found.append(("num_classes", "expected an integer >= 2"))
            if self.per_class < 2:
                found.append(("per_class", "expected an integer >= 2"))
            return found

    section = "blobs"

    @classmethod
    def load(cls, data: DataConfig, settings: Any, num_clients: int, generator: np.random.Generator) -> Dataset:
        centres = generator.normal(0.0, 2.0, size=(settings.num_classes, settings.dim))
        y = np.repeat(np.arange(settings.num_classes, dtype=np.int64), settings.per_class)
        x = centres[y] + generator.normal(0.0, settings.spread, size=(len(y), settings.dim))
        return split_dataset("blobs", x.astype(np.float32), y, settings.num_classes, data.test_fraction, generator)


# --- a client query and the strategy that asks it -----------------------------------------------------


def label_sums(model: nn.Module, query: Query) -> dict[str, np.ndarray]:
    """What a client holds: its sample count and label sum this round, its count of rounds trained
    (from its state, as :class:`ScaledSGD` keeps it), and, echoed, the arrays the server sent with the
    query (``query.arrays``)."""
    return {
        NUM_SAMPLES: np.array(len(query.y), dtype=np.int64),
        "label_sum": np.array(int(query.y.sum()), dtype=np.int64),
        "rounds_trained": np.array(int(query.state.get("rounds_trained", 0)), dtype=np.int64),
        **{f"echo/{name}": np.asarray(value) for name, value in query.arrays.items()},
    }


BUILT: list[RecordsLabelSums] = []  # every instance built, for the test to read


def sent_arrays(task: int) -> dict[str, np.ndarray]:
    """What :class:`RecordsLabelSums` sends with its query at the end of ``task``: a 0-d task number
    and a small matrix, which :func:`label_sums` echoes back."""
    return {"task": np.array(task, dtype=np.int64), "offsets": np.arange(6.0).reshape(2, 3) + task}


class RecordsLabelSums(FedAvg):
    """FedAvg that asks every present client :func:`label_sums` at each task end and keeps the answers."""

    def __init__(self, max_samples: int | None = None, **kwargs: Any) -> None:
        super().__init__(**kwargs)
        self.answers: dict[int, list[dict[str, np.ndarray]]] = {}  # task -> one answer per client, by id
        self.max_samples = max_samples  # each client answers on at most this many of its samples
        BUILT.append(self)

    def on_task_end(self, task: int, arrays: ArrayRecord, grid: Grid) -> None:
        self.answers[task] = ask_clients(grid, arrays, "extensions.label_sums", sent_arrays(task), self.max_samples)

    def checkpoint_state(self) -> dict[str, Any]:
        """The answers so far, for checkpoints (JSON keys are strings)."""
        return {"answers": {str(task): answers for task, answers in self.answers.items()}}

    def restore_state(self, state: dict[str, Any], arrays: ArrayRecord) -> None:
        self.answers = {int(task): answers for task, answers in state["answers"].items()}
