"""Edge cases of a round's clients: one with no training samples, and many that block at once."""

from __future__ import annotations

import math
import time

import pytest
import torch
from helpers import TINY, read_metrics, run_experiment, tiny_model, train_context

from clients import METHODS
from simulator.backends import ClientFailure
from simulator.config import ClientConfig

# Dirichlet(0.05) over 50 clients with no minimum: clients 10, 17, 21, 24 and 31 get no sample of
# digits (seed 0), and each round's 20 sampled clients include some of them.
EMPTY_CLIENTS = [
    "data.partition.kind=dirichlet",
    "data.partition.alpha=0.05",
    "data.partition.min_size=0",
    "federation.num_clients=50",
    "federation.clients_per_round=20",
]


@pytest.mark.parametrize("method", ["sgd", "fedprox", "ewc", "lwf", "replay", "fedper", "fedrep"])
def test_a_client_without_samples_trains_nothing_and_reports_zero_examples_and_a_finite_loss(method):
    model = tiny_model()
    before = {k: v.clone() for k, v in model.state_dict().items()}
    config = ClientConfig(method=method, lr=0.1, epochs=2, batch_size=8)
    client = METHODS.resolve(method)(config)
    empty_x, empty_y = torch.zeros(0, 1, 8, 8), torch.zeros(0, dtype=torch.int64)
    result = client.train(model, empty_x, empty_y, train_context(server_round=1))
    assert result.num_examples == 0
    assert result.train_loss == 0.0
    assert all(math.isfinite(v) for v in result.metrics.values())
    assert all(torch.equal(before[k], v) for k, v in model.state_dict().items())  # the global weights, untouched


@pytest.mark.parametrize("method", ["sgd", "ewc", "lwf"])
def test_a_run_with_clients_without_samples_completes_with_finite_losses_and_counts_them(tmp_path, method):
    summary = run_experiment(tmp_path, [*TINY, *EMPTY_CLIENTS, f"client.method={method}"])
    records = read_metrics(tmp_path)
    assert [r["round"] for r in records] == [1, 2, 3]
    assert all(math.isfinite(r["train_loss"]) for r in records)
    # Sampled clients with no samples per round (2, 3 and 1): the strategy's weighted mean of a
    # count every reply carries, so equal to it up to rounding.
    assert [r["train/empty_clients"] for r in records] == pytest.approx([2, 3, 1])
    assert all(r["nonfinite_dropped"] == 0 for r in records)  # not counted as divergence
    assert math.isfinite(summary["final_accuracy"])


def test_clients_without_samples_are_not_counted_as_diverged_when_dropping_nonfinite_replies(tmp_path):
    run_experiment(tmp_path, [*TINY, *EMPTY_CLIENTS, "engine.on_nonfinite=drop"])
    assert [r["nonfinite_dropped"] for r in read_metrics(tmp_path)] == [0, 0, 0]


def test_runs_without_empty_clients_report_no_count(tmp_path):
    run_experiment(tmp_path, TINY)
    assert not any("train/empty_clients" in r for r in read_metrics(tmp_path))


def test_a_round_whose_every_sampled_client_has_no_samples_fails_naming_them_not_dividing_by_zero(tmp_path):
    # Of 20 clients, 5 and 9 have no samples; with one client a round, round 18 samples client 5.
    overrides = [
        "rounds=18",
        "engine.backend=local",
        *EMPTY_CLIENTS[:3],
        "federation.num_clients=20",
        "federation.clients_per_round=1",
        "strategy.min_available_nodes=1",
    ]
    with pytest.raises(ClientFailure, match=r"round 18: no sampled client \(\[5\]\) has training samples"):
        run_experiment(tmp_path, overrides)
    assert [r["round"] for r in read_metrics(tmp_path)][-1] == 17  # the rounds before it finished


def test_replay_after_a_round_without_samples_on_the_task_it_left(tmp_path):
    overrides = [
        *TINY,
        "scenario=digits_class_incremental",
        "stream.rounds_per_task=2",
        "client.method=replay",
        *EMPTY_CLIENTS,
    ]
    run_experiment(tmp_path, overrides)


def test_a_worker_stops_at_its_first_failed_client_instead_of_timing_out_every_one(tmp_path, user_code):
    overrides = [
        "rounds=2",
        "engine.backend=local",
        "federation.clients_per_round=10",
        "engine.client_timeout_s=2",
        "client.method=sleepy_clients.SleepsInBegin",  # every client blocks for 30 s
    ]
    started = time.monotonic()
    with pytest.raises(ClientFailure) as failure:
        run_experiment(tmp_path, overrides)
    elapsed = time.monotonic() - started
    assert elapsed < 8, f"{elapsed:.1f} s: the worker went on after the first timeout"  # was 10 x 2 s
    first_line = str(failure.value).splitlines()[0]
    named = int(first_line.split()[1])
    assert first_line == f"client {named} failed in round 1:"
    assert f"client {named} ran longer than engine.client_timeout_s = 2.0 s in round 1" in str(failure.value)
    assert "not run" not in str(failure.value)
