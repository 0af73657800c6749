"""Partitioners and the client test sample: coverage, seeding, skew, and config errors."""

from __future__ import annotations

import dataclasses

import numpy as np
import pytest

from simulator.config import ConfigError, PartitionConfig
from simulator.data import PARTITIONERS, partition, sample_by_label

NUM_SAMPLES, NUM_CLASSES, NUM_CLIENTS = 2000, 10, 20

CONFIGS = {
    "iid": PartitionConfig(kind="iid"),
    "dirichlet": PartitionConfig(kind="dirichlet", alpha=0.5, min_size=5),
    "classes": PartitionConfig(kind="classes", classes_per_client=3),
    "shards": PartitionConfig(kind="shards", shards_per_client=2),
    "natural": PartitionConfig(kind="natural"),
}


@pytest.fixture(scope="module")
def labels() -> np.ndarray:
    return np.random.default_rng(0).integers(0, NUM_CLASSES, NUM_SAMPLES)


@pytest.fixture(scope="module")
def groups() -> np.ndarray:
    return np.random.default_rng(1).permutation(np.arange(NUM_SAMPLES) % NUM_CLIENTS)


def split(labels, kind, seed, groups=None, num_clients=NUM_CLIENTS, **overrides):
    cfg = dataclasses.replace(CONFIGS[kind], **overrides)
    return partition(labels, num_clients, cfg, np.random.default_rng(seed), groups)


def class_share_max(parts, labels):
    """Mean over non-empty clients of the share of the client's most common label."""
    return np.mean([np.bincount(labels[p]).max() / len(p) for p in parts if len(p)])


def test_registry_has_every_kind():
    assert sorted(PARTITIONERS) == sorted(CONFIGS)


@pytest.mark.parametrize("kind", sorted(CONFIGS))
def test_every_sample_assigned_exactly_once(kind, labels, groups):
    parts = split(labels, kind, seed=3, groups=groups)
    assert len(parts) == NUM_CLIENTS
    for part in parts:
        assert part.dtype == np.int64
        assert np.all(np.diff(part) > 0)  # sorted, no repeats
    np.testing.assert_array_equal(np.sort(np.concatenate(parts)), np.arange(NUM_SAMPLES))


@pytest.mark.parametrize("kind", sorted(CONFIGS))
def test_same_seed_same_partition(kind, labels, groups):
    first, second = split(labels, kind, 4, groups), split(labels, kind, 4, groups)
    for a, b in zip(first, second, strict=True):
        np.testing.assert_array_equal(a, b)


@pytest.mark.parametrize("kind", ["iid", "dirichlet", "classes", "shards"])
def test_different_seed_different_partition(kind, labels):
    first, second = split(labels, kind, 4), split(labels, kind, 5)
    assert any(not np.array_equal(a, b) for a, b in zip(first, second))


def test_iid_sizes_differ_by_at_most_one(labels):
    sizes = [len(p) for p in split(labels, "iid", 0, num_clients=7)]
    assert max(sizes) - min(sizes) <= 1


def test_iid_is_not_label_skewed(labels):
    assert class_share_max(split(labels, "iid", 0), labels) < 0.25


def test_dirichlet_small_alpha_is_more_skewed(labels):
    skewed = class_share_max(split(labels, "dirichlet", 0, alpha=0.05, min_size=0), labels)
    balanced = class_share_max(split(labels, "dirichlet", 0, alpha=100.0, min_size=0), labels)
    assert skewed > 0.6
    assert balanced < 0.25


def test_dirichlet_respects_min_size(labels):
    unconstrained = split(labels, "dirichlet", 0, alpha=0.5, min_size=0)
    constrained = split(labels, "dirichlet", 0, alpha=0.5, min_size=50)
    assert min(len(p) for p in unconstrained) < 50  # so the constraint had work to do
    assert min(len(p) for p in constrained) >= 50


