"""The benchmark workloads and what every implementation shares.

All implementations train the same clients on the same data: FedStream's own
loader and Dirichlet(0.5) partition, the same seeded cohort each round, the
same model, client method (local SGD; EWC on the ``_ewc`` workloads) and
hyperparameters. Each runs in its own process and reports, as its last stdout
line, one JSON object (:func:`report`).

The ResNet workloads (``R18``, ``R18aug``) read synthetic CIFAR-shaped images
(:class:`Images`) from a ``.npz`` that the first process to need it writes in
the temporary folder: every implementation then loads the same file with
FedStream's ``npz`` loader (``data.dataset=npz``), so they train the same
samples as the other workloads' implementations do.
"""

from __future__ import annotations

import json
import os
import tempfile
import time
from dataclasses import dataclass, replace
from pathlib import Path
from typing import Any

import numpy as np

from simulator.config import NO_AUGMENTATION
from simulator.seeding import Purpose, rng

REPORT_PREFIX = "BENCHMARK_REPORT "
WEIGHTS_ENV = "FEDSTREAM_BENCHMARK_WEIGHTS"  # where a child saves its final global weights (.npz), if set
WEIGHTS_TOLERANCE = 1e-6  # the most any weight may differ from the bare loop's
DATA_ENV = "FEDSTREAM_BENCHMARK_DATA"  # where Images files go (default: the temp folder's fedstream-benchmark-data)


@dataclass(frozen=True)
class Images:
    """Synthetic CIFAR-100-shaped data: ``train`` and ``test`` float32 images (3, size, size) in [0, 1]
    of ``classes`` labels (every label equally often, label i at sample i mod ``classes`` before a
    shuffle), each half its class's fixed random pattern and half noise, so a model can learn them.

    :meth:`path` writes them once as a ``.npz`` (``x``, ``y``, ``x_test``, ``y_test``) that
    ``data.dataset=npz`` reads: every implementation and process loads the same file.
    """

    train: int
    test: int
    classes: int = 100
    size: int = 32
    seed: int = 0

    def path(self) -> Path:
        """The ``.npz`` of these images, written first if it is not there (atomically: a process that
        reads it meanwhile finds the whole file or none). Its name holds every field, so it is the same
        file for the same images."""
        folder = Path(os.environ.get(DATA_ENV) or Path(tempfile.gettempdir()) / "fedstream-benchmark-data")
        file = folder / f"images-v1-{self.train}-{self.test}-{self.classes}-{self.size}-{self.seed}.npz"
        if file.exists():
            return file
        draw = np.random.default_rng(self.seed)
        shape = (3, self.size, self.size)
        patterns = draw.random((self.classes, *shape), dtype=np.float32)
        arrays = {}
        for suffix, count in (("", self.train), ("_test", self.test)):
            labels = np.arange(count, dtype=np.int64) % self.classes
            draw.shuffle(labels)
            noise = draw.random((count, *shape), dtype=np.float32)
            arrays[f"x{suffix}"], arrays[f"y{suffix}"] = np.float32(0.5) * (patterns[labels] + noise), labels
        folder.mkdir(parents=True, exist_ok=True)
        partial = folder / f"{file.stem}.{os.getpid()}.partial.npz"
        np.savez(partial, **arrays)
        os.replace(partial, file)
        return file


