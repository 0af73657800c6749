"""Each stream's defining property, checked over every round and client."""

from __future__ import annotations

import numpy as np
import pytest
from helpers import compose_run, stream_of

from simulator.config import ConfigError
from simulator.streams.class_incremental import ABSENT


def make_stream(overrides: list[str]):
    run = compose_run(overrides)
    return stream_of(run), run


CLASS_IL = ["scenario=digits_class_incremental"]


def test_no_client_ever_trains_on_a_class_outside_its_live_task():
    stream, run = make_stream(CLASS_IL)
    assert [c.tolist() for c in stream.classes] == [[0, 1], [2, 3], [4, 5], [6, 7], [8, 9]]
    for server_round in range(1, stream.default_rounds + 1):
        task = stream.task_of_round(server_round)
        assert task == (server_round - 1) // 10
        for client in stream.available_clients(server_round):
            labels = set(stream.y_train[stream.train_indices(server_round, client)].tolist())
            assert labels <= set(stream.classes[task].tolist())
    for task in range(stream.num_tasks):
        assert set(stream.y_test[stream.task_test_indices(task)].tolist()) == set(stream.classes[task].tolist())


def test_each_tasks_samples_are_split_once_over_the_clients():
    stream, _ = make_stream(CLASS_IL)
    for task, classes in enumerate(stream.classes):
        held = np.sort(np.concatenate(stream.parts[task]))
        np.testing.assert_array_equal(held, np.flatnonzero(np.isin(stream.y_train, classes)))


def test_class_order_is_seeded_and_explicit_tasks_are_kept():
    shuffled = [
        c.tolist() for c in make_stream([*CLASS_IL, "stream.class_incremental.shuffle_classes=true"])[0].classes
    ]
    again = [c.tolist() for c in make_stream([*CLASS_IL, "stream.class_incremental.shuffle_classes=true"])[0].classes]
    assert shuffled == again and shuffled != [[0, 1], [2, 3], [4, 5], [6, 7], [8, 9]]
    assert sorted(c for task in shuffled for c in task) == list(range(10))
    explicit, _ = make_stream([*CLASS_IL, "stream.class_incremental.tasks=[[9,8,7],[0,1,2]]"])
    assert [c.tolist() for c in explicit.classes] == [[9, 8, 7], [0, 1, 2]]
    assert explicit.default_rounds == 20


def test_task_incremental_masks_logits_to_the_live_tasks_classes():
    stream, _ = make_stream([*CLASS_IL, "stream.class_incremental.task_incremental=true"])
    assert np.flatnonzero(stream.class_mask(15, 0)).tolist() == [2, 3]
    assert np.flatnonzero(stream.task_mask(4)).tolist() == [8, 9]
    assert make_stream(CLASS_IL)[0].class_mask(15, 0) is None


def test_clients_on_their_own_schedule_visit_every_task_in_their_own_order_and_pace():
    stream, run = make_stream(["scenario=digits_async_tasks"])
    orders = []
    for client in range(stream.num_clients):
        tasks = [stream.client_task(r, client) for r in range(1, stream.default_rounds + 1)]
        changes = [0, *[i for i in range(1, len(tasks)) if tasks[i] != tasks[i - 1]]]
        order = [tasks[i] for i in changes]
        paces = np.diff([*changes, len(tasks)])[:-1]  # the last task runs to the end
        assert all(5 <= p <= 15 for p in paces)
        assert len(set(order)) == len(order)  # no task twice
        orders.append(tuple(order))
        for r in range(1, stream.default_rounds + 1):
            labels = set(stream.y_train[stream.train_indices(r, client)].tolist())
            assert labels <= set(stream.classes[stream.client_task(r, client)].tolist())
    assert len(set(orders)) > stream.num_clients // 2  # clients really differ
    assert stream.seen_tasks(1).sum() > 1  # at round 1 clients already span several tasks


def test_clients_join_at_boundaries_and_some_stay_on_old_classes():
    stream, run = make_stream(["scenario=digits_joining_clients"])
    present = [len(stream.available_clients(1 + 10 * t)) for t in range(stream.num_tasks)]
    assert present[0] == 10 and present[-1] == 20 and present == sorted(present)
    stayed = 0
    for t in range(1, stream.num_tasks):
        before = set(stream.available_clients(10 * t))
        for client in stream.available_clients(1 + 10 * t):
            task = stream.client_task(1 + 10 * t, client)
            if client not in before:
                assert task == t  # a joining client starts on the live task
            else:
                assert task in (t, stream.client_task(10 * t, client))
                stayed += task < t
    assert stayed > 0
    assert (stream.schedule == ABSENT).sum() > 0


def test_too_few_clients_at_the_start_is_rejected():
    with pytest.raises(ConfigError, match="stream.class_incremental.initial_clients = 0.3: only 6 clients"):
        make_stream(["scenario=digits_joining_clients", "stream.class_incremental.initial_clients=0.3"])