def test_dirichlet_impossible_min_size_names_keys(labels):
    with pytest.raises(ConfigError, match="data.partition.min_size") as error:
        split(labels, "dirichlet", 0, min_size=NUM_SAMPLES // NUM_CLIENTS + 1)
    assert "data.partition.alpha" in str(error.value)


def test_classes_gives_each_client_exactly_k_labels_and_covers_all(labels):
    parts = split(labels, "classes", 0, classes_per_client=3)
    held = [set(np.unique(labels[p]).tolist()) for p in parts]
    assert all(len(h) == 3 for h in held)
    assert set().union(*held) == set(range(NUM_CLASSES))


def test_classes_splits_each_class_evenly_among_holders(labels):
    parts = split(labels, "classes", 0, classes_per_client=3)
    for c in range(NUM_CLASSES):
        counts = [np.sum(labels[p] == c) for p in parts]
        holding = [n for n in counts if n]
        assert max(holding) - min(holding) <= 1


def test_classes_works_with_one_client_per_class_slot(labels):
    parts = split(labels, "classes", 0, num_clients=5, classes_per_client=2)
    assert sorted(np.concatenate([np.unique(labels[p]) for p in parts]).tolist()) == list(range(10))


def test_classes_more_than_dataset_has(labels):
    with pytest.raises(ConfigError, match="data.partition.classes_per_client") as error:
        split(labels, "classes", 0, classes_per_client=NUM_CLASSES + 1)
    assert f"{NUM_CLASSES} classes" in str(error.value)


def test_classes_too_few_clients_to_cover_classes(labels):
    with pytest.raises(ConfigError, match="data.partition.classes_per_client"):
        split(labels, "classes", 0, num_clients=4, classes_per_client=2)


def test_classes_class_smaller_than_its_holders():
    labels = np.array([0] * 50 + [1] * 2)
    with pytest.raises(ConfigError, match="label 1 has 2 samples"):
        cfg = PartitionConfig(kind="classes", classes_per_client=2)
        partition(labels, 4, cfg, np.random.default_rng(0))


def test_shards_sizes_and_label_spread(labels):
    shard_size = NUM_SAMPLES // (NUM_CLIENTS * 2)
    parts = split(labels, "shards", 0, shards_per_client=2)
    assert all(len(p) == 2 * shard_size for p in parts)
    # A shard is smaller than any class, so it spans at most two labels.
    assert all(len(np.unique(labels[p])) <= 4 for p in parts)
    assert class_share_max(parts, labels) > 0.4


def test_shards_are_dealt_at_random(labels):
    # The shard boundaries fall at the same places of the label-sorted data for every
    # seed, so only a random deal gives clients different label sets under other seeds.
    def label_sets(seed):
        return [set(np.unique(labels[p]).tolist()) for p in split(labels, "shards", seed)]

    assert label_sets(0) != label_sets(1)


def test_shards_uneven_total_still_covers_everything():
    labels = np.arange(103) % 3
    parts = split(labels, "shards", 0, num_clients=5, shards_per_client=2)
    np.testing.assert_array_equal(np.sort(np.concatenate(parts)), np.arange(103))
    assert max(map(len, parts)) - min(map(len, parts)) <= 2


def test_shards_more_than_samples():
    with pytest.raises(ConfigError, match="data.partition.shards_per_client"):
        split(np.zeros(30, dtype=np.int64), "shards", 0, num_clients=10, shards_per_client=4)


def test_natural_matches_groups(labels, groups):
    parts = split(labels, "natural", 0, groups=groups)
    for i, part in enumerate(parts):
        np.testing.assert_array_equal(part, np.flatnonzero(groups == i))


def test_natural_needs_groups(labels):
    with pytest.raises(ConfigError, match="data.partition.kind"):
        split(labels, "natural", 0)


def test_natural_needs_one_client_per_group(labels, groups):
    with pytest.raises(ConfigError, match="federation.num_clients"):
        split(labels, "natural", 0, groups=groups, num_clients=NUM_CLIENTS + 1)


def test_unknown_kind_lists_valid_kinds(labels):
    with pytest.raises(ConfigError, match="data.partition.kind") as error:
        partition(labels, 5, PartitionConfig(kind="pathological"), np.random.default_rng(0))
    assert all(kind in str(error.value) for kind in CONFIGS)


def test_more_clients_than_samples():
    with pytest.raises(ConfigError, match="federation.num_clients"):
        partition(np.zeros(5, dtype=np.int64), 6, PartitionConfig(), np.random.default_rng(0))


def test_sample_by_label_follow_the_client_histogram():
    test_labels = np.repeat(np.arange(NUM_CLASSES), 50)
    client_counts = np.bincount([2] * 300 + [5] * 100, minlength=NUM_CLASSES)
    rng = np.random.default_rng(0)
    drawn = sample_by_label(test_labels, client_counts, 4000, rng)
    assert set(test_labels[drawn].tolist()) == {2, 5}
    assert np.mean(test_labels[drawn] == 2) == pytest.approx(0.75, abs=0.03)
    # Uniform within a class: every test sample of label 5 turns up among ~1000 draws.
    fives = drawn[test_labels[drawn] == 5]
    assert set(fives.tolist()) == set(np.flatnonzero(test_labels == 5).tolist())


def test_sample_by_label_skip_labels_missing_from_test_set():
    test_labels = np.array([0, 1, 1, 3, 3, 3])
    client_counts = np.array([0, 1, 4, 0])  # label 2 has no test samples
    drawn = sample_by_label(test_labels, client_counts, 200, np.random.default_rng(0))
    assert set(test_labels[drawn].tolist()) == {1}


def test_sample_by_label_are_seeded_and_fall_back_to_uniform():
    test_labels = np.array([0, 0, 1, 1])
    no_data = np.zeros(3)

    def draw(seed):
        return sample_by_label(test_labels, no_data, 50, np.random.default_rng(seed))

    np.testing.assert_array_equal(draw(1), draw(1))
    assert set(draw(1).tolist()) == {0, 1, 2, 3}
