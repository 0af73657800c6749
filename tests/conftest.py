"""Shared fixtures and the ``slow`` marker; the plain helpers are in helpers.py."""

from __future__ import annotations

from pathlib import Path

import pytest
from helpers import TINY, USER_CODE, USER_PYTHONPATH, run_experiment


def pytest_configure(config: pytest.Config) -> None:
    """Register the ``slow`` marker (unless the ini file already does)."""
    if any(line.split(":")[0].strip() == "slow" for line in config.getini("markers")):
        return
    config.addinivalue_line(
        "markers",
        "slow: one of the tests that take most of the suite's wall time (whole runs, subprocesses); "
        'the quick loop leaves them out: pytest -m "not slow and not ray"',
    )


@pytest.fixture(scope="session")
def tiny_run(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """One tiny local run shared by the tests that only read its run directory."""
    run_dir = tmp_path_factory.mktemp("tiny_run")
    run_experiment(run_dir, TINY)
    return run_dir


@pytest.fixture
def user_code(monkeypatch: pytest.MonkeyPatch) -> None:
    """tests/user_code importable here and, through PYTHONPATH, in Ray workers and run.py."""
    monkeypatch.syspath_prepend(str(USER_CODE))
    monkeypatch.setenv("PYTHONPATH", USER_PYTHONPATH)  # Ray workers import it too


@pytest.fixture(scope="module")
def ray_with_three_cpus():
    """One Ray for a test module's runs (each run still starts its own actors)."""
    import os

    import ray

    os.environ.setdefault("RAY_ACCEL_ENV_VAR_OVERRIDE_ON_ZERO", "0")  # as the Ray backend sets it
    ray.init(address="local", num_cpus=3, include_dashboard=False)  # ours, even where another Ray runs
    yield
    ray.shutdown()
