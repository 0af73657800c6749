"""Continual-learning metrics on small hand-computed accuracy matrices."""

import numpy as np
import pytest

from simulator import metrics

# R[i][j]: accuracy on task j after task i.
R3 = np.array(
    [
        [0.9, 0.1, 0.0],
        [0.6, 0.8, 0.2],
        [0.7, 0.5, 0.9],
    ]
)


def test_three_tasks_match_hand_computed_values():
    summary = metrics.summarize(R3, initial=np.array([0.1, 0.1, 0.1]))
    assert summary["average_accuracy"] == pytest.approx((0.7 + 0.5 + 0.9) / 3)
    assert summary["average_incremental_accuracy"] == pytest.approx((0.9 + 0.7 + 0.7) / 3)
    # forgetting: task 0 peaked at 0.9, ends 0.7; task 1 peaked at 0.8, ends 0.5
    assert summary["forgetting"] == pytest.approx((0.2 + 0.3) / 2)
    assert summary["bwt"] == pytest.approx((-0.2 - 0.3) / 2)
    # fwt: R[0][1] - 0.1 = 0.0 and R[1][2] - 0.1 = 0.1
    assert summary["fwt"] == pytest.approx(0.05)


def test_a_task_that_improves_later_has_negative_forgetting_and_positive_bwt():
    R = np.array([[0.5, 0.0], [0.8, 0.9]])
    assert metrics.forgetting(R) == pytest.approx(-0.3)
    assert metrics.backward_transfer(R) == pytest.approx(0.3)


def test_one_task_has_no_transfer_metrics():
    R = np.array([[0.93]])
    summary = metrics.summarize(R)
    assert summary["average_accuracy"] == pytest.approx(0.93)
    assert summary["average_incremental_accuracy"] == pytest.approx(0.93)
    assert summary["forgetting"] is None
    assert summary["bwt"] is None
    assert summary["fwt"] is None


def test_fwt_needs_the_initial_accuracies():
    assert metrics.forward_transfer(R3, None) is None


def test_a_task_never_reached_is_ignored_and_negative_forgetting_is_kept():
    # Two tasks reached out of three: the third column (never trained) does not count.
    R = np.array([[0.6, 0.05, 0.1], [0.9, 0.8, 0.3]])
    summary = metrics.summarize(R, initial=np.array([0.1, 0.1, 0.1]))
    assert summary["average_accuracy"] == pytest.approx((0.9 + 0.8) / 2)
    assert summary["average_incremental_accuracy"] == pytest.approx((0.6 + (0.9 + 0.8) / 2) / 2)
    assert summary["forgetting"] == pytest.approx(0.6 - 0.9)  # task 0 improved: -0.3
    assert summary["forgetting_after_training"] == pytest.approx(-0.3)
    assert summary["bwt"] == pytest.approx(0.3)
    assert summary["fwt"] == pytest.approx(0.05 - 0.1)


def test_forgetting_after_training_differs_from_chaudhry_when_a_task_peaked_later():
    # Task 0: 0.5 right after training, peaks at 0.9 during task 1, ends at 0.4.
    R = np.array([[0.5, 0.0, 0.0], [0.9, 0.7, 0.0], [0.4, 0.6, 0.8]])
    assert metrics.forgetting(R) == pytest.approx(((0.9 - 0.4) + (0.7 - 0.6)) / 2)
    assert metrics.forgetting_after_training(R) == pytest.approx(((0.5 - 0.4) + (0.7 - 0.6)) / 2)


def test_accuracy_spread_of_clients():
    accuracies = np.array([0.9, 0.1, 0.5, 0.7, 0.8, 0.6, 0.4, 0.3, 0.2, 1.0, 0.55])
    spread = metrics.accuracy_spread(accuracies)
    assert spread["client_acc_mean"] == pytest.approx(accuracies.mean())
    assert spread["client_acc_std"] == pytest.approx(accuracies.std())
    assert spread["client_acc_worst10"] == pytest.approx((0.1 + 0.2) / 2)  # ceil(10% of 11) = 2
