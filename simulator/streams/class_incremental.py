"""Class-incremental streams: each task adds classes the clients have not seen.

Task t holds a set of classes (given, or consecutive groups of a class order);
its training samples are split across the clients by ``data.partition``
(Dirichlet or k classes per client), and during task t a client trains only
on its share of task t. Options, all seeded:

- ``task_incremental``: logits restricted to the task's classes, in training
  and evaluation (the task-IL setting of van de Ven & Tolias 2019);
- ``own_schedule``: each client goes through the tasks in its own order and at
  its own pace (rounds per task drawn in [min, max]), as in asynchronous
  federated continual learning (Shenaj et al. 2023);
- ``initial_clients`` / ``keep_old``: only a share of the clients is present
  at task 0, the rest join at task boundaries on the live task; at each
  boundary each client still moving with the tasks stays behind with
  probability ``keep_old`` and keeps its old classes from then on, so the
  share of clients on old classes grows over the tasks (about 1-(1-p)^t).
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

import numpy as np

from simulator.config import ConfigError, ExperimentConfig
from simulator.data import Dataset
from simulator.seeding import Draw, Purpose, rng
from simulator.streams.base import Stream

ABSENT = -1  # in the schedule: the client is not present yet


@dataclass(frozen=True)
class ClassIncrementalSettings:
    """``stream.class_incremental.*``."""

    tasks: list[list[int]] | None = None  # explicit classes of each task
    classes_per_task: int = 2  # when tasks is null: consecutive groups of the class order
    shuffle_classes: bool = False  # a seeded class order instead of 0, 1, 2, ...
    task_incremental: bool = False  # mask logits to the task's classes (train and test)
    own_schedule: bool = False  # each client its own task order and pace
    min_rounds_per_task: int = 5  # own_schedule: each client's pace, drawn per task
    max_rounds_per_task: int = 15
    initial_clients: float = 1.0  # share of clients present at task 0; the rest join at boundaries
    keep_old: float = 0.0  # at each boundary, the share of still-moving clients that stay behind for good

    def problems(self) -> list[tuple[str, str]]:
        checks = [
            ("classes_per_task", self.classes_per_task >= 1, "must be at least 1"),
            ("initial_clients", 0 < self.initial_clients <= 1, "must be in (0, 1]"),
            ("keep_old", 0 <= self.keep_old < 1, "must be in [0, 1)"),
        ]
        return [(key, reason) for key, ok, reason in checks if not ok]


class ClassIncrementalStream(Stream):
    """Tasks of classes; which task each client trains on is a precomputed schedule."""

    Settings = ClassIncrementalSettings
    section = "class_incremental"

    def __init__(self, config: ExperimentConfig, dataset: Dataset) -> None:
        super().__init__(config, dataset)
        self.classes = self._task_classes()
        self.num_tasks = len(self.classes)
        self.task_of_label = np.full(self.num_classes, ABSENT)
        for task, classes in enumerate(self.classes):
            self.task_of_label[classes] = task
        # parts[t][c]: client c's share of task t's training samples.
        self.parts = []
        for task, classes in enumerate(self.classes):
            in_task = np.flatnonzero(np.isin(self.y_train, classes))
            self.parts.append([in_task[p] for p in self.split(self.y_train[in_task], None, task)])
        self.test_of_task = [np.flatnonzero(np.isin(self.y_test, c)) for c in self.classes]
        self.schedule = self._own_schedule() if self.settings.own_schedule else self._shared_schedule()
        self._check_enough_clients()

    def _task_classes(self) -> list[np.ndarray]:
        settings = self.settings
        if settings.tasks is not None:
            listed = [c for task in settings.tasks for c in task]
            if not settings.tasks or any(not task for task in settings.tasks):
                raise ConfigError(
                    f"stream.class_incremental.tasks = {settings.tasks}: every task needs at least one class"
                )
            if len(set(listed)) != len(listed) or not all(0 <= c < self.num_classes for c in listed):
                raise ConfigError(
                    f"stream.class_incremental.tasks = {settings.tasks}: classes must be distinct labels in "
                    f"0..{self.num_classes - 1} (data.dataset = {self.config.data.dataset!r})"
                )
            return [np.array(task) for task in settings.tasks]
        if settings.classes_per_task > self.num_classes:
            raise ConfigError(
                f"stream.class_incremental.classes_per_task = {settings.classes_per_task}: the dataset has "
                f"{self.num_classes} classes"
            )
        order = np.arange(self.num_classes)
        if settings.shuffle_classes:
            order = rng(self.seed, Purpose.DATA, Draw.CLASS_ORDER).permutation(self.num_classes)
        whole = self.num_classes // settings.classes_per_task * settings.classes_per_task
        return list(order[:whole].reshape(-1, settings.classes_per_task))

    def _shared_schedule(self) -> np.ndarray:
        """schedule[t, c]: client c's task during global task t (ABSENT before it joins)."""
        settings, n, T = self.settings, self.num_clients, self.num_tasks
        join_order = rng(self.seed, Purpose.DATA, Draw.JOIN_ORDER).permutation(n)
        first = max(1, int(np.ceil(settings.initial_clients * n)))
        present = [first + (n - first) * t // max(T - 1, 1) for t in range(T)]
        schedule = np.full((T, n), ABSENT)
        for t in range(T):
            joined = join_order[: present[t]]
            schedule[t, joined] = t
            if t > 0:
                earlier = join_order[: present[t - 1]]
                draws = rng(self.seed, Purpose.DATA, Draw.STAY_BEHIND, t).random(n)
                stays = earlier[(draws[earlier] < settings.keep_old) | (schedule[t - 1, earlier] < t - 1)]
                schedule[t, stays] = schedule[t - 1, stays]
        return schedule

    def _own_schedule(self) -> np.ndarray:
        """schedule[r - 1, c]: client c's task at round r, each client in its own order and pace."""
        settings = self.settings
        if settings.initial_clients < 1 or settings.keep_old > 0:
            raise ConfigError(
                "stream.class_incremental.own_schedule = true moves every client through every task on its own; "
                "it does not combine with initial_clients < 1 or keep_old > 0"
            )
        if not 1 <= settings.min_rounds_per_task <= settings.max_rounds_per_task:
            raise ConfigError(
                f"stream.class_incremental.min_rounds_per_task = {settings.min_rounds_per_task}, max_rounds_per_task"
                f" = {settings.max_rounds_per_task}: need 1 <= min <= max"
            )
        rounds = self.config.rounds or self.default_rounds
        schedule = np.empty((rounds, self.num_clients), dtype=np.int64)
        for client in range(self.num_clients):
            generator = rng(self.seed, Purpose.DATA, Draw.OWN_SCHEDULE, client)
            order = generator.permutation(self.num_tasks)
            pace = generator.integers(settings.min_rounds_per_task, settings.max_rounds_per_task + 1, self.num_tasks)
            per_round = np.repeat(order, pace)
            per_round = np.concatenate([per_round, np.full(max(rounds - len(per_round), 0), order[-1])])
            schedule[:, client] = per_round[:rounds]
        return schedule

    def _check_enough_clients(self) -> None:
        fewest = int((self.schedule != ABSENT).sum(axis=1).min())
        wanted = self.config.federation.clients_per_round
        if fewest < wanted:
            raise ConfigError(
                f"stream.class_incremental.initial_clients = {self.settings.initial_clients}: only {fewest} clients are present"
                f" at the start, fewer than federation.clients_per_round = {wanted}"
            )

    def _row(self, server_round: int) -> np.ndarray:
        if self.settings.own_schedule:
            return self.schedule[min(server_round, len(self.schedule)) - 1]
        return self.schedule[self.task_of_round(server_round)]

    def seen_tasks(self, server_round: int) -> np.ndarray:
        if not self.settings.own_schedule:
            return super().seen_tasks(server_round)
        return np.isin(np.arange(self.num_tasks), self.schedule[:server_round])

    def client_task(self, server_round: int, client: int) -> int:
        return int(self._row(server_round)[client])

    def available_clients(self, server_round: int) -> list[int]:
        return np.flatnonzero(self._row(server_round) != ABSENT).tolist()

    def train_indices(self, server_round: int, client: int) -> np.ndarray:
        return self.parts[self.client_task(server_round, client)][client]

    def task_train_indices(self, task: int) -> np.ndarray:
        return np.flatnonzero(np.isin(self.y_train, self.classes[task]))

    def task_test_indices(self, task: int) -> np.ndarray:
        return self.test_of_task[task]

    def derived(self) -> dict[str, Any]:
        return {**super().derived(), "task_classes": [classes.tolist() for classes in self.classes]}

    def task_classes(self, task: int) -> np.ndarray | None:
        return self.classes[task] if self.settings.task_incremental else None
