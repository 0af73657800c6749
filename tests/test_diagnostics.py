"""Representation diagnostics: neural collapse and CKA against hand computations, what a run writes, and
a resumed run's CKA matrix, byte for byte."""

from __future__ import annotations

import itertools
import json
import math
import shutil
from pathlib import Path

import numpy as np
import pytest
from helpers import compose_run, numbers_of, read_metrics, run_experiment
from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

from simulator.config import ConfigError
from simulator.diagnostics import NEURAL_COLLAPSE, linear_cka, neural_collapse

RUN = [
    "scenario=digits_class_incremental",
    "engine.backend=local",
    "stream.rounds_per_task=1",
    "federation.clients_per_round=4",
    "client.epochs=1",
    "eval.probes=false",  # the diagnostics encode the probe sample themselves
    "eval.probe_samples=500",
    "eval.cka_samples=200",
]


def _hand_neural_collapse(features: np.ndarray, labels: list[int]) -> dict[str, float]:
    """Papyan et al.'s definitions, written out: per-class loops, np.cov, a pseudo-inverse, every pair."""
    classes = sorted(set(labels))
    by_class = {c: np.array([f for f, y in zip(features, labels) if y == c]) for c in classes}
    means = {c: sum(by_class[c]) / len(by_class[c]) for c in classes}
    centre = sum(means.values()) / len(classes)
    within = sum(np.cov(by_class[c].T, bias=True) for c in classes) / len(classes)
    between = sum(np.outer(means[c] - centre, means[c] - centre) for c in classes) / len(classes)
    norms = [math.sqrt(sum(v * v for v in means[c] - centre)) for c in classes]
    cosines = [
        float(np.dot(means[a] - centre, means[b] - centre)) / (norms[i] * norms[j])
        for (i, a), (j, b) in itertools.combinations(enumerate(classes), 2)
    ]
    mean_cosine = sum(cosines) / len(cosines)
    return {
        "nc1": float(np.trace(within @ np.linalg.pinv(between))) / len(classes),
        "nc2_equinorm": float(np.std(norms)) / (sum(norms) / len(norms)),
        "nc2_equiangular": math.sqrt(sum((c - mean_cosine) ** 2 for c in cosines) / len(cosines)),
        "nc2_max_angle": sum(abs(c + 1 / (len(classes) - 1)) for c in cosines) / len(cosines),
    }


def _hand_cka(x: np.ndarray, y: np.ndarray) -> float:
    """Kornblith et al.'s kernel form: HSIC of the linear Gram matrices through the centring matrix H."""
    n = len(x)
    h = np.eye(n) - np.ones((n, n)) / n
    gram_x, gram_y = x @ x.T, y @ y.T

    def hsic(a: np.ndarray, b: np.ndarray) -> float:
        return float(np.trace(a @ h @ b @ h)) / (n - 1) ** 2

    return hsic(gram_x, gram_y) / math.sqrt(hsic(gram_x, gram_x) * hsic(gram_y, gram_y))


def test_neural_collapse_equals_the_hand_computation_on_unbalanced_classes():
    generator = np.random.default_rng(0)
    labels = [0] * 7 + [1] * 4 + [2] * 9 + [3] * 5  # 4 classes in 6 dimensions: Sigma_B of rank 3
    features = generator.normal(size=(len(labels), 6)) + 3 * np.eye(6)[labels]
    measured = neural_collapse(features, np.array(labels))
    assert measured == pytest.approx(_hand_neural_collapse(features, labels), rel=1e-9)
    assert all(value > 0 for value in measured.values())


def test_collapsed_features_on_a_simplex_frame_score_zero_and_one_class_scores_null():
    frame = np.eye(3) - 1 / 3  # 3 class means at equal norms and angles, cos = -1/2
    labels = np.repeat([0, 1, 2], [2, 5, 3])
    measured = neural_collapse(5.0 + frame[labels], labels)  # every sample at its class mean, shifted
    assert measured == pytest.approx(dict.fromkeys(NEURAL_COLLAPSE, 0.0), abs=1e-12)
    assert all(math.isnan(v) for v in neural_collapse(np.ones((4, 3)), np.zeros(4, int)).values())


