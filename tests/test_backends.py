"""How the Ray backend deals a round's jobs to its actors."""

from __future__ import annotations

from dataclasses import replace

import numpy as np
import pytest

from simulator.backends import balanced_shares
from simulator.protocol import TRAIN, ClientJob, PreviousTask


def _jobs(sizes):
    return [ClientJob(client, TRAIN, 1, 0, np.arange(size)) for client, size in enumerate(sizes)]


@pytest.mark.parametrize("num_actors", [1, 2, 3, 7])
def test_every_job_goes_to_one_actor_in_job_order_and_loads_differ_by_at_most_one_job(num_actors):
    sizes = np.random.default_rng(num_actors).lognormal(3.0, 1.0, 50).astype(int) + 1
    shares = balanced_shares(_jobs(sizes), num_actors)
    assert len(shares) == num_actors
    assert sorted(p for share in shares for p in share) == list(range(len(sizes)))
    assert all(share == sorted(share) for share in shares)
    loads = [sum(sizes[p] + 1 for p in share) for share in shares]
    assert max(loads) - min(loads) <= max(sizes) + 1  # largest-first to the least loaded


def test_one_big_client_gets_an_actor_to_itself():
    shares = balanced_shares(_jobs([100, 10, 10, 10, 10, 10]), 2)
    assert shares == [[0], [1, 2, 3, 4, 5]]


def test_dealing_depends_only_on_the_jobs():
    jobs = _jobs([5, 9, 9, 3, 9, 1])
    assert balanced_shares(jobs, 3) == balanced_shares(list(jobs), 3) == [[0, 1], [2, 3], [4, 5]]


def test_a_job_that_starts_a_new_task_counts_the_samples_of_the_task_it_left():
    # Four equal jobs; the first also works on 30 samples of its previous task (EWC's Fisher).
    jobs = _jobs([10, 10, 10, 10])
    jobs[0] = replace(jobs[0], new_task=True, previous=PreviousTask(0, np.arange(30)))
    assert balanced_shares(jobs, 2) == [[0], [1, 2, 3]]
    assert balanced_shares(_jobs([10, 10, 10, 10]), 2) == [[0, 2], [1, 3]]
