"""Shared helpers: compose a config the way run.py does, and run it in-process."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path
from typing import Any

import pytest
from simulator.config import RunConfig, compose_config, load_config
from simulator.engine import Experiment
from strategies import build_strategy

ROOT = Path(__file__).resolve().parent.parent
TINY = ["rounds=3", "engine.backend=local"]  # a few seconds on digits


def compose_run(overrides: list[str]) -> RunConfig:
    """The validated run config for ``overrides``."""
    return load_config(compose_config(overrides))


def run_experiment(run_dir: Path, overrides: list[str], resume: bool = False) -> dict[str, Any]:
    """Run a scenario in this process (the backend is whatever the overrides say)."""
    cfg = compose_config(overrides)
    run = load_config(cfg)
    strategy = build_strategy(cfg.strategy)
    return Experiment(run, strategy, run_dir, resume=resume).run()


def read_metrics(run_dir: Path) -> list[dict[str, Any]]:
    """The records of ``run_dir/metrics.jsonl``."""
    return [json.loads(line) for line in (run_dir / "metrics.jsonl").read_text().splitlines()]


@pytest.fixture(scope="session")
def tiny_run(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """One tiny local run shared by the tests that only read its run directory."""
    run_dir = tmp_path_factory.mktemp("tiny_run")
    run_experiment(run_dir, TINY)
    return run_dir


def numbers_of(run_dir: Path) -> tuple[list[dict[str, Any]], dict[str, Any]]:
    """metrics.jsonl and summary.json without their wall times: what must match run to run."""
    records = [{k: v for k, v in r.items() if k != "wall_s"} for r in read_metrics(run_dir)]
    summary = json.loads((run_dir / "summary.json").read_text())
    summary.pop("wall_time_s")
    return records, summary


def start_run_py(run_dir: Path, overrides: list[str]) -> subprocess.Popen:
    """``python run.py`` in its own process group (so a test can kill it and its Ray with one signal)."""
    command = [sys.executable, "run.py", f"hydra.run.dir={run_dir}", *overrides]
    return subprocess.Popen(command, cwd=ROOT, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE,
                            start_new_session=True)


def kill_after_records(run_dir: Path, overrides: list[str], records: int, timeout_s: float = 60.0) -> int:
    """Start ``python run.py``, SIGKILL it (and its Ray) once ``metrics.jsonl`` has ``records`` lines;
    the lines it had when it died."""
    import os
    import signal
    import time

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
    import time

    import ray

    deadline = time.monotonic() + timeout_s
    while ray.available_resources().get("CPU", 0.0) < cpus:
        assert time.monotonic() < deadline, f"Ray never freed {cpus} CPUs: {ray.available_resources()}"
        time.sleep(0.05)


@pytest.fixture(scope="module")
def ray_with_three_cpus():
    """One Ray for a test module's runs (each run still starts its own actors)."""
    import os

    import ray

    os.environ.setdefault("RAY_ACCEL_ENV_VAR_OVERRIDE_ON_ZERO", "0")  # as the Ray backend sets it
    ray.init(address="local", num_cpus=3, include_dashboard=False)  # ours, even where another Ray runs
    yield
    ray.shutdown()
