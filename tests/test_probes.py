"""Representation probes: NCM and the linear probe against hand computations, and what a run writes."""

from __future__ import annotations

import math

import numpy as np
import pytest
from helpers import read_metrics, run_experiment
from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

from simulator import metrics
from simulator.plot import read_accuracy_matrix
from simulator.probes import fit_linear_probe, fit_ncm, stratified_sample

CLASS_IL = ["scenario=digits_class_incremental", "engine.backend=local", "stream.rounds_per_task=2", "client.epochs=1"]


def test_ncm_predicts_the_class_of_the_nearest_normalised_mean():
    features = np.array([[2.0, 0.0], [1.0, 1.0], [0.0, 3.0], [0.0, 1.0]])
    labels = np.array([0, 0, 1, 1])
    # Unit features: (1, 0), (.707, .707) -> mean (.854, .354); (0, 1) twice -> mean (0, 1).
    mean0 = np.array([1 + math.sqrt(0.5), math.sqrt(0.5)]) / 2
    mean0 /= np.linalg.norm(mean0)
    probe = fit_ncm(features, labels)
    test = np.array([[1.0, 0.5], [1.0, 1.5], [5.0, 0.1]])
    unit = test / np.linalg.norm(test, axis=1, keepdims=True)
    expected = np.where(unit @ mean0 > unit @ np.array([0.0, 1.0]), 0, 1)
    assert expected.tolist() == [0, 1, 0]
    assert probe.predict(test).tolist() == expected.tolist()
    np.testing.assert_allclose(probe.scores(test)[:, 0], unit @ mean0)


def test_predictions_keep_to_the_allowed_labels_and_say_so_when_none_is_allowed():
    probe = fit_ncm(np.array([[1.0, 0.0], [0.0, 1.0]]), np.array([3, 7]))
    near_3 = np.array([[1.0, 0.1]])
    allow_7 = np.zeros(10, bool)
    allow_7[7] = True
    assert probe.predict(near_3).tolist() == [3]
    assert probe.predict(near_3, allow_7).tolist() == [7]
    assert probe.predict(near_3, np.zeros(10, bool)).tolist() == [-1]  # an unseen task's labels


def test_linear_probe_reaches_the_penalised_optimum_of_a_problem_solved_by_hand():
    # Features +-1 (already white), labels 0/1: by symmetry the class weights are -a and a with no
    # bias, and the gradient vanishes where sigmoid(2a) = 1 - PENALTY * a.
    from simulator.probes import PENALTY

    features = np.array([[1.0], [-1.0], [1.0], [-1.0]])
    labels = np.array([1, 0, 1, 0])
    low, high = 0.0, 100.0
    for _ in range(200):  # bisection
        a = (low + high) / 2
        low, high = (a, high) if 1 / (1 + math.exp(-2 * a)) < 1 - PENALTY * a else (low, a)
    scores = fit_linear_probe(features, labels).scores(np.array([[1.0], [-1.0]]))
    np.testing.assert_allclose(scores[:, 1] - scores[:, 0], [2 * a, -2 * a], rtol=1e-3)


def test_linear_probe_separates_what_is_linearly_separable_and_ignores_dead_features():
    rng = np.random.default_rng(0)
    labels = np.repeat(np.arange(3), 20)
    features = np.column_stack([labels + 0.1 * rng.normal(size=60), np.zeros(60), -labels + 0.1 * rng.normal(size=60)])
    probe = fit_linear_probe(features, labels)
    assert probe.predict(features).tolist() == labels.tolist()
    shifted = features.copy()
    shifted[:, 1] = 5.0  # a feature with no variance in training says nothing at test time
    assert probe.predict(shifted).tolist() == labels.tolist()


def test_a_sample_of_the_training_data_keeps_every_class_in_proportion():
    labels = np.repeat([0, 1, 2], [900, 90, 10])
    sample = stratified_sample(np.arange(1000) + 5000, labels, 100, np.random.default_rng(0))
    assert np.bincount(labels[sample - 5000]).tolist() == [90, 9, 1]
    assert len(np.unique(sample)) == len(sample)
    tiny = stratified_sample(np.arange(1000), labels, 2, np.random.default_rng(0))
    assert sorted(set(labels[tiny])) == [0, 1, 2]  # never a class left out: its task would read as forgotten