@dataclass(frozen=True)
class Workload:
    """One benchmark configuration."""

    name: str
    dataset: str  # digits | mnist5k | synthetic | npz (with images)
    num_clients: int
    clients_per_round: int
    rounds: int
    model: str  # cnn | mlp | resnet18
    epochs: int = 1
    batch_size: int = 32
    lr: float = 0.05
    seed: int = 0
    method: str = "sgd"  # client.method
    extra: tuple[str, ...] = ()  # further config overrides (the stream)
    partition: str = "dirichlet"  # data.partition.kind: dirichlet (alpha 0.5) | iid
    images: Images | None = None  # the data of data.dataset=npz
    augment: str = NO_AUGMENTATION  # data.augment

    def overrides(self) -> list[str]:
        """FedStream config overrides (as run.py takes them; simulator.config.compose_config) for this workload."""
        return [
            f"data.dataset={self.dataset}",
            *([f"data.path='{self.images.path()}'"] if self.images else []),
            f"data.augment={self.augment}",
            f"data.partition.kind={self.partition}",
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


def r18(
    name: str,
    images: Images,
    num_clients: int,
    rounds: int,
    batch_size: int,
    augment: str = NO_AUGMENTATION,
    clients_per_round: int = 2,
    epochs: int = 1,
    extra: tuple[str, ...] = (),
) -> Workload:
    """The shape of the ResNet-18 CIFAR-100 protocols (GLFC's: ``scenarios/scenario/cifar100_glfc.yaml``):
    ResNet-18 (CIFAR variant) on ``images`` (3x32x32 of 100 classes), plain SGD at ``batch_size`` on an IID
    split. The data are standardised per channel with ``augment`` or without, so that only the augmentation
    tells two such workloads apart."""
    return Workload(
        name,
        "npz",
        num_clients,
        clients_per_round,
        rounds,
        "resnet18",
        epochs=epochs,
        batch_size=batch_size,
        partition="iid",
        images=images,
        augment=augment,
        extra=("data.normalize=true", *extra),
    )


# A and B train enough local steps to learn in their rounds (bare loop: A 0.867, B 0.704 test accuracy),
# so a wrong aggregate shows in the accuracy as well as in the weights.
# C's clients hold 20 samples on average (lognormal sizes), as cross-device clients do, so that 100,000 of
# them are 2 million samples (480 MB of inputs) and a round trains the same ~2,000 samples at either scale.
C_DATA = ("data.synthetic.mean_samples=20",)
A = Workload("A", "mnist5k", 100, 10, 10, "cnn", epochs=5, lr=0.1, batch_size=16)
TINY = Workload("tiny", "digits", 20, 5, 3, "mlp")
R18_IMAGES = Images(train=256, test=64)
R18_EVAL = ("eval.client_test_size=20",)  # the clients' accuracies: a few forward passes on the driver
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
    # 4 clients of 64 images, 2 a round at batch 32: 4 steps a round (ResNet-18 on one core of 2: ~2 s a step).
    "R18": r18("R18", R18_IMAGES, 4, 3, 32),
    "R18aug": r18("R18aug", R18_IMAGES, 4, 3, 32, augment="crop_flip"),
    # The tests': 2 clients of 8 images of 16x16, one step each per round, two rounds (the second loads an aggregate).
    "tiny_r18aug": r18("tiny_r18aug", Images(16, 8, size=16), 2, 2, 8, augment="crop_flip"),
    # benchmarks/gpu_check.py --workload r18's, on a GPU: 8 clients of 512 images, all 8 a round (1, 2 or 4
    # actors get the same share each), 3 epochs at batch 128 (GLFC's); 100 test images (evaluated on the
    # driver's CPU). With --cpu: 4 clients of 8 images of 16x16, one step each per round.
    "r18_gpu": r18("r18_gpu", Images(4096, 100), 8, 3, 128, clients_per_round=8, epochs=3, extra=R18_EVAL),
    "r18_cpu": r18("r18_cpu", Images(32, 8, size=16), 4, 2, 8, clients_per_round=4, extra=R18_EVAL),
}


class RoundClock:
    """At each round's end: the wall clock (``time.time()``, comparable across processes) and this process's
    CPU seconds so far (``time.process_time()``, all its threads: the whole of an in-process implementation's
    work, the driver's alone where actors train)."""

    def __init__(self) -> None:
        self.ends: list[float] = []
        self.cpu: list[float] = []

    def tick(self) -> None:
        self.ends.append(time.time())
        self.cpu.append(time.process_time())


def report(clock: RoundClock, accuracy: float, samples: int, **extra: Any) -> None:
    """Print the child's result as the last stdout line, for the parent to read."""
    result = {"round_ends": clock.ends, "round_cpu": clock.cpu, "accuracy": accuracy, "samples": int(samples)}
    print(REPORT_PREFIX + json.dumps({**result, **extra}), flush=True)


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