def test_linear_cka_equals_the_kernel_form_and_has_the_invariances_it_should_have():
    generator = np.random.default_rng(1)
    x = generator.normal(size=(30, 5))
    y = x @ generator.normal(size=(5, 4)) + 0.5 * generator.normal(size=(30, 4))
    assert linear_cka(x, y) == pytest.approx(_hand_cka(x, y), rel=1e-10)
    assert linear_cka(x, x) == pytest.approx(1.0, abs=1e-12)
    rotation, _ = np.linalg.qr(generator.normal(size=(5, 5)))
    assert linear_cka(x, y) == pytest.approx(linear_cka(x @ rotation * 3.7 + 2.0, y), rel=1e-10)
    stretch = np.diag([1.0, 1.0, 1.0, 1.0, 10.0])  # invertible, not orthogonal: CKA is not invariant to it
    assert linear_cka(x, x @ stretch) < 0.9


def test_cka_samples_below_two_are_refused():
    with pytest.raises(ConfigError, match="eval.cka_samples = 1: must be at least 2"):
        compose_run(["eval.cka_samples=1"])


@pytest.fixture(scope="module")
def finished(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A 5-task run, a round a task, with a checkpoint every round (rounds 4 and 5 kept)."""
    run_dir = tmp_path_factory.mktemp("diagnostics")
    run_experiment(run_dir, RUN)
    return run_dir


def test_a_run_writes_neural_collapse_at_task_ends_and_a_symmetric_cka_matrix(finished):
    R = np.loadtxt(finished / "cka_matrix.csv", delimiter=",", skiprows=1)
    header = (finished / "cka_matrix.csv").read_text().splitlines()[0]
    assert header == "task_0,task_1,task_2,task_3,task_4"
    np.testing.assert_allclose(np.diag(R), 1.0, atol=1e-12)
    np.testing.assert_array_equal(R, R.T)
    assert ((R > 0) & (R < 1 + 1e-12)).all()
    records = read_metrics(finished)
    assert [r["round"] for r in records if "nc1" in r] == [1, 2, 3, 4, 5]
    for task, record in enumerate(records):
        assert set(NEURAL_COLLAPSE) <= set(record)
        assert record["cka_per_task"][: task + 1] == R[task, : task + 1].tolist()  # at full precision
        assert record["cka_per_task"][task + 1 :] == [None] * (4 - task)
    summary = json.loads((finished / "summary.json").read_text())
    assert {key: summary[key] for key in NEURAL_COLLAPSE} == {key: records[-1][key] for key in NEURAL_COLLAPSE}
    assert summary["cka_first_last"] == R[4, 0]
    assert summary["cka_consecutive_mean"] == pytest.approx(np.mean([R[i, i - 1] for i in range(1, 5)]))
    tags = EventAccumulator(str(finished / "tb")).Reload().Tags()["scalars"]
    assert {"nc1", "nc2_equiangular", "cka_task/0", "summary/cka_first_last"} <= set(tags)
    assert (finished / "plots" / "cka.png").read_bytes().startswith(b"\x89PNG")


def test_a_resumed_run_writes_the_same_cka_matrix_from_the_features_kept_at_earlier_task_ends(finished, tmp_path):
    resumed = Path(shutil.copytree(finished, tmp_path / "run"))
    shutil.rmtree(resumed / "checkpoints" / "round-000005")  # as if killed before the last task end's checkpoint
    (resumed / "cka_features" / "task-0004.npz").write_bytes(b"left by the killed attempt")  # not read: rewritten
    run_experiment(resumed, RUN, resume=True)
    assert (resumed / "cka_matrix.csv").read_bytes() == (finished / "cka_matrix.csv").read_bytes()
    assert numbers_of(resumed) == numbers_of(finished)


def test_a_resume_without_the_features_of_a_recorded_task_end_is_refused_naming_the_file(finished, tmp_path):
    resumed = Path(shutil.copytree(finished, tmp_path / "run"))
    shutil.rmtree(resumed / "checkpoints" / "round-000005")
    (resumed / "cka_features" / "task-0002.npz").unlink()
    with pytest.raises(ConfigError, match=r"task-0002\.npz: .*needs the features of task 2's end"):
        run_experiment(resumed, RUN, resume=True)
