"""Stateful client methods in whole runs: any actor, any backend, spilled, killed and resumed."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest
from helpers import (
    USER_CODE,
    compose_run,
    final_checkpoint,
    kill_after_records,
    numbers_of,
    read_metrics,
    run_experiment,
    run_py_to_the_end,
    wait_for_free_cpus,
)

from simulator import checkpoint
from simulator.config import ConfigError
from simulator.data import load_dataset
from simulator.streams import build_stream

# Class-incremental digits in 10 rounds: a boundary every 2 rounds, 10 of 20 clients a round,
# so clients come back after missed rounds, some after a whole missed task.
SHORT_TASKS = ["scenario=digits_class_incremental", "stream.rounds_per_task=2", "client.epochs=1"]
STATEFUL = ["replay", "ewc", "lwf"]


def _final_states(run_dir: Path) -> dict[int, dict]:
    """Every client's state as the run's last checkpoint left it."""
    return final_checkpoint(run_dir)[1]


def _same_states(a: dict[int, dict], b: dict[int, dict]) -> bool:
    return a.keys() == b.keys() and all(
        a[c].keys() == b[c].keys() and all(np.array_equal(a[c][k], b[c][k]) for k in a[c]) for c in a
    )


@pytest.mark.ray
@pytest.mark.parametrize("method", STATEFUL)
def test_a_stateful_method_gives_the_same_numbers_in_process_and_on_1_2_and_3_actors(
    tmp_path, ray_with_three_cpus, method
):
    common = [*SHORT_TASKS, f"client.method={method}"]
    run_experiment(tmp_path / "local", [*common, "engine.backend=local"])
    expected = numbers_of(tmp_path / "local")
    assert expected[0][-1]["client_state_mb"] > 0
    for actors in (1, 2, 3):
        wait_for_free_cpus(actors)  # the previous run's actors leave the shared Ray asynchronously
        run_experiment(tmp_path / f"ray{actors}", [*common, "engine.backend=ray", f"engine.num_actors={actors}"])
        assert numbers_of(tmp_path / f"ray{actors}") == expected, f"{method} on {actors} actors"


@pytest.mark.parametrize("method", STATEFUL)
@pytest.mark.slow
def test_spilling_every_client_state_to_files_gives_the_same_numbers(tmp_path, method):
    common = [*SHORT_TASKS, "engine.backend=local", f"client.method={method}"]
    run_experiment(tmp_path / "memory", common)
    run_experiment(tmp_path / "spilled", [*common, "engine.client_state_memory_mb=0"])
    kept, spilled = numbers_of(tmp_path / "memory"), numbers_of(tmp_path / "spilled")
    assert all(r["client_state_spilled_mb"] == 0 for r in kept[0])
    assert spilled[0][-1]["client_state_spilled_mb"] == spilled[0][-1]["client_state_mb"] > 0
    strip = lambda records: [{k: v for k, v in r.items() if k != "client_state_spilled_mb"} for r in records]  # noqa: E731
    assert strip(spilled[0]) == strip(kept[0]) and spilled[1] == kept[1]
    files = {p.name for p in (tmp_path / "spilled" / "client_state").glob("*.npz")}
    kept = [
        json.loads(m.read_text())["client_state"] for m in (tmp_path / "spilled").glob("checkpoints/*/manifest.json")
    ]
    assert len(kept) == 2 and files == set(kept[0]) | set(
        kept[1]
    )  # superseded versions go once no kept checkpoint names them
    assert _same_states(_final_states(tmp_path / "spilled"), _final_states(tmp_path / "memory"))


def test_without_checkpoints_the_state_files_go_at_the_end(tmp_path):
    run_experiment(
        tmp_path,
        [
            *SHORT_TASKS,
            "engine.backend=local",
            "client.method=ewc",
            "engine.client_state_memory_mb=0",
            "engine.checkpoint_every=0",
        ],
    )
    assert read_metrics(tmp_path)[-1]["client_state_spilled_mb"] > 0
    assert not (tmp_path / "client_state").exists()


def test_a_stateless_method_writes_no_state_files_and_still_knows_each_clients_last_round(tmp_path):
    # Each client's last round is what tells the engine a client starts a new task: kept, but in the checkpoint.
    common = [*SHORT_TASKS, "engine.backend=local", "client.method=sgd", "engine.client_state_memory_mb=0"]
    run_experiment(tmp_path, common)
    assert not (tmp_path / "client_state").exists() or not any((tmp_path / "client_state").iterdir())
    saved = checkpoint.load(tmp_path / "checkpoints").client_states
    assert saved.files == {} and saved.sizes == {} and len(saved.last_round) == 20
    assert read_metrics(tmp_path)[-1]["client_state_mb"] == 0


@pytest.mark.slow
def test_a_run_killed_with_sigkill_mid_task_resumes_to_the_uninterrupted_numbers(tmp_path):
    # EWC: two model-sized arrays per client; a small budget makes some of them leave memory, and
    # checkpoints every 2 rounds, so the kill may land between a state file's write and the
    # checkpoint that names it, and resume goes back past rounds whose files exist.
    overrides = [
        "scenario=digits_class_incremental",
        "stream.rounds_per_task=6",
        "client.epochs=1",
        "client.method=ewc",
        "engine.backend=local",
        "engine.client_state_memory_mb=1",
        "engine.checkpoint_every=2",
    ]
    run_py_to_the_end(tmp_path / "whole", overrides, timeout_s=300)

    done = kill_after_records(tmp_path / "killed", overrides, 9, timeout_s=120)  # round 9: mid task 1
    assert not (tmp_path / "killed" / "summary.json").exists() and done < 30, done
    assert checkpoint.load(tmp_path / "killed" / "checkpoints").client_states.files  # states were saved

    run_py_to_the_end(tmp_path / "killed", [*overrides, "resume=true"], timeout_s=300)
    assert numbers_of(tmp_path / "killed") == numbers_of(tmp_path / "whole")
    assert _same_states(_final_states(tmp_path / "killed"), _final_states(tmp_path / "whole"))


def test_a_clients_own_task_schedule_drives_begin_task_with_the_task_and_data_it_left(tmp_path, monkeypatch):
    monkeypatch.syspath_prepend(str(USER_CODE))
    overrides = [
        "scenario=digits_async_tasks",
        "stream.class_incremental.min_rounds_per_task=1",
        "stream.class_incremental.max_rounds_per_task=3",
        "rounds=12",
        "client.epochs=1",
        "engine.backend=local",
        "client.method=task_recorder.RecordsTasks",
        "client.recorder.label=async",
    ]
    run_experiment(tmp_path, overrides)
    stream = build_stream(run := compose_run(overrides), load_dataset(run.data, 20, run.seed))
    states = _final_states(tmp_path)
    assert len(states) >= 15
    changes_seen = 0
    for client, state in states.items():
        rounds, tasks = state["rounds"].tolist(), state["tasks"].tolist()
        assert tasks == [stream.client_task(r, client) for r in rounds]
        expected = [(rounds[0], -1)] + [
            (r, t_left) for r, t, r_left, t_left in zip(rounds[1:], tasks[1:], rounds, tasks) if t != t_left
        ]
        assert state["changes"].reshape(-1, 2).tolist() == [list(c) for c in expected], client
        for (r, _), r_left in zip(expected[1:], [rounds[rounds.index(r) - 1] for r, _ in expected[1:]]):
            assert np.array_equal(state[f"left_at_{r}"], stream.train_indices(r_left, client))
            changes_seen += 1
        assert state["label"] == "async"
    assert changes_seen >= 10
    assert read_metrics(tmp_path)[-1]["train/recorded_rounds"] > 1  # the method's own metric, aggregated


@pytest.mark.parametrize(
    ("override", "message"),
    [
        ("client.replay.bufer_size=5", r"client\.replay\.bufer_size: unknown key; valid keys: buffer_size, batch_size"),
        ("client.ewc.strength=strong", r"client\.ewc\.strength = 'strong': expected float"),
        ("client.replay.buffer_size=0", r"client\.replay\.buffer_size = 0: must be at least 1"),
        ("client.lwf.temperature=0", r"client\.lwf\.temperature = 0\.0: must be > 0"),
        ("client.fedprox.proximal_mu=-1", r"client\.fedprox\.proximal_mu = -1\.0: must be >= 0"),
        ("client.recorder.repeat=0", r"client\.recorder\.repeat = 0: must be at least 1"),
        ("client.recorder.lable=x", r"client\.recorder\.lable: unknown key; valid keys: label, repeat"),
        ("client.lr_typo=0.1", r"client\.lr_typo = 0\.1: unknown key; valid keys: method, lr"),
        ("client.replay.batch_size=0", r"client\.replay\.batch_size = 0: must be at least 1"),
        ("client.ewc.strength=inf", r"client\.ewc\.strength = inf: expected a finite number"),
        (
            "client.replya.buffer_size=5",
            r"client\.replya: no client method has this section; did you mean client\.replay\?",
        ),
        ("client.replay=5", r"client\.replay = 5: unknown key; .* or a plugin's section"),
    ],
)
def test_a_methods_settings_are_checked_with_the_key_before_any_work(monkeypatch, override, message):
    monkeypatch.syspath_prepend(str(USER_CODE))
    with pytest.raises(ConfigError, match=message):
        compose_run(["client.method=task_recorder.RecordsTasks", override])


def test_settings_reach_the_method_and_proximal_mu_lives_under_fedprox():
    run = compose_run(["client.method=replay", "client.replay.buffer_size=50"])
    assert run.client.settings.buffer_size == 50 and run.client.settings.batch_size is None
    assert compose_run(["client.method=fedprox", "client.fedprox.proximal_mu=0.3"]).client.settings.proximal_mu == 0.3
    with pytest.raises(ConfigError, match="client.proximal_mu = 0.3: unknown key"):
        compose_run(["+client.proximal_mu=0.3"])


@pytest.mark.slow
def test_a_learning_rate_the_strategy_sends_overrides_client_lr_for_the_round(tmp_path, monkeypatch):
    monkeypatch.syspath_prepend(str(USER_CODE))
    common = ["rounds=2", "engine.backend=local", "client.lr=0.05"]
    sending = ["strategy._target_=lr_strategy.SendsLearningRate"]
    plain = run_experiment(tmp_path / "plain", common)
    same = run_experiment(tmp_path / "same", [*common, *sending, "+strategy.client_lr=0.05"])
    frozen = run_experiment(tmp_path / "frozen", [*common, *sending, "+strategy.client_lr=0.0"])
    faster = run_experiment(tmp_path / "faster", [*common, *sending, "+strategy.client_lr=0.2"])
    numbers = lambda s: {k: v for k, v in s.items() if k != "wall_time_s"}  # noqa: E731
    assert numbers(same) == numbers(plain)
    assert frozen["final_accuracy"] == frozen["initial_acc_per_task"][0]  # lr 0: the initial model
    assert faster["final_accuracy"] != plain["final_accuracy"]
