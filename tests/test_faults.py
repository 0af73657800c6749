"""Faults end the run loudly, naming what failed: hangs, divergence, a client's exit or bad reply, bad inputs."""

from __future__ import annotations

import subprocess
import sys
import time

import numpy as np
import psutil
import pytest
import ray
from helpers import (
    ROOT,
    TINY,
    USER_PYTHONPATH,
    compose_run,
    read_metrics,
    run_command_line,
    run_experiment,
    timeless_records,
)

from simulator.backends import ClientFailure
from simulator.config import ConfigError
from simulator.worker import BadReply, check_metrics

EVERY_CLIENT = ["federation.clients_per_round=20", "strategy.min_available_nodes=20"]


@pytest.mark.parametrize(
    ("overrides", "message"),
    [
        (["strategy.fraction_train=2.0"], r"strategy\.fraction_train = 2\.0: must be in \(0, 1\]; Flower would wait"),
        (
            ["strategy.fraction_evaluate=2.0", "eval.federated=true"],
            r"strategy\.fraction_evaluate = 2\.0: must be in \[0, 1\]",
        ),
        (
            ["strategy.fraction_train=0", "strategy.min_train_nodes=0"],
            r"strategy\.fraction_train = 0: must be in \(0, 1\]",
        ),
        (
            ["strategy.fraction_train=0.01", "strategy.min_train_nodes=0"],
            r"fraction_train = 0\.01 with strategy\.min_train_nodes = 0 samples no client",
        ),
        (["strategy.min_train_nodes=21"], r"strategy\.min_train_nodes = 21: only 20 clients are present"),
    ],
)
def test_sampling_flower_would_wait_on_forever_or_that_trains_nobody_is_rejected(tmp_path, overrides, message):
    with pytest.raises(ConfigError, match=message):
        run_experiment(tmp_path, [*TINY, *overrides])
    assert not (tmp_path / "metrics.jsonl").exists()


@pytest.mark.parametrize(
    ("backend", "method"),
    [
        ("local", "BlocksOnClientThree"),
        ("local", "SwallowsErrorsAndBlocksOnClientThree"),
        pytest.param("ray", "BlocksOnClientThree", marks=pytest.mark.ray),
    ],
)
@pytest.mark.slow
def test_a_blocking_client_fails_the_run_within_its_timeout_naming_client_and_round(
    tmp_path, user_code, backend, method
):
    overrides = [
        "rounds=3",
        f"engine.backend={backend}",
        *EVERY_CLIENT,
        "engine.client_timeout_s=2",
        f"client.method=faulty_clients.{method}",
    ]
    started = time.monotonic()
    with pytest.raises(ClientFailure, match=r"client 3 ran longer than engine.client_timeout_s = 2\.0 s in round 2"):
        run_experiment(tmp_path, overrides)
    assert time.monotonic() - started < 30
    assert [r["round"] for r in read_metrics(tmp_path)] == [1]  # round 1 finished and was kept
    assert not ray.is_initialized()  # the actors and Ray are cleaned up


@pytest.mark.parametrize("backend", ["local", pytest.param("ray", marks=pytest.mark.ray)])
def test_a_client_that_exits_fails_the_run_instead_of_ending_it_as_a_success(tmp_path, user_code, backend):
    overrides = [
        "rounds=2",
        f"engine.backend={backend}",
        *EVERY_CLIENT,
        "client.method=faulty_clients.ExitsOnClientThree",
    ]
    with pytest.raises(ClientFailure, match=r"client 3 failed in round 1"):
        run_experiment(tmp_path, overrides)


@pytest.mark.slow
@pytest.mark.parametrize(
    ("method", "message"),
    [
        ("SysExitsOnClientThree", "SystemExit: 0"),
        ("OsExitsOnClientThree", "ExitCalled: client 3 called os._exit(0) in round 2: on the local backend"),
        ("StringMetricOnClientThree", "StringMetricOnClientThree.end returned metrics['note'] = 'hello' (a str)"),
    ],
)
def test_a_client_that_ends_its_process_or_replies_badly_exits_1_naming_client_and_round(tmp_path, method, message):
    """On the local backend the client runs in the driver: its sys.exit(0) or os._exit(0) would end the
    command as a success (os._exit with no word at all), and a string metric failed in Flower's MetricRecord
    with a driver traceback that named no client."""
    done = run_command_line(
        [f"hydra.run.dir={tmp_path}", *TINY, *EVERY_CLIENT, f"client.method=exiting_clients.{method}"],
        pythonpath=USER_PYTHONPATH,
    )
    assert done.returncode == 1 and "error: client 3 failed in round 2:\n" in done.stderr
    assert message in done.stderr and message in (tmp_path / "run.log").read_text()
    assert not (tmp_path / "summary.json").exists()


