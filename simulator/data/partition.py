"""Splitting a training set across clients, and drawing a client's local test sample.

Each partitioner decides one owner for every sample, so every sample goes to
exactly one client, and returns one sorted int64 index array per client. All
randomness comes from the generator passed in.
"""

from __future__ import annotations

from collections.abc import Callable

import numpy as np

from simulator.config import ConfigError, PartitionConfig
from simulator.data.ordering import by_label

MAX_DIRICHLET_DRAWS = 100


def _by_owner(owner: np.ndarray, num_clients: int) -> list[np.ndarray]:
    """Each client's sorted sample indices, from each sample's owner."""
    order = np.argsort(owner, kind="stable")  # stable: indices ascending within a client
    bounds = np.cumsum(np.bincount(owner, minlength=num_clients))[:-1]
    return np.split(order.astype(np.int64, copy=False), bounds)


def iid(labels: np.ndarray, num_clients: int, rng: np.random.Generator) -> list[np.ndarray]:
    """A random split into ``num_clients`` parts whose sizes differ by at most one."""
    owner = rng.permutation(np.arange(len(labels)) % num_clients)
    return _by_owner(owner, num_clients)


def dirichlet(
    labels: np.ndarray, num_clients: int, rng: np.random.Generator, *, alpha: float, min_size: int
) -> list[np.ndarray]:
    """Each class split over the clients in proportions drawn from Dir(alpha).

    Small ``alpha`` gives each client few classes; large ``alpha`` approaches
    the i.i.d. split. The proportions are redrawn, all classes at once, until
    every client holds at least ``min_size`` samples.
    """
    class_sizes = np.bincount(labels)
    class_sizes = class_sizes[class_sizes > 0]
    best = 0
    for _ in range(MAX_DIRICHLET_DRAWS):
        shares = rng.dirichlet(np.full(num_clients, alpha), size=len(class_sizes))
        # Cut each class at its cumulative shares: counts[c, i] samples of class c go to client i.
        cuts = np.floor(np.cumsum(shares, axis=1) * class_sizes[:, None]).astype(np.int64)
        cuts[:, -1] = class_sizes
        counts = np.diff(cuts, axis=1, prepend=0)
        smallest = int(counts.sum(axis=0).min())
        if smallest >= min_size:
            clients = np.tile(np.arange(num_clients), len(class_sizes))
            owner = np.empty(len(labels), dtype=np.int64)
            owner[by_label(labels, rng)[0]] = np.repeat(clients, counts.ravel())
            return _by_owner(owner, num_clients)
        best = max(best, smallest)
    raise ConfigError(
        f"data.partition.min_size = {min_size}: in {MAX_DIRICHLET_DRAWS} draws with "
        f"data.partition.alpha = {alpha}, the smallest of {num_clients} clients never got more "
        f"than {best} of the {len(labels)} samples; lower min_size, raise alpha or use "
        "fewer clients"
    )


def classes(
    labels: np.ndarray, num_clients: int, rng: np.random.Generator, *, classes_per_client: int
) -> list[np.ndarray]:
    """Each client holds exactly ``classes_per_client`` labels; every label is held by some client.

    With ``perm`` a random order of the C labels present, client i holds
    ``perm[(i * k + j) % C]`` for ``j < k``. Each label's samples are dealt at
    random, as evenly as possible, among the clients that hold it.
    """
    present, class_of = np.unique(labels, return_inverse=True)
    k, num_classes = classes_per_client, len(present)
    if k > num_classes:
        raise ConfigError(f"data.partition.classes_per_client = {k}: the dataset has only {num_classes} classes")
    if num_clients * k < num_classes:
        raise ConfigError(
            f"data.partition.classes_per_client = {k}: with federation.num_clients = "
            f"{num_clients}, {num_clients * k} client slots cannot cover all {num_classes} classes"
        )
    slot_class = rng.permutation(num_classes)[np.arange(num_clients * k) % num_classes]
    slot_order = by_label(slot_class, rng)[0]  # each class's slots, in random order
    holders = slot_order // k  # the client of each slot
    num_holders = np.bincount(slot_class, minlength=num_classes)
    class_sizes = np.bincount(class_of, minlength=num_classes)
    short = np.flatnonzero(class_sizes < num_holders)
    if len(short):
        c = short[0]
        raise ConfigError(
            f"data.partition.classes_per_client = {k}: label {present[c]} has {class_sizes[c]} "
            f"samples but {num_holders[c]} clients hold it; lower classes_per_client or "
            f"federation.num_clients = {num_clients}"
        )
    order, rank = by_label(class_of, rng)
    sorted_class = class_of[order]
    first_holder = np.cumsum(num_holders) - num_holders
    owner = np.empty(len(labels), dtype=np.int64)
    owner[order] = holders[first_holder[sorted_class] + rank % num_holders[sorted_class]]
    return _by_owner(owner, num_clients)


