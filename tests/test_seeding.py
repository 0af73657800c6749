"""Derived random streams are independent of each other."""

from simulator.seeding import Purpose, derive_seed, rng


def test_seeds_with_a_trailing_zero_key_are_independent_streams():
    assert derive_seed(0, Purpose.CLIENT_EVAL, 3) != derive_seed(0, Purpose.CLIENT_EVAL, 3, 0)
    assert rng(0, Purpose.PARTITION).integers(1 << 30) != rng(0, Purpose.PARTITION, 0).integers(1 << 30)


def test_purposes_rounds_and_clients_give_different_streams():
    draws = {derive_seed(0, p, r, c) for p in Purpose for r in range(3) for c in range(3)}
    assert len(draws) == len(Purpose) * 9
