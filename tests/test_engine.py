"""The engine end to end: determinism across backends, resume, failures, strategies."""

from __future__ import annotations

from pathlib import Path

import pytest
import ray
from helpers import ROOT, TINY, USER_CODE, numbers_of, read_metrics, run_experiment, timeless_records
from helpers import without_wall_time as _numbers

from simulator.backends import ClientFailure
from simulator.config import ConfigError


def _curve(run_dir: Path) -> list[tuple]:
    return [(r["round"], r["train_loss"], r["acc_seen"]) for r in read_metrics(run_dir)]


@pytest.mark.ray
def test_same_seed_gives_the_same_numbers_in_process_and_on_1_or_2_ray_actors(tmp_path):
    common = ["rounds=3", "seed=7"]
    local = run_experiment(tmp_path / "local", [*common, "engine.backend=local"])
    one = run_experiment(tmp_path / "ray1", [*common, "engine.backend=ray", "engine.num_actors=1"])
    two = run_experiment(tmp_path / "ray2", [*common, "engine.backend=ray", "engine.num_actors=2"])
    assert _numbers(local) == _numbers(one) == _numbers(two)
    assert _curve(tmp_path / "local") == _curve(tmp_path / "ray1") == _curve(tmp_path / "ray2")
    assert not ray.is_initialized()  # the run shut down the Ray it started


def test_another_seed_gives_other_numbers(tmp_path):
    a = run_experiment(tmp_path / "a", [*TINY, "seed=1"])
    b = run_experiment(tmp_path / "b", [*TINY, "seed=2"])
    assert _curve(tmp_path / "a") != _curve(tmp_path / "b")
    assert a["final_accuracy"] != b["final_accuracy"]


def test_resuming_from_a_checkpoint_matches_the_uninterrupted_run(tmp_path):
    # FedAdam keeps moment estimates between rounds: resume must restore them too.
    common = ["engine.backend=local", "strategy=fedadam", "seed=3"]
    whole = run_experiment(tmp_path / "whole", [*common, "rounds=4"])
    run_experiment(tmp_path / "split", [*common, "rounds=2"])
    resumed = run_experiment(tmp_path / "split", [*common, "rounds=4"], resume=True)
    assert _numbers(resumed) == _numbers(whole)
    assert _curve(tmp_path / "split") == _curve(tmp_path / "whole")


def test_resume_refuses_a_checkpoint_of_another_config_or_none(tmp_path):
    run_experiment(tmp_path / "run", [*TINY, "rounds=1"])
    with pytest.raises(ConfigError, match=r"written with another config: client\.lr = 0\.05 there, 0\.2 now"):
        run_experiment(tmp_path / "run", [*TINY, "rounds=2", "client.lr=0.2"], resume=True)
    with pytest.raises(ConfigError, match="no checkpoint at"):
        run_experiment(tmp_path / "elsewhere", TINY, resume=True)


@pytest.mark.ray
def test_a_run_may_resume_on_another_backend_with_the_same_numbers(tmp_path):
    whole = run_experiment(tmp_path / "whole", ["engine.backend=local", "rounds=3"])
    run_experiment(tmp_path / "split", ["engine.backend=local", "rounds=2"])
    resumed = run_experiment(tmp_path / "split", ["engine.backend=ray", "rounds=3"], resume=True)
    assert _numbers(resumed) == _numbers(whole)


@pytest.mark.parametrize("backend", ["local", pytest.param("ray", marks=pytest.mark.ray)])
def test_a_failing_client_fails_the_run_with_its_id_and_traceback(tmp_path, user_code, backend):
    overrides = [
        "rounds=2",
        f"engine.backend={backend}",
        "federation.clients_per_round=20",
        "client.method=failing_client.FailsOnClientThree",
    ]
    with pytest.raises(ClientFailure) as failure:
        run_experiment(tmp_path, overrides)
    message = str(failure.value)
    assert "client 3 failed" in message
    assert "Traceback" in message and "sensor data corrupted on this device" in message
    assert not ray.is_initialized()


def test_default_scenario_reaches_90_percent(tmp_path):
    summary = run_experiment(tmp_path, ["engine.backend=local"])
    assert summary["rounds"] == 30
    assert summary["final_accuracy"] >= 0.90


STRATEGIES = sorted(p.stem for p in (ROOT / "scenarios" / "strategy").glob("*.yaml"))
PAIRED = ("scaffold", "target")  # their client.method has the same name


@pytest.mark.parametrize("name", STRATEGIES)
@pytest.mark.slow
def test_every_shipped_strategy_trains_the_global_model_through_our_grid(tmp_path, name):
    # IID data: this checks the aggregation path, not robustness to skew. The best round,
    # not the last: adaptive server optimizers (FedAdagrad at eta=0.1) oscillate.
    overrides = ["engine.backend=local", "rounds=5", f"strategy={name}", "data.partition.kind=iid"]
    if name in PAIRED:  # a method in two halves runs with its client half
        overrides.append(f"client.method={name}")
    run_experiment(tmp_path, overrides)
    curve = [r["acc_seen"] for r in read_metrics(tmp_path)]
    assert max(curve) >= curve[0] + 0.25, (name, curve)


