"""The round loop's hooks: a new measurement is one hook, and hooks see what the run writes."""

from __future__ import annotations

import json

import pytest
from helpers import ROOT, compose_run, read_metrics, run_experiment

from simulator.config import ConfigError

CLASS_IL = [
    "scenario=digits_class_incremental",
    "engine.backend=local",
    "stream.rounds_per_task=2",
    "client.epochs=1",
    "eval.every=3",
    "eval.probes=false",
]


def test_a_users_end_of_task_metric_is_one_hook_by_dotted_path_and_reaches_the_records_and_summary(
    tmp_path, monkeypatch
):
    monkeypatch.syspath_prepend(str(ROOT / "tests" / "user_code"))
    import task_end_hook

    task_end_hook.BUILT.clear()
    summary = run_experiment(tmp_path, [*CLASS_IL, "eval.hooks=[task_end_hook.TaskEndMetric]"])
    records = read_metrics(tmp_path)
    # Task ends (every 2nd round) and eval.every=3 rounds have records; only task ends have the metric.
    assert [r["round"] for r in records] == [2, 3, 4, 6, 8, 9, 10]
    assert [r["round"] for r in records if "weight_norm" in r] == [2, 4, 6, 8, 10]
    (hook,) = task_end_hook.BUILT
    assert [round_ for round_, _ in hook.logged] == list(range(1, 11))  # told of every round
    assert [record for _, record in hook.logged if record] == records  # exactly what metrics.jsonl holds
    assert summary["tasks_seen_by_hook"] == 5 and hook.closed
    assert json.loads((tmp_path / "summary.json").read_text())["tasks_seen_by_hook"] == 5


def test_a_hook_that_is_not_a_hook_is_refused_naming_the_key(monkeypatch):
    monkeypatch.syspath_prepend(str(ROOT / "tests" / "user_code"))
    with pytest.raises(ConfigError, match=r"eval.hooks = 'task_end_hook.BUILT': expected a simulator.hooks.Hook"):
        compose_run(["eval.hooks=[task_end_hook.BUILT]"])
    with pytest.raises(ConfigError, match=r"eval.hooks = 'no_such_module.Hook'"):
        compose_run(["eval.hooks=[no_such_module.Hook]"])


def test_a_hook_with_one_point_and_no_constructor_of_its_own_runs_beside_another(tmp_path, monkeypatch):
    monkeypatch.syspath_prepend(str(ROOT / "tests" / "user_code"))
    hooks = "eval.hooks=[task_end_hook.RoundsSeen,task_end_hook.TaskEndMetric]"
    summary = run_experiment(tmp_path, [*CLASS_IL, hooks])
    assert summary["rounds_seen_by_hook"] == 10 and summary["tasks_seen_by_hook"] == 5
    with pytest.raises(ConfigError, match=r"eval.hooks = 'nohook': unknown hook; expected the dotted path"):
        compose_run(["eval.hooks=[nohook]"])


def test_a_finished_run_resumed_rewrites_its_outputs_and_closes_its_hooks(tmp_path):
    first = run_experiment(tmp_path, CLASS_IL)
    again = run_experiment(tmp_path, CLASS_IL, resume=True)  # no rounds left: only the end runs
    first.pop("wall_time_s"), again.pop("wall_time_s")
    assert again == first
