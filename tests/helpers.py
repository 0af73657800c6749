"""Shared test scaffolding: plain functions, constants and small classes (fixtures live in conftest.py).

Import it as ``from helpers import ...``: pytest puts tests/ on ``sys.path`` (the rootdir
conftest's folder), the same way test modules import ``conftest``.
"""

from __future__ import annotations

import contextlib
import gzip
import json
import os
import pickle
import shutil
import signal
import struct
import subprocess
import sys
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any, Callable

import numpy as np
import pytest
import torch
from flwr.app import ArrayRecord, Message, MessageType, MetricRecord, RecordDict
from flwr.supercore.task_identity import TaskIdentity

from clients.base import TrainContext
from clients.models import build_model
from simulator import checkpoint
from simulator.backends import LocalBackend
from simulator.client_state import ClientStateStore
from simulator.config import ExperimentConfig, ModelConfig, compose_config
from simulator.data import Dataset, load_dataset
from simulator.engine import Experiment
from simulator.grid import SimulationGrid
from simulator.plugins import load_config
from simulator.streams import build_stream
from simulator.worker import WorkerData
from strategies import build_strategy

ROOT = Path(__file__).resolve().parent.parent
TINY = ["rounds=3", "engine.backend=local"]  # a few seconds on digits
USER_CODE = ROOT / "tests" / "user_code"  # the user's modules the tests name by dotted path
USER_PYTHONPATH = f"{USER_CODE}:{ROOT}"  # PYTHONPATH for a run.py or Ray worker that imports them


# --- Runs in this process and their run directories -------------------------------------------


def compose_run(overrides: list[str]) -> ExperimentConfig:
    """The validated run config for ``overrides``."""
    return load_config(compose_config(overrides))


def run_experiment(
    run_dir: Path, overrides: list[str], resume: bool = False, keep_warm: bool = False
) -> dict[str, Any]:
    """Run a scenario in this process (the backend is whatever the overrides say); its summary.
    ``keep_warm``: leave Ray and the actors up for a next run, as a sweep's job does."""
    cfg = compose_config(overrides)
    run = load_config(cfg)
    strategy = build_strategy(cfg.strategy)
    return Experiment(run, strategy, run_dir, resume=resume, keep_warm=keep_warm).run()


def read_metrics(run_dir: Path) -> list[dict[str, Any]]:
    """The records of ``run_dir/metrics.jsonl``."""
    return [json.loads(line) for line in (run_dir / "metrics.jsonl").read_text().splitlines()]


def timeless_records(run_dir: Path) -> list[dict[str, Any]]:
    """The records of ``run_dir/metrics.jsonl`` without their wall times: what must match run to run."""
    return [{k: v for k, v in r.items() if k != "wall_s"} for r in read_metrics(run_dir)]


def without_wall_time(summary: dict[str, Any]) -> dict[str, Any]:
    """A summary without its ``wall_time_s``: what must match run to run."""
    return {k: v for k, v in summary.items() if k != "wall_time_s"}


def numbers_of(run_dir: Path) -> tuple[list[dict[str, Any]], dict[str, Any]]:
    """metrics.jsonl and summary.json without their wall times: what must match run to run."""
    summary = json.loads((run_dir / "summary.json").read_text())
    return timeless_records(run_dir), without_wall_time(summary)


def saved_strategy_state(checkpoints: Path, layer: int = 0) -> dict[str, Any]:
    """What the strategy's ``layer`` (0: the outermost) declared as its own state in the newest checkpoint."""
    return checkpoint.load(checkpoints).strategy[layer].state["own"]


def final_checkpoint(run_dir: Path) -> tuple[dict[str, np.ndarray], dict[int, dict]]:
    """The global arrays and every client's state, as the run's last checkpoint left them."""
    saved = checkpoint.load(run_dir / "checkpoints")
    store = ClientStateStore(run_dir / "client_state", 0, saved.client_states)
    arrays = {key: array.numpy() for key, array in saved.arrays.items()}
    return arrays, {client: store.get(client) for client in saved.client_states.files}


def write_hydra_overrides(run_dir: Path, overrides: list[str]) -> None:
    """``run_dir/.hydra/overrides.yaml`` as Hydra writes it: one ``- override`` line each."""
    (run_dir / ".hydra").mkdir(parents=True, exist_ok=True)
    (run_dir / ".hydra" / "overrides.yaml").write_text("".join(f"- {o}\n" for o in overrides))