def test_a_probe_fitted_on_one_class_predicts_that_class():
    probe = fit_linear_probe(np.ones((4, 3)), np.array([2, 2, 2, 2]))
    assert probe.predict(np.zeros((2, 3))).tolist() == [2, 2]


def test_a_class_incremental_run_writes_probe_and_ncm_matrices_like_the_accuracy_matrix(tmp_path):
    summary = run_experiment(tmp_path, CLASS_IL)
    head = read_accuracy_matrix(tmp_path)
    records = read_metrics(tmp_path)
    for probe in ("probe", "ncm"):
        R = np.loadtxt(tmp_path / f"{probe}_matrix.csv", delimiter=",", skiprows=1, ndmin=2)
        header = (tmp_path / f"{probe}_matrix.csv").read_text().splitlines()[0]
        assert R.shape == head.shape == (5, 5) and header.startswith("task_0,task_1")
        assert summary[f"{probe}_forgetting"] == pytest.approx(metrics.forgetting(R), abs=1e-6)
        assert summary[f"{probe}_bwt"] == pytest.approx(metrics.backward_transfer(R), abs=1e-6)
        assert f"{probe}_fwt" not in summary
        # Probed at the end of every task only (rounds 2, 4, ...), None where a task is unseen.
        probed = [r for r in records if f"{probe}_acc_per_task" in r]
        assert [r["round"] for r in probed] == [2, 4, 6, 8, 10]
        assert probed[1][f"{probe}_acc_per_task"][2:] == [None, None, None]
        np.testing.assert_allclose(R, [r[f"{probe}_acc_all_tasks"] for r in probed], atol=1e-6)
    tags = EventAccumulator(str(tmp_path / "tb")).Reload().Tags()["scalars"]
    assert {"probe_task/0", "ncm_task/4", "probe_acc_seen", "summary/probe_forgetting"} <= set(tags)


@pytest.mark.slow
def test_the_encoder_forgets_far_less_than_the_head_in_class_incremental_learning(tmp_path):
    # Davari et al. 2022: after the last task the head scores ~0 on task 0; its features still separate it.
    run_experiment(tmp_path, ["scenario=digits_class_incremental", "engine.backend=local"])
    head, probe, ncm = (
        read_accuracy_matrix(tmp_path)[-1, 0],
        *(np.loadtxt(tmp_path / f"{p}_matrix.csv", delimiter=",", skiprows=1)[-1, 0] for p in ("probe", "ncm")),
    )
    assert head < 0.05 and probe > 0.7 and ncm > 0.4


def test_probes_run_every_probe_every_rounds_too_and_not_at_all_when_off(tmp_path):
    run_experiment(tmp_path / "every", [*CLASS_IL, "eval.probe_every=3", "eval.every=5"])
    rounds = [r["round"] for r in read_metrics(tmp_path / "every") if "probe_acc_seen" in r]
    assert rounds == [2, 3, 4, 6, 8, 9, 10]
    summary = run_experiment(tmp_path / "off", [*CLASS_IL, "eval.probes=false"])
    matrices = sorted(path.name for path in (tmp_path / "off").glob("*_matrix.csv"))
    assert matrices == ["accuracy_matrix.csv", "cka_matrix.csv"]  # no probe's (the diagnostics' CKA stays)
    assert not any(key.startswith(("probe", "ncm")) for key in summary)


def test_probes_on_a_seeded_sample_of_the_training_data_give_the_same_numbers_run_to_run(tmp_path):
    first = run_experiment(tmp_path / "a", [*CLASS_IL, "eval.probe_samples=100"])
    second = run_experiment(tmp_path / "b", [*CLASS_IL, "eval.probe_samples=100"])
    assert first["probe_average_accuracy"] == second["probe_average_accuracy"]
    assert first["ncm_average_accuracy"] == second["ncm_average_accuracy"]
