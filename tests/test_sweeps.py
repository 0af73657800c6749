"""Sweeps: the jobs of a --multirun in one process share one Ray and its warm actors, with solo numbers."""

from __future__ import annotations

import json

import pytest
import ray
from helpers import numbers_of, run_experiment

import run as run_py
from simulator import backends
from simulator.backends import ClientFailure

pytestmark = pytest.mark.ray
SHORT = ["rounds=3", "eval.probes=false"]


@pytest.fixture
def warm_pools():
    """Whatever a test leaves warm is released after it (other tests start their own Ray)."""
    yield
    backends._WARM.release()
    assert not ray.is_initialized()


def test_a_two_job_sweep_starts_one_ray_and_one_pool_and_gives_each_job_its_solo_numbers(
    tmp_path, monkeypatch, warm_pools
):
    started = []
    original = backends.RayBackend._start
    monkeypatch.setattr(
        backends.RayBackend, "_start", lambda self, run: started.append(run.seed) or original(self, run)
    )
    code = run_py.main_cli(["--multirun", "seed=0,1", *SHORT, f"hydra.sweep.dir={tmp_path / 'sweep'}"])
    assert code == 0 and started == [0]  # the second job reused the first job's Ray and actors
    assert backends._WARM.pool is not None and ray.is_initialized()  # kept for a next job until exit
    for seed in (0, 1):
        run_experiment(tmp_path / f"solo{seed}", [*SHORT, f"seed={seed}", "engine.backend=local"])
        (job,) = (tmp_path / "sweep").glob(f"{seed}_*")
        assert numbers_of(job) == numbers_of(tmp_path / f"solo{seed}"), f"seed {seed}"


def test_a_failing_job_releases_its_pool_so_the_next_job_runs_as_if_alone(tmp_path, user_code, warm_pools):
    with pytest.raises(ClientFailure):
        run_experiment(
            tmp_path / "failing",
            [*SHORT, "client.method=failing_client.FailsOnClientThree", "federation.clients_per_round=20"],
            keep_warm=True,
        )
    assert backends._WARM.pool is None and not ray.is_initialized()  # nothing of it is left to reuse
    run_experiment(tmp_path / "next", SHORT, keep_warm=True)
    run_experiment(tmp_path / "solo", [*SHORT, "engine.backend=local"])
    assert numbers_of(tmp_path / "next") == numbers_of(tmp_path / "solo")


def test_a_pool_of_another_shape_is_replaced_and_the_job_keeps_its_numbers(tmp_path, warm_pools):
    run_experiment(tmp_path / "two", SHORT, keep_warm=True)
    first = backends._WARM.pool
    run_experiment(tmp_path / "three", [*SHORT, "engine.num_actors=1"], keep_warm=True)
    assert backends._WARM.pool is not first and len(backends._WARM.pool.actors) == 1
    assert numbers_of(tmp_path / "three") == numbers_of(tmp_path / "two")
    summary = json.loads((tmp_path / "three" / "summary.json").read_text())
    assert summary["rounds"] == 3


def test_a_failing_job_in_a_command_line_sweep_lets_the_others_run_and_the_command_says_so(
    tmp_path, user_code, capsys, warm_pools
):
    methods = "client.method=sgd,failing_client.FailsOnClientThree,lwf"
    code = run_py.main_cli(
        ["--multirun", methods, *SHORT, "federation.clients_per_round=20", f"hydra.sweep.dir={tmp_path / 'sweep'}"]
    )
    assert code == 1  # a client failed: the sweep's exit code says so
    assert "client 3 failed" in capsys.readouterr().err
    jobs = sorted((tmp_path / "sweep").glob("[0-9]_*"))
    assert [(job / "summary.json").exists() for job in jobs] == [True, False, True]
    run_experiment(
        tmp_path / "solo", [*SHORT, "federation.clients_per_round=20", "client.method=lwf", "engine.backend=local"]
    )
    assert numbers_of(jobs[2]) == numbers_of(tmp_path / "solo")  # the job after the failure, as if alone