# --- run.py and the modules' command lines, in subprocesses -----------------------------------


def run_command_line(args: list[str], pythonpath: str | Path | None = None) -> subprocess.CompletedProcess:
    """``python run.py ARGS`` to its end (at most 300 s), its output captured as text; with
    ``pythonpath``, that is the command's PYTHONPATH."""
    env = dict(os.environ)
    if pythonpath is not None:
        env["PYTHONPATH"] = str(pythonpath)
    return subprocess.run(
        [sys.executable, "run.py", *args], cwd=ROOT, env=env, capture_output=True, text=True, timeout=300
    )


def run_module(module: str, *args: str) -> subprocess.CompletedProcess:
    """``python -m MODULE ARGS`` (simulator.plot, simulator.report) to its end, its output as text."""
    return subprocess.run([sys.executable, "-m", module, *args], cwd=ROOT, capture_output=True, text=True, timeout=60)


def start_run_py(run_dir: Path, overrides: list[str]) -> subprocess.Popen:
    """``python run.py`` in its own process group (so a test can kill it and its Ray with one signal)."""
    command = [sys.executable, "run.py", f"hydra.run.dir={run_dir}", *overrides]
    return subprocess.Popen(
        command, cwd=ROOT, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, start_new_session=True
    )


def run_py_to_the_end(run_dir: Path, overrides: list[str], timeout_s: float = 120) -> None:
    """``python run.py`` (see :func:`start_run_py`), which must end with exit code 0 within ``timeout_s``."""
    process = start_run_py(run_dir, overrides)
    assert process.wait(timeout=timeout_s) == 0, process.stderr.read().decode()[-2000:]


def kill_after_records(run_dir: Path, overrides: list[str], records: int, timeout_s: float = 60.0) -> int:
    """Start ``python run.py``, SIGKILL it (and its Ray) once ``metrics.jsonl`` has ``records`` lines;
    the lines it had when it died."""
    killed, metrics = start_run_py(run_dir, overrides), run_dir / "metrics.jsonl"
    deadline = time.monotonic() + timeout_s
    while not (metrics.exists() and len(metrics.read_text().splitlines()) >= records):
        assert killed.poll() is None and time.monotonic() < deadline, "the run ended before it was killed"
        time.sleep(0.005)
    os.killpg(killed.pid, signal.SIGKILL)
    killed.wait(timeout=30)
    return len(metrics.read_text().splitlines())


def wait_for_free_cpus(cpus: float, timeout_s: float = 30.0) -> None:
    """Wait until the shared Ray has ``cpus`` free: the actors of a run that just ended leave asynchronously."""
    import ray

    deadline = time.monotonic() + timeout_s
    while ray.available_resources().get("CPU", 0.0) < cpus:
        assert time.monotonic() < deadline, f"Ray never freed {cpus} CPUs: {ray.available_resources()}"
        time.sleep(0.05)


def one_error_line(message: str) -> str:
    """The one ``error:`` line of a command-line error's ``message``: no traceback, nothing else that says error."""
    assert "Traceback" not in message, message
    errors = [line for line in message.splitlines() if "error:" in line]
    assert len(errors) == 1, message
    return errors[0]


@contextlib.contextmanager
def small_file_system(folder: Path, size: str) -> Iterator[Path]:
    """``folder``, made a file system of ``size`` (``1m``, ``64k``) of its own for the block, to fill: a tmpfs
    (mounting one needs root, so the test is skipped where it is refused)."""
    folder.mkdir()
    if not shutil.which("mount") or sys.platform != "linux":
        pytest.skip("no mount command: cannot make a small file system to fill")
    mounted = subprocess.run(["mount", "-t", "tmpfs", "-o", f"size={size}", "tmpfs", str(folder)], capture_output=True)
    if mounted.returncode != 0:
        pytest.skip(f"cannot mount a small tmpfs here: {mounted.stderr.decode().strip()}")
    try:
        yield folder
    finally:
        subprocess.run(["umount", "-l", str(folder)], check=False)


def fill_leaving(disk: Path, free_bytes: int) -> None:
    """Fill the file system of ``disk`` with one file until only ``free_bytes`` are left."""
    stats = os.statvfs(disk)
    (disk / "filler").write_bytes(bytes(max(0, stats.f_bavail * stats.f_frsize - free_bytes)))


# --- Data and streams of a config --------------------------------------------------------------