@pytest.mark.slow
def test_a_client_thread_that_calls_os_exit_ends_the_run_with_exit_1_naming_client_and_round(tmp_path):
    done = run_command_line(
        [
            f"hydra.run.dir={tmp_path}",
            *TINY,
            *EVERY_CLIENT,
            "client.method=exiting_clients.OsExitsInAThreadOnClientThree",
        ],
        pythonpath=USER_PYTHONPATH,
    )
    said = "client 3 called os._exit(0) in round 2 from a thread of its own: the run ends here, with exit code 1"
    assert done.returncode == 1 and said in done.stdout + done.stderr and said in (tmp_path / "run.log").read_text()


@pytest.mark.parametrize(
    ("metrics", "message"),
    [
        ({"note": "hello"}, r"X\.end returned metrics\['note'\] = 'hello' \(a str\); a metric is an int or a float"),
        ({"flag": True}, r"metrics\['flag'\] = True \(a bool\)"),
        ({"loss": np.float32(0.5)}, r"metrics\['loss'\] = np\.float32\(0\.5\) \(a float32\).*numpy: float\(\)"),
        ({"mixed": [1, 2.0]}, r"metrics\['mixed'\] = \[1, 2\.0\] \(a list of float, int\)"),
        ({3: 1.0}, r"X\.end returned a metric named 3 \(int\): names are strings"),
        (None, r"X\.end returned None \(NoneType\), not a dict of metrics"),
    ],
)
def test_metrics_flower_cannot_carry_are_refused_naming_the_method_key_and_value(metrics, message):
    with pytest.raises(BadReply, match=message):
        check_metrics(metrics, "X.end")


def test_metrics_flower_takes_pass():
    check_metrics({"a": 1, "b": 0.5, "c": np.float64(2.0), "d": [1, 2], "e": [0.5], "f": []}, "X.end")


def test_a_nan_client_stops_the_run_naming_round_and_client(tmp_path, user_code):
    overrides = [*TINY, *EVERY_CLIENT, "client.method=faulty_clients.NaNOnClientThree"]
    with pytest.raises(ClientFailure, match=r"round 2: clients \[3\] returned a non-finite loss or weights"):
        run_experiment(tmp_path, overrides)


def test_with_on_nonfinite_drop_a_nan_client_is_left_out_and_counted(tmp_path, user_code):
    overrides = [*TINY, *EVERY_CLIENT, "client.method=faulty_clients.NaNOnClientThree", "engine.on_nonfinite=drop"]
    summary = run_experiment(tmp_path, overrides)
    assert [r["nonfinite_dropped"] for r in read_metrics(tmp_path)] == [0, 1, 2]
    assert summary["final_accuracy"] > 0.5  # the global model stayed numbers and learned
    run_experiment(tmp_path / "split", [*overrides, "rounds=2"])
    resumed = run_experiment(tmp_path / "split", overrides, resume=True)
    assert [r["nonfinite_dropped"] for r in read_metrics(tmp_path / "split")] == [0, 1, 2]
    assert resumed["final_accuracy"] == summary["final_accuracy"]


def test_a_round_where_every_reply_is_dropped_fails_instead_of_carrying_on(tmp_path):
    with pytest.raises(ClientFailure, match=r"round 1: every client .* nothing is left to aggregate"):
        run_experiment(tmp_path, [*TINY, "client.lr=1e6", "engine.on_nonfinite=drop"])


@pytest.mark.parametrize(
    ("overrides", "message"),
    [
        (["client.lr=inf"], r"client\.lr = inf: expected a finite number"),
        (
            ["stream.kind=rotated", "stream.rotated.max_angle=nan"],
            r"stream\.rotated\.max_angle = nan: expected a finite number",
        ),
        (["+foo=1"], r"foo: unknown key; valid keys: data, stream"),
        (["+round=20"], r"round: unknown key"),
        (["strategy=fedadam", "strategy.eta=nan"], r"strategy\.eta = nan: expected a finite number"),
        (["strategy=fedprox", "strategy.proximal_mu=inf"], r"strategy\.proximal_mu = inf: expected a finite number"),
        (["engine.client_timeout_s=0"], r"engine\.client_timeout_s = 0\.0: must be > 0"),
        (["engine.on_nonfinite=ignore"], r"engine\.on_nonfinite = 'ignore': expected 'fail' or 'drop'"),
    ],
)
def test_non_finite_values_and_unknown_keys_are_rejected_with_the_key(overrides, message):
    with pytest.raises(ConfigError, match=message):
        compose_run(overrides)


