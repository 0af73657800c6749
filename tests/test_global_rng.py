"""A user's method drawing from torch's global generator still gives a seeded run the same numbers.

The worker seeds that generator per client and round (``seed_torch_global``); without
it the draws would go on from wherever the process's generator was, run to run.
"""

from __future__ import annotations

from helpers import USER_CODE, numbers_of, run_experiment

OVERRIDES = ["engine.backend=local", "rounds=2"]


def test_global_generator_draws_repeat_with_the_seed_and_matter(tmp_path, monkeypatch):
    monkeypatch.syspath_prepend(str(USER_CODE))
    noisy = [*OVERRIDES, "client.method=global_rng_method.NoisyGradients"]
    run_experiment(tmp_path / "first", noisy)
    run_experiment(tmp_path / "second", noisy)
    run_experiment(tmp_path / "plain", [*OVERRIDES, "client.method=sgd"])
    assert numbers_of(tmp_path / "first") == numbers_of(tmp_path / "second")
    assert numbers_of(tmp_path / "first") != numbers_of(tmp_path / "plain")  # the noise is in the numbers
