"""The run directory contract (docs/architecture.md), read back from a real (tiny) run."""

import csv
import json

from helpers import read_metrics

from simulator import checkpoint

METRIC_KEYS = {"round", "task", "wall_s", "train_loss", "acc_per_task", "acc_seen"}
SUMMARY_KEYS = {
    "final_accuracy",
    "average_accuracy",
    "average_incremental_accuracy",
    "forgetting",
    "bwt",
    "fwt",
    "rounds",
    "wall_time_s",
}


def test_metrics_has_one_record_per_round_with_the_contract_keys(tiny_run):
    records = read_metrics(tiny_run)
    assert [r["round"] for r in records] == [1, 2, 3]
    for record in records:
        assert METRIC_KEYS <= set(record)
        assert record["task"] == 0
        assert len(record["acc_per_task"]) == 1
        assert record["acc_seen"] == record["acc_per_task"][0]
        assert 0.0 <= record["acc_seen"] <= 1.0
        assert record["train_loss"] > 0
    walls = [r["wall_s"] for r in records]
    assert walls == sorted(walls)


def test_accuracy_matrix_has_one_column_for_a_scenario_without_tasks(tiny_run):
    rows = list(csv.reader((tiny_run / "accuracy_matrix.csv").open()))
    assert rows[0] == ["task_0"]
    assert len(rows) == 2
    assert float(rows[1][0]) == read_metrics(tiny_run)[-1]["acc_seen"]  # full precision


def test_summary_holds_the_contract_keys_and_agrees_with_the_metrics(tiny_run):
    summary = json.loads((tiny_run / "summary.json").read_text())
    assert SUMMARY_KEYS <= set(summary)
    last = read_metrics(tiny_run)[-1]
    assert summary["final_accuracy"] == last["acc_seen"]
    assert summary["average_accuracy"] == last["acc_seen"]
    assert summary["forgetting"] is None and summary["bwt"] is None and summary["fwt"] is None
    assert summary["rounds"] == 3
    assert summary["wall_time_s"] > 0


def test_tensorboard_events_plot_and_checkpoint_are_written(tiny_run):
    events = list((tiny_run / "tb").glob("events.out.tfevents.*"))
    assert events and events[0].stat().st_size > 200
    png = (tiny_run / "plots" / "forgetting.png").read_bytes()
    assert png.startswith(b"\x89PNG") and len(png) > 5_000
    assert checkpoint.load(tiny_run / "checkpoints").round == 3


def test_tensorboard_holds_accuracy_per_round(tiny_run):
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    events = EventAccumulator(str(tiny_run / "tb"))
    events.Reload()
    accuracy = [e.value for e in events.Scalars("acc_seen")]
    expected = [r["acc_seen"] for r in read_metrics(tiny_run)]
    assert [round(a, 5) for a in accuracy] == [round(a, 5) for a in expected]  # stored as float32
    assert [e.step for e in events.Scalars("acc_task/0")] == [1, 2, 3]