def test_an_npz_with_nan_inputs_is_rejected_before_training(tmp_path):
    x = np.random.default_rng(0).random((50, 4)).astype(np.float32)
    x[7, 2] = np.nan
    np.savez(tmp_path / "bad.npz", x=x, y=np.arange(50) % 2)
    with pytest.raises(ConfigError, match=r"data.path = '.*bad.npz': 1 samples of x_train hold NaN"):
        run_experiment(
            tmp_path / "run",
            [
                "scenario=npz",
                f"data.path={tmp_path / 'bad.npz'}",
                "engine.backend=local",
                "rounds=1",
                "federation.num_clients=4",
                "federation.clients_per_round=2",
            ],
        )


def _actor_processes(pid: int) -> list[psutil.Process]:
    """The Ray actor processes under ``pid`` (this run's Ray only)."""
    actors = []
    for process in psutil.Process(pid).children(recursive=True):
        try:
            if "ray::WorkerHost" in " ".join(process.cmdline()):
                actors.append(process)
        except psutil.Error:  # exited or not readable while we looked
            pass
    return actors


@pytest.mark.ray
def test_a_killed_actor_is_restarted_and_the_run_ends_with_the_uninterrupted_numbers(tmp_path):
    common = ["rounds=12", "seed=4"]
    run_experiment(tmp_path / "whole", [*common, "engine.backend=local"])
    command = [
        sys.executable,
        "run.py",
        f"hydra.run.dir={tmp_path / 'killed'}",
        *common,
        "engine.backend=ray",
        "engine.num_actors=2",
    ]
    run = subprocess.Popen(command, cwd=ROOT, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True)
    metrics, deadline = tmp_path / "killed" / "metrics.jsonl", time.monotonic() + 120
    actors: list[psutil.Process] = []
    while not (actors and metrics.exists() and len(metrics.read_text().splitlines()) >= 3):
        assert run.poll() is None and time.monotonic() < deadline, "the run ended before an actor was killed"
        actors = _actor_processes(run.pid)  # polled: once seen missing under a loaded CI host
        time.sleep(0.01)
    actors[0].kill()
    killed_after = len(metrics.read_text().splitlines())
    assert run.wait(timeout=300) == 0, run.stderr.read()[-3000:]
    assert killed_after < 12
    assert timeless_records(tmp_path / "killed") == timeless_records(tmp_path / "whole")


@pytest.mark.ray
def test_an_actor_that_keeps_dying_fails_the_run_naming_its_clients_after_the_restarts(tmp_path, user_code):
    overrides = [
        "rounds=2",
        "engine.backend=ray",
        *EVERY_CLIENT,
        "engine.max_actor_restarts=1",
        "client.method=faulty_clients.KillsItsProcessOnClientThree",
    ]
    # The actor's os._exit guard leaves a note naming the client before the process ends.
    match = r"client 3 called os\._exit\(1\) in round 1, ending the actor that ran clients \[[\d, ]*\b3\b[\d, ]*\]"
    with pytest.raises(ClientFailure, match=match):
        run_experiment(tmp_path, overrides)
    assert not ray.is_initialized()


@pytest.mark.ray
def test_an_actor_that_dies_mid_call_reruns_its_share_with_the_same_numbers(tmp_path, user_code, monkeypatch):
    monkeypatch.setenv("FEDSTREAM_TEST_SENTINEL", str(tmp_path / "died"))
    common = ["rounds=2", *EVERY_CLIENT, "client.method=faulty_clients.DiesOnceOnClientThree"]
    (tmp_path / "died").touch()  # the reference run: client 3 never dies
    run_experiment(tmp_path / "whole", [*common, "engine.backend=local"])
    (tmp_path / "died").unlink()
    run_experiment(tmp_path / "rerun", [*common, "engine.backend=ray", "engine.num_actors=2"])
    assert (tmp_path / "died").exists()  # it did die once, mid-call
    assert timeless_records(tmp_path / "rerun") == timeless_records(tmp_path / "whole")
