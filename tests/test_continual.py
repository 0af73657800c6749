"""Continual runs end to end: forgetting shows, and the summary is the matrix's formulas."""

from __future__ import annotations

import csv
import json

import numpy as np
import pytest
from helpers import read_metrics, run_experiment

from simulator import metrics


@pytest.fixture(scope="module")
def class_incremental_run(tmp_path_factory):
    """digits_class_incremental as shipped: FedAvg, plain SGD, 5 tasks x 10 rounds."""
    run_dir = tmp_path_factory.mktemp("class_incremental")
    run_experiment(run_dir, ["scenario=digits_class_incremental", "engine.backend=local"])
    return run_dir


def read_matrix(run_dir) -> np.ndarray:
    rows = list(csv.reader((run_dir / "accuracy_matrix.csv").open()))
    assert rows[0] == [f"task_{j}" for j in range(len(rows[0]))]
    return np.array(rows[1:], dtype=float)


def test_fedavg_with_plain_sgd_forgets_the_first_task(class_incremental_run):
    R = read_matrix(class_incremental_run)
    assert R.shape == (5, 5)
    assert R[0, 0] - R[-1, 0] >= 0.30  # catastrophic forgetting of task 0
    assert np.all(np.diag(R) >= 0.8)  # yet each task was learned while live
    summary = json.loads((class_incremental_run / "summary.json").read_text())
    assert summary["forgetting"] >= 0.5


def test_summary_is_the_formulas_applied_to_the_written_matrix(class_incremental_run):
    summary = json.loads((class_incremental_run / "summary.json").read_text())
    R = read_matrix(class_incremental_run)
    expected = metrics.summarize(R, np.array(summary["initial_acc_per_task"]))
    for key, value in expected.items():  # exactly: the matrix is written at full precision
        assert summary[key] == value, key


def test_metrics_mark_unseen_tasks_and_weigh_seen_ones(class_incremental_run):
    for record in read_metrics(class_incremental_run):
        seen = [a is not None for a in record["acc_per_task"]]
        assert seen == [j <= record["task"] for j in range(5)]
        assert record["task"] == (record["round"] - 1) // 10
        assert 0.0 <= record["client_acc_worst10"] <= record["client_acc_mean"] <= 1.0
    last = read_metrics(class_incremental_run)[-1]
    # Each task's test set is two digits' worth; the seen accuracy is close to their mean.
    assert last["acc_seen"] == pytest.approx(np.mean(last["acc_per_task"]), abs=0.02)


def test_tensorboard_has_every_task_and_the_summary(class_incremental_run):
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    events = EventAccumulator(str(class_incremental_run / "tb"))
    events.Reload()
    tags = set(events.Tags()["scalars"])
    assert {f"acc_task/{j}" for j in range(5)} <= tags
    assert {"acc_seen", "client_acc_mean", "client_acc_std", "client_acc_worst10"} <= tags
    assert {"summary/forgetting", "summary/bwt", "summary/fwt", "summary/forgetting_after_training"} <= tags
    # acc_task/4 starts when task 4 does.
    assert [e.step for e in events.Scalars("acc_task/4")][0] == 41


@pytest.mark.slow
def test_resuming_a_task_stream_across_a_boundary_matches_the_uninterrupted_run(tmp_path):
    common = [
        "scenario=digits_async_tasks",
        "engine.backend=local",
        "stream.rounds_per_task=2",
        "stream.class_incremental.min_rounds_per_task=1",
        "stream.class_incremental.max_rounds_per_task=3",
        "client.epochs=1",
    ]
    whole = run_experiment(tmp_path / "whole", common)
    run_experiment(tmp_path / "split", [*common, "rounds=5"])
    resumed = run_experiment(tmp_path / "split", [*common, "rounds=10"], resume=True)
    assert {k: v for k, v in resumed.items() if k != "wall_time_s"} == {
        k: v for k, v in whole.items() if k != "wall_time_s"
    }
    assert (tmp_path / "split" / "accuracy_matrix.csv").read_text() == (
        tmp_path / "whole" / "accuracy_matrix.csv"
    ).read_text()


@pytest.mark.slow
def test_task_incremental_masks_keep_old_tasks_accurate(class_incremental_run, tmp_path):
    run_experiment(tmp_path, ["scenario=digits_task_incremental", "engine.backend=local"])
    masked, single_head = read_matrix(tmp_path), read_matrix(class_incremental_run)
    assert masked[-1, 0] >= 0.8 and single_head[-1, 0] <= 0.1  # same stream, masked logits
    assert np.all(masked[-1] >= 0.8)  # every task still answered within its own classes