def shards(
    labels: np.ndarray, num_clients: int, rng: np.random.Generator, *, shards_per_client: int
) -> list[np.ndarray]:
    """McMahan et al. (2017): label-sorted shards, ``shards_per_client`` dealt to each client.

    The samples, sorted by label (in random order within a label), are cut
    into ``num_clients * shards_per_client`` contiguous shards whose sizes
    differ by at most one, and the shards are dealt out at random.
    """
    num_shards = num_clients * shards_per_client
    if num_shards > len(labels):
        raise ConfigError(
            f"data.partition.shards_per_client = {shards_per_client}: {num_clients} clients x "
            f"{shards_per_client} shards = {num_shards} shards, more than the {len(labels)} samples"
        )
    shard_of_position = np.arange(len(labels)) * num_shards // len(labels)
    shard_owner = np.empty(num_shards, dtype=np.int64)
    shard_owner[rng.permutation(num_shards)] = np.arange(num_shards) // shards_per_client
    owner = np.empty(len(labels), dtype=np.int64)
    owner[by_label(labels, rng)[0]] = shard_owner[shard_of_position]
    return _by_owner(owner, num_clients)


def natural(labels: np.ndarray, num_clients: int, groups: np.ndarray | None) -> list[np.ndarray]:
    """Client i gets the samples of group i: the source's own clients (synthetic data)."""
    if groups is None:
        raise ConfigError(
            "data.partition.kind = 'natural' needs a dataset with natural client groups "
            "(only data.dataset = 'synthetic' has them)"
        )
    if len(groups) != len(labels):
        raise ValueError(f"{len(groups)} groups for {len(labels)} samples")
    group_ids = np.unique(groups)
    if not np.array_equal(group_ids, np.arange(num_clients)):
        raise ConfigError(
            f"federation.num_clients = {num_clients}: data.partition.kind = 'natural' needs one "
            f"client per group, and the dataset has {len(group_ids)} groups"
        )
    return _by_owner(np.asarray(groups, dtype=np.int64), num_clients)


Partitioner = Callable[[np.ndarray, int, PartitionConfig, np.random.Generator, np.ndarray | None], list[np.ndarray]]

PARTITIONERS: dict[str, Partitioner] = {
    "iid": lambda labels, n, partition_config, rng, groups: iid(labels, n, rng),
    "dirichlet": lambda labels, n, partition_config, rng, groups: dirichlet(
        labels, n, rng, alpha=partition_config.alpha, min_size=partition_config.min_size
    ),
    "classes": lambda labels, n, partition_config, rng, groups: classes(
        labels, n, rng, classes_per_client=partition_config.classes_per_client
    ),
    "shards": lambda labels, n, partition_config, rng, groups: shards(
        labels, n, rng, shards_per_client=partition_config.shards_per_client
    ),
    "natural": lambda labels, n, partition_config, rng, groups: natural(labels, n, groups),
}


def partition(
    labels: np.ndarray,
    num_clients: int,
    partition_config: PartitionConfig,
    rng: np.random.Generator,
    groups: np.ndarray | None = None,
) -> list[np.ndarray]:
    """Split the samples with ``labels`` over ``num_clients`` clients as ``partition_config.kind`` says.

    Returns one sorted int64 index array per client; together they hold every
    sample exactly once. ``groups`` is each sample's natural client, where the
    dataset has one (for ``kind = 'natural'``).
    """
    if partition_config.kind not in PARTITIONERS:
        raise ConfigError(
            f"data.partition.kind = {partition_config.kind!r}: unknown partition; valid: {sorted(PARTITIONERS)}"
        )
    if num_clients > len(labels):
        raise ConfigError(
            f"federation.num_clients = {num_clients}: more clients than the {len(labels)} training samples"
        )
    return PARTITIONERS[partition_config.kind](
        np.asarray(labels, dtype=np.int64), num_clients, partition_config, rng, groups
    )


def sample_by_label(
    test_labels: np.ndarray, label_weights: np.ndarray, size: int, rng: np.random.Generator
) -> np.ndarray:
    """``size`` test indices, drawn with replacement, with label probabilities from ``label_weights``.

    ``label_weights[c]`` is label c's weight (e.g. a client's label counts or
    prior); labels absent from the test set are dropped and the rest
    renormalized, then a test sample of the drawn label is taken uniformly.
    With no weight left (no data, or none of its labels in the test set) the
    draw is uniform over the whole test set.
    """
    test_labels = np.asarray(test_labels, dtype=np.int64)
    num_classes = len(label_weights)
    in_test = np.bincount(test_labels, minlength=num_classes)[:num_classes]
    weights = np.asarray(label_weights, dtype=float) * (in_test > 0)
    if weights.sum() == 0:
        return rng.integers(0, len(test_labels), size)
    drawn = rng.choice(num_classes, size=size, p=weights / weights.sum())
    by_test_label = np.argsort(test_labels, kind="stable")
    first = np.cumsum(in_test) - in_test
    return by_test_label[first[drawn] + rng.integers(0, in_test[drawn])]
