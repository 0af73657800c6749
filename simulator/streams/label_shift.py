"""Label shift: each client's label distribution p(y) changes over rounds, p(x|y) stays.

Each client keeps its ``data.partition`` share as a pool; each round it trains
on a sample of the pool's size drawn under its current label prior (labels
missing from its pool dropped, the rest renormalized; samples of a label taken
uniformly from the pool, with replacement). Priors are Dirichlet(alpha) draws,
changing every ``period`` rounds:

- ``abrupt``: new priors for every client at each period (the prior-shift
  setting of e.g. Guo et al. 2024, "FedCCFA");
- ``gradual``: the prior moves linearly from one period's draw to the next;
- ``swap``: the clients exchange their priors (a seeded permutation per period).

Task k is period k; its test set is the test set resampled under the mean
prior of the clients in that period, so the accuracy matrix measures how the
model does on earlier label mixes.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np

from simulator.config import ConfigError, ExperimentConfig
from simulator.data import Dataset, sample_by_label
from simulator.seeding import Draw, Purpose, rng
from simulator.streams.base import Stream

MODES = ("abrupt", "gradual", "swap")


@dataclass(frozen=True)
class LabelShiftSettings:
    """``stream.label_shift.*``."""

    mode: str = "abrupt"  # abrupt | gradual | swap
    period: int = 10  # rounds between new (or swapped) label priors
    alpha: float = 0.5  # Dirichlet concentration of each client's label prior

    def problems(self) -> list[tuple[str, str]]:
        checks = [
            ("mode", self.mode in MODES, f"expected one of {', '.join(MODES)}"),
            ("period", self.period >= 1, "must be at least 1"),
            ("alpha", self.alpha > 0, "Dirichlet concentration must be > 0"),
        ]
        return [(key, reason) for key, ok, reason in checks if not ok]


class LabelShiftStream(Stream):
    """Per-client label priors that change every ``period`` rounds."""

    Settings = LabelShiftSettings
    section = "label_shift"

    def __init__(self, config: ExperimentConfig, dataset: Dataset) -> None:
        super().__init__(config, dataset)
        if config.rounds is None:
            raise ConfigError("rounds = None: a label_shift stream needs rounds set")
        self.num_tasks = -(-config.rounds // self.settings.period)
        self.pools = self.split(self.y_train, dataset.groups_train)
        draws = self.num_tasks + 1  # gradual interpolates towards the next period's draw
        self.priors = np.stack([self._draw(k) for k in range(draws)])  # (periods, clients, classes)
        self.task_tests = [self._task_test(k) for k in range(self.num_tasks)]

    def _draw(self, period: int) -> np.ndarray:
        concentration = np.full(self.num_classes, self.settings.alpha)
        if self.settings.mode == "swap":
            first = rng(self.seed, Purpose.DATA, Draw.LABEL_PRIOR, 0).dirichlet(concentration, self.num_clients)
            order = rng(self.seed, Purpose.DATA, Draw.PRIOR_SWAP, period).permutation(self.num_clients)
            return first[order] if period else first
        return rng(self.seed, Purpose.DATA, Draw.LABEL_PRIOR, period).dirichlet(concentration, self.num_clients)

    def _task_test(self, period: int) -> np.ndarray:
        generator = rng(self.seed, Purpose.DATA, Draw.PERIOD_TEST_SET, period)
        return sample_by_label(self.y_test, self.priors[period].mean(axis=0), len(self.y_test), generator)

    @property
    def default_rounds(self) -> int | None:
        return None

    def task_of_round(self, server_round: int) -> int:
        return min((server_round - 1) // self.settings.period, self.num_tasks - 1)

    def client_label_distribution(self, server_round: int, client: int) -> np.ndarray:
        period = self.task_of_round(server_round)
        prior = self.priors[period, client]
        if self.settings.mode == "gradual":
            step = ((server_round - 1) % self.settings.period) / self.settings.period
            prior = (1 - step) * prior + step * self.priors[period + 1, client]
        return prior

    def train_indices(self, server_round: int, client: int) -> np.ndarray:
        pool = self.pools[client]
        generator = rng(self.seed, Purpose.CLIENT_TRAIN, server_round, client, Draw.LABEL_SHIFT_SAMPLE)
        return pool[
            sample_by_label(
                self.y_train[pool], self.client_label_distribution(server_round, client), len(pool), generator
            )
        ]

    def task_test_indices(self, task: int) -> np.ndarray:
        return self.task_tests[task]
