"""How the Ray backend deals a round's jobs to its actors."""

from __future__ import annotations

import numpy as np
import pytest

from simulator.backends import balanced_shares
from simulator.worker import TRAIN, ClientJob


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
