"""The benchmark workloads and what every implementation shares.

All implementations train the same clients on the same data: FedStream's own
loader and Dirichlet(0.5) partition, the same seeded cohort each round, the
same model, client method (local SGD; EWC on the ``_ewc`` workloads) and
hyperparameters. Each runs in its own process and reports, as its last stdout
line, one JSON object (:func:`report`).
"""

from __future__ import annotations

import json
import os
import time
from dataclasses import dataclass, replace
from typing import Any

import numpy as np

from simulator.seeding import Purpose, rng

REPORT_PREFIX = "BENCHMARK_REPORT "
WEIGHTS_ENV = "FEDSTREAM_BENCHMARK_WEIGHTS"  # where a child saves its final global weights (.npz), if set
WEIGHTS_TOLERANCE = 1e-6  # the most any weight may differ from the bare loop's


@dataclass(frozen=True)
class Workload:
    """One benchmark configuration."""

    name: str
    dataset: str  # digits | mnist5k | synthetic
    num_clients: int
    clients_per_round: int
    rounds: int
    model: str  # cnn | mlp
    epochs: int = 1
    batch_size: int = 32
    lr: float = 0.05
    seed: int = 0
    method: str = "sgd"  # client.method
    extra: tuple[str, ...] = ()  # further config overrides (the stream)

    def overrides(self) -> list[str]:
        """FedStream config overrides (as run.py takes them; simulator.config.compose_config) for this workload."""
        return [
            f"data.dataset={self.dataset}",
            "data.partition.kind=dirichlet",
            "data.partition.alpha=0.5",
            "data.partition.min_size=0",
            f"federation.num_clients={self.num_clients}",
            f"federation.clients_per_round={self.clients_per_round}",
            f"model.name={self.model}",
            f"client.method={self.method}",
            f"client.lr={self.lr}",
            "client.momentum=0.0",
            f"client.epochs={self.epochs}",
            f"client.batch_size={self.batch_size}",
            f"rounds={self.rounds}",
            f"seed={self.seed}",
            f"eval.every={self.rounds}",
            "eval.max_clients=10",
            "eval.probes=false",
            "engine.checkpoint_every=0",
            *self.extra,
        ]

    def cohort(self, server_round: int) -> list[int]:
        """The clients that train in ``server_round`` (1-based), sorted: the same for every implementation."""
        draw = rng(self.seed, Purpose.STRATEGY, server_round, 99)
        return sorted(draw.choice(self.num_clients, self.clients_per_round, replace=False).tolist())


def with_ewc(base: Workload, name: str, rounds_per_task: int) -> Workload:
    """``base`` with online EWC clients on a permuted (domain-incremental) stream of 5 tasks.

    On a static stream a client never reaches a task boundary, so EWC would
    train exactly as SGD does. Here every client keeps ``base``'s partition and
    sees it under a new pixel permutation each task (Permuted MNIST, EWC's own
    benchmark), so a round trains the same samples as ``base``; a client that
    trains again on a later task first estimates the Fisher of the task it
    left, and from then on its job carries its state (Fisher and anchor: two
    model-sized float32 vectors).
    """
    tasks = 5
    stream = ("stream.kind=permuted", f"stream.permuted.num_tasks={tasks}", f"stream.rounds_per_task={rounds_per_task}")
    return replace(base, name=name, rounds=tasks * rounds_per_task, method="ewc", extra=stream)


# A and B train enough local steps to learn in their rounds (bare loop: A 0.867, B 0.704 test accuracy),
# so a wrong aggregate shows in the accuracy as well as in the weights.
# C's clients hold 20 samples on average (lognormal sizes), as cross-device clients do, so that 100,000 of
# them are 2 million samples (480 MB of inputs) and a round trains the same ~2,000 samples at either scale.
C_DATA = ("data.synthetic.mean_samples=20",)
A = Workload("A", "mnist5k", 100, 10, 10, "cnn", epochs=5, lr=0.1, batch_size=16)
TINY = Workload("tiny", "digits", 20, 5, 3, "mlp")
WORKLOADS = {
    "A": A,
    "B": Workload("B", "mnist5k", 500, 50, 5, "cnn", epochs=10, lr=0.1, batch_size=8),
    "C": Workload("C", "synthetic", 100_000, 100, 5, "mlp", extra=C_DATA),
    "C1k": Workload("C1k", "synthetic", 1_000, 100, 5, "mlp", extra=C_DATA),
    "quick": Workload("quick", "mnist5k", 100, 10, 4, "cnn"),
    "tiny": TINY,
    # A's clients and cohorts with its first settings (one epoch at batch 32), as measured for issue 8.
    "A_ewc": with_ewc(replace(A, epochs=1, lr=0.05, batch_size=32), "A_ewc", rounds_per_task=2),
    "tiny_ewc": with_ewc(TINY, "tiny_ewc", rounds_per_task=1),
}


class RoundClock:
    """Wall-clock timestamps (``time.time()``, comparable across processes) at each round's end."""

    def __init__(self) -> None:
        self.ends: list[float] = []

    def tick(self) -> None:
        self.ends.append(time.time())


def report(clock: RoundClock, accuracy: float, samples: int, **extra: Any) -> None:
    """Print the child's result as the last stdout line, for the parent to read."""
    print(
        REPORT_PREFIX + json.dumps({"round_ends": clock.ends, "accuracy": accuracy, "samples": int(samples), **extra}),
        flush=True,
    )


def save_weights(arrays: list[np.ndarray]) -> None:
    """Save the final global weights where the parent asked (``WEIGHTS_ENV``), in order."""
    path = os.environ.get(WEIGHTS_ENV)
    if path:
        np.savez(path, *arrays)


def load_weights(path: str) -> list[np.ndarray]:
    """The weights a child saved with :func:`save_weights` (none: the child saved nothing)."""
    if not os.path.exists(path):
        return []
    with np.load(path) as file:
        return [file[f"arr_{i}"] for i in range(len(file.files))]


def max_difference(arrays: list[np.ndarray], reference: list[np.ndarray]) -> float:
    """The largest absolute difference between two lists of weights (inf where they are missing or differ in shape)."""
    if not arrays or [a.shape for a in arrays] != [r.shape for r in reference]:
        return float("inf")
    return max(float(np.max(np.abs(a.astype(np.float64) - r))) for a, r in zip(arrays, reference))


def parse_report(stdout: str) -> dict[str, Any]:
    """The JSON object a child printed with :func:`report`."""
    for line in reversed(stdout.splitlines()):
        if line.startswith(REPORT_PREFIX):
            return json.loads(line[len(REPORT_PREFIX) :])
    raise RuntimeError("the implementation printed no report:\n" + stdout[-3000:])


def shared_data(workload: Workload):
    """(experiment config, stream) as FedStream builds them: the data and partition every implementation uses."""
    from simulator.config import compose_config
    from simulator.data import load_dataset
    from simulator.plugins import load_config
    from simulator.streams import build_stream

    config = load_config(compose_config(workload.overrides()))
    stream = build_stream(config, load_dataset(config.data, config.federation.num_clients, config.seed))
    return config, stream


def samples_of(stream, workload: Workload) -> int:
    """Samples trained in the whole run: every cohort's clients' data, every epoch."""
    return sum(
        len(stream.train_indices(r, c)) * workload.epochs
        for r in range(1, workload.rounds + 1)
        for c in workload.cohort(r)
    )