def dataset_of(run: ExperimentConfig) -> Dataset:
    """The dataset ``run`` trains on, split among its clients with its seed."""
    return load_dataset(run.data, run.federation.num_clients, run.seed)


def stream_of(run: ExperimentConfig):
    """The stream ``run`` trains on, over :func:`dataset_of`."""
    return build_stream(run, dataset_of(run))


# --- Tiny models and contexts for a client method on its own ------------------------------------


def tiny_model(seed: int = 0) -> torch.nn.Module:
    """A small MLP (16 hidden units, 8 features) on 8x8 one-channel inputs, 10 classes, seeded."""
    return build_model((1, 8, 8), 10, ModelConfig(hidden=16, feature_dim=8), torch.Generator().manual_seed(seed))


def tiny_images() -> tuple[torch.Tensor, torch.Tensor]:
    """40 random 8x8 one-channel images (torch seed 1) and their labels, 0 to 9 in turn."""
    return torch.rand(40, 1, 8, 8, generator=torch.Generator().manual_seed(1)), torch.arange(40) % 10


def train_context(
    state: dict | None = None, *, server_round: int = 2, lr: float = 0.1, config: dict | None = None, **fields: Any
) -> TrainContext:
    """Client 0's TrainContext with a generator seeded 5; ``fields``: TrainContext's other fields."""
    return TrainContext(
        server_round=server_round,
        client_id=0,
        config=config or {},
        generator=torch.Generator().manual_seed(5),
        lr=lr,
        state={} if state is None else state,
        **fields,
    )


# --- Flower messages and our Grid, by hand -------------------------------------------------------


def flower_task_identity() -> None:
    """Set Flower's TaskIdentity (run 1, node 1, task 0) as a ServerApp would: messages need one."""
    TaskIdentity.run_id, TaskIdentity.node_id, TaskIdentity.task_id = 1, 1, 0


def local_grid(
    run: ExperimentConfig, stream, state_dir: Path, backend: Callable[..., LocalBackend] = LocalBackend
) -> SimulationGrid:
    """Our Grid over the in-process ``backend`` for ``stream`` (client test samples of 50, states
    under ``state_dir``), with Flower's TaskIdentity set."""
    flower_task_identity()
    return SimulationGrid(
        backend(run, WorkerData.of(stream)), stream, ClientStateStore(state_dir, 0), client_test_size=50, run_id=1
    )


def train_reply(node: int, arrays: ArrayRecord, metrics: dict[str, Any]) -> Message:
    """Node ``node``'s reply to a TRAIN message (id ``m<node>``): ``arrays`` and ``metrics``."""
    sent = Message(RecordDict({}), dst_node_id=node, message_type=MessageType.TRAIN)
    sent.metadata.__dict__["_message_id"] = f"m{node}"
    content = RecordDict({"arrays": arrays, "metrics": MetricRecord(metrics)})
    return Message(content, reply_to=sent)


# --- Dataset files in their formats ----------------------------------------------------------------


def idx_bytes(array: np.ndarray) -> bytes:
    """``array`` as an MNIST idx file: the magic (uint8, its ndim), its shape, its bytes."""
    magic = struct.pack(">BBBB", 0, 0, 0x08, array.ndim)  # two zero bytes, uint8, ndim
    return magic + struct.pack(f">{array.ndim}I", *array.shape) + array.astype(np.uint8).tobytes()


def write_idx_files(folder: Path, arrays: dict[str, np.ndarray], gz: bool) -> None:
    """Each of ``arrays`` as the idx file ``folder/NAME`` (``NAME.gz``, gzipped, with ``gz``)."""
    for name, array in arrays.items():
        data = idx_bytes(array)
        if gz:
            (folder / f"{name}.gz").write_bytes(gzip.compress(data))
        else:
            (folder / name).write_bytes(data)


def write_pickle(file: Path, data: np.ndarray, labels: dict[bytes, list[int]]) -> None:
    """A CIFAR python batch: ``data`` (N x 3072 uint8) and the ``labels`` keys, pickled to ``file``."""
    with file.open("wb") as handle:
        pickle.dump({b"batch_label": b"x", b"data": data, **labels}, handle)


def cifar_images(n: int, seed: int) -> np.ndarray:
    """``n`` random CIFAR images as a batch stores them: rows of 3072 uint8, the planes one after another."""
    return np.random.default_rng(seed).integers(0, 256, (n, 3072), dtype=np.uint8)
