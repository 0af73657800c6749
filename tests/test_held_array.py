"""HeldArray: to a strategy it is Flower's Array; it only skips the .npy round trip."""

from __future__ import annotations

import numpy as np
from flwr.app import Array, ArrayRecord, Message
from flwr.serverapp.strategy import FedAvg, FedMedian
from helpers import flower_task_identity, train_reply

from simulator.held_array import HeldArray, held_array_record

RNG = np.random.default_rng(0)
ARRAYS = [RNG.standard_normal((4, 3)).astype(np.float32), RNG.standard_normal(5).astype(np.float32)]


def test_held_array_has_the_bytes_dtype_shape_and_object_id_of_flowers_array():
    held, plain = HeldArray(ARRAYS[0]), Array(ARRAYS[0])
    assert (held.dtype, held.shape, held.stype, held.data) == (plain.dtype, plain.shape, plain.stype, plain.data)
    assert held.object_id == plain.object_id


def test_numpy_returns_a_fresh_copy_like_np_load_would():
    held = HeldArray(ARRAYS[0].copy())
    first = held.numpy()
    first[:] = 0
    np.testing.assert_array_equal(held.numpy(), ARRAYS[0])


def test_setting_data_replaces_the_content():
    held = HeldArray(ARRAYS[0].copy())
    held.data = Array(ARRAYS[0] * 2).data
    np.testing.assert_array_equal(held.numpy(), ARRAYS[0] * 2)
    assert held.object_id == Array(ARRAYS[0] * 2).object_id


def _replies(records: list[ArrayRecord], sizes: list[int]) -> list[Message]:
    flower_task_identity()
    return [
        train_reply(node, record, {"num-examples": size})
        for node, (record, size) in enumerate(zip(records, sizes), start=2)
    ]


def test_flower_strategies_aggregate_held_arrays_to_the_same_bits_as_their_own():
    updates = [[a + i for a in ARRAYS] for i in range(3)]
    keys, sizes = ["w", "b"], [10, 30, 7]
    held = [held_array_record(keys, u) for u in updates]
    plain = [ArrayRecord({k: Array(a) for k, a in zip(keys, u)}) for u in updates]
    for strategy in (FedAvg(), FedMedian()):
        ours, _ = strategy.aggregate_train(1, _replies(held, sizes))
        theirs, _ = strategy.aggregate_train(1, _replies(plain, sizes))
        for a, b in zip(ours.to_numpy_ndarrays(), theirs.to_numpy_ndarrays(), strict=True):
            assert a.tobytes() == b.tobytes()