def test_permuted_tasks_shuffle_the_same_pixels_of_the_same_images():
    stream, run = make_stream(["scenario=permuted_digits"])
    n = stream.train_size
    base = stream.x_train[:n].reshape(n, -1)
    for task in range(1, stream.num_tasks):
        shifted = stream.x_train[task * n : (task + 1) * n].reshape(n, -1)
        np.testing.assert_array_equal(np.sort(shifted, axis=1), np.sort(base, axis=1))
        assert not np.array_equal(shifted, base)
        np.testing.assert_array_equal(stream.y_train[task * n : (task + 1) * n], stream.y_train[:n])
    indices = stream.train_indices(25, 3)  # task 2
    np.testing.assert_array_equal(indices, stream.parts[3] + 2 * n)


def test_rotated_by_90_degrees_is_the_image_turned_a_quarter():
    stream, run = make_stream(["scenario=rotated_digits", "stream.rotated.num_tasks=2"])
    n = stream.train_size
    turned = stream.x_train[n:]
    expected = np.rot90(stream.x_train[:n], k=1, axes=(2, 3))
    assert (
        np.abs(turned - expected).max() < 1e-5
        or np.abs(turned - np.rot90(stream.x_train[:n], k=-1, axes=(2, 3))).max() < 1e-5
    )


def test_rotation_needs_images():
    with pytest.raises(ConfigError, match="stream.kind = 'rotated' needs images"):
        make_stream(["scenario=rotated_digits", "scenario=synthetic", "stream.kind=rotated"])


LABEL_SHIFT = ["scenario=digits_label_shift"]


def test_under_label_shift_the_trained_labels_follow_each_clients_prior():
    stream, run = make_stream(LABEL_SHIFT)
    drawn, expected = np.zeros(10), np.zeros(10)
    for client in range(stream.num_clients):
        for period in (0, 2):
            rounds = range(1 + 10 * period, 11 + 10 * period)
            labels = np.concatenate([stream.y_train[stream.train_indices(r, client)] for r in rounds])
            counts = np.bincount(labels, minlength=10)
            prior = stream.priors[period, client]
            assert np.abs(counts / len(labels) - prior).sum() < 0.2, (client, period)  # ~720 draws
            drawn, expected = drawn + counts, expected + prior * len(labels)
        assert np.abs(stream.priors[0, client] - stream.priors[2, client]).sum() > 0.3  # it shifted
    assert np.abs(drawn - expected).sum() / expected.sum() < 0.02  # ~29,000 draws in all


def test_swap_exchanges_priors_between_clients_and_gradual_interpolates():
    swap, _ = make_stream([*LABEL_SHIFT, "stream.label_shift.mode=swap"])
    first = {tuple(p) for p in swap.priors[0]}
    assert {tuple(p) for p in swap.priors[3]} == first
    assert not np.array_equal(swap.priors[3], swap.priors[0])
    gradual, _ = make_stream([*LABEL_SHIFT, "stream.label_shift.mode=gradual"])
    halfway = gradual.client_label_distribution(6, 4)  # 5 of 10 rounds into period 0
    np.testing.assert_allclose(halfway, 0.5 * gradual.priors[0, 4] + 0.5 * gradual.priors[1, 4])


def test_label_shift_task_tests_follow_the_periods_mean_prior():
    stream, _ = make_stream(LABEL_SHIFT)
    drawn, expected = np.zeros(10), np.zeros(10)
    for period in range(stream.num_tasks):
        labels = stream.y_test[stream.task_test_indices(period)]
        counts = np.bincount(labels, minlength=10)
        mean_prior = stream.priors[period].mean(axis=0)
        assert np.abs(counts / len(labels) - mean_prior).sum() < 0.3  # 360 draws: L1 noise ~0.12
        drawn, expected = drawn + counts, expected + mean_prior * len(labels)
    assert np.abs(drawn - expected).sum() / expected.sum() < 0.08  # 1,800 draws in all


@pytest.mark.parametrize(
    "scenario", ["digits", "digits_class_incremental", "digits_async_tasks", "permuted_digits", "digits_label_shift"]
)
def test_asking_a_stream_twice_or_rebuilding_it_gives_the_same_answers(scenario):
    first, _ = make_stream([f"scenario={scenario}"])
    second, _ = make_stream([f"scenario={scenario}"])
    for server_round in (1, 12, 33):
        for client in first.available_clients(server_round)[:5]:
            a = first.train_indices(server_round, client)
            np.testing.assert_array_equal(a, first.train_indices(server_round, client))
            np.testing.assert_array_equal(a, second.train_indices(server_round, client))
            np.testing.assert_array_equal(
                first.client_test_indices(server_round, client, 20),
                second.client_test_indices(server_round, client, 20),
            )