def test_all_flower_strategies_and_ours_have_a_short_name():
    expected = {
        "fedavg",
        "fedprox",
        "fedadam",
        "fedyogi",
        "fedadagrad",
        "fedavgm",
        "qfedavg",
        "fedmedian",
        "fedtrimmedavg",
        "krum",
        "multikrum",
        "bulyan",
        "dp_fixed_server",
        "dp_fixed_client",
        "dp_adaptive_server",
        "dp_adaptive_client",
        "fot",
        "ccvr",  # FedStream's server-side continual methods (strategies/)
        "fsa",
        "fetril",
        "target",
        "scaffold",  # FedStream's methods with a client half or a payload
    }
    assert set(STRATEGIES) == expected


def test_federated_evaluation_asks_the_strategy_and_logs_client_accuracy(tmp_path):
    run_experiment(tmp_path, [*TINY, "eval.federated=true", "eval.client_test_size=40"])
    for record in read_metrics(tmp_path):
        assert 0.0 <= record["federated_acc"] <= 1.0
    # Clients' samples follow their own label mix, so their mean differs from the global one.
    assert [r["federated_acc"] for r in read_metrics(tmp_path)] != [r["acc_seen"] for r in read_metrics(tmp_path)]


@pytest.mark.ray
def test_actors_that_cannot_all_be_placed_fail_fast_instead_of_waiting(tmp_path):
    ray.init(address="local", num_cpus=2, include_dashboard=False)  # as a notebook would have started it
    try:
        with pytest.raises(ConfigError, match="engine.num_actors = 4 x engine.num_cpus_per_actor = 1.0 needs 4 CPU"):
            run_experiment(tmp_path, ["rounds=1", "engine.backend=ray", "engine.num_actors=4"])
        assert ray.is_initialized()  # the user's Ray is theirs to shut down
    finally:
        ray.shutdown()


def test_strategy_minimums_above_the_clients_present_are_rejected_not_waited_for(tmp_path):
    overrides = ["scenario=digits_joining_clients", "engine.backend=local", "strategy.min_available_nodes=15"]
    with pytest.raises(ConfigError, match="min_available_nodes = 15: only 10 clients are present"):
        run_experiment(tmp_path, overrides)


def test_resuming_with_rounds_that_change_the_streams_tasks_is_refused(tmp_path):
    common = ["scenario=digits_label_shift", "engine.backend=local", "stream.label_shift.period=2", "client.epochs=1"]
    run_experiment(tmp_path, [*common, "rounds=3"])
    with pytest.raises(ConfigError, match="from 2 to 3 tasks"):
        run_experiment(tmp_path, [*common, "rounds=6"], resume=True)


@pytest.mark.ray
def test_a_continual_stream_gives_the_same_numbers_in_process_and_on_3_actors(tmp_path, monkeypatch, caplog):
    monkeypatch.setattr("simulator.backends.os.cpu_count", lambda: 2)  # as here; CI machines may have more
    common = [
        "scenario=digits_joining_clients",
        "stream.class_incremental.task_incremental=true",
        "strategy=fedadam",
        "eval.federated=true",
        "eval.every=3",
        "stream.rounds_per_task=2",
        "client.epochs=1",
    ]
    run_experiment(tmp_path / "local", [*common, "engine.backend=local"])
    run_experiment(tmp_path / "ray", [*common, "engine.backend=ray", "engine.num_actors=3"])
    assert timeless_records(tmp_path / "local") == timeless_records(tmp_path / "ray")
    oversubscribed = [r.getMessage() for r in caplog.records if "needs 3 CPUs" in r.getMessage()]
    assert oversubscribed == [
        "engine.num_actors = 3 x engine.num_cpus_per_actor = 1 needs 3 CPUs and this machine "
        "has 2: the actors share them, each training slower; engine.num_actors = 2 would not"
    ]


def test_a_strategy_returning_other_keys_is_named_in_its_round_with_the_keys_expected(tmp_path, monkeypatch):
    monkeypatch.syspath_prepend(str(USER_CODE))
    with pytest.raises(ClientFailure) as failure:
        run_experiment(tmp_path, [*TINY, "strategy._target_=record_strategies.RenamesAKey"])
    message = str(failure.value)
    assert message.startswith(
        "round 1: RenamesAKey.aggregate_train returned an ArrayRecord that is not the "
        "model's global weights (missing ['encoder.1.weight']; not the model's ['renamed'])"
    )
    assert message.endswith(
        "given: encoder.1.weight, encoder.1.bias, encoder.3.weight, encoder.3.bias, head.weight, head.bias"
    )


def test_a_strategy_returning_the_keys_in_another_order_gives_fedavgs_numbers(tmp_path, monkeypatch):
    monkeypatch.syspath_prepend(str(USER_CODE))
    run_experiment(tmp_path / "reversed", [*TINY, "strategy._target_=record_strategies.ReversesKeys"])
    run_experiment(tmp_path / "fedavg", TINY)
    assert numbers_of(tmp_path / "reversed") == numbers_of(tmp_path / "fedavg")
