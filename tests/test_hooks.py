"""The round loop's hooks: a new measurement is one hook, and hooks see what the run writes."""

from __future__ import annotations

import json
from typing import Any

from simulator import hooks as hooks_module
from simulator.hooks import Hook, Hooks, RoundView, RunContext
from tests.conftest import read_metrics, run_experiment

CLASS_IL = ["scenario=digits_class_incremental", "engine.backend=local", "stream.rounds_per_task=2",
            "client.epochs=1", "eval.every=3", "eval.probes=false"]


class TaskEndMetric(Hook):
    """An end-of-task metric, as a user would add one: the global weights' norm, and what it was told."""

    def __init__(self, run: RunContext) -> None:
        self.logged: list[tuple[int, dict[str, Any] | None]] = []
        self.closed = False

    def at_task_end(self, view: RoundView) -> dict[str, Any]:
        return {"weight_norm": float(sum((a**2).sum() for a in view.arrays.to_numpy_ndarrays())) ** 0.5}

    def after_log(self, view: RoundView, record: dict[str, Any] | None) -> None:
        self.logged.append((view.server_round, record))

    def at_end(self, view: RoundView) -> dict[str, Any]:
        return {"tasks_seen_by_hook": sum(1 for _, r in self.logged if r and "weight_norm" in r)}

    def close(self) -> None:
        self.closed = True


def test_a_new_end_of_task_metric_is_one_hook_and_reaches_the_records_and_the_summary(tmp_path, monkeypatch):
    added: list[TaskEndMetric] = []
    default = hooks_module.default_hooks

    def with_metric(run: RunContext) -> Hooks:
        added.append(TaskEndMetric(run))
        return Hooks([*default(run).hooks, added[0]])

    monkeypatch.setattr("simulator.engine.default_hooks", with_metric)
    summary = run_experiment(tmp_path, CLASS_IL)
    records = read_metrics(tmp_path)
    # Task ends (every 2nd round) and eval.every=3 rounds have records; only task ends have the metric.
    assert [r["round"] for r in records] == [2, 3, 4, 6, 8, 9, 10]
    assert [r["round"] for r in records if "weight_norm" in r] == [2, 4, 6, 8, 10]
    hook = added[0]
    assert [round_ for round_, _ in hook.logged] == list(range(1, 11))  # told of every round
    assert [record for _, record in hook.logged if record] == records  # exactly what metrics.jsonl holds
    assert summary["tasks_seen_by_hook"] == 5 and hook.closed
    assert json.loads((tmp_path / "summary.json").read_text())["tasks_seen_by_hook"] == 5


def test_a_finished_run_resumed_rewrites_its_outputs_and_closes_its_hooks(tmp_path):
    first = run_experiment(tmp_path, CLASS_IL)
    again = run_experiment(tmp_path, CLASS_IL, resume=True)  # no rounds left: only the end runs
    first.pop("wall_time_s"), again.pop("wall_time_s")
    assert again == first
