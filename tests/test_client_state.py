"""The driver's client-state store: by client id, spilled past a budget with the same values."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from simulator.client_state import ClientStateStore, state_bytes
from simulator.protocol import ClientStateError, check_state


def _state(client: int) -> dict:
    return {
        "fisher": np.full(100, client, np.float32),
        "seen": client * 3,
        "decay": 0.1 * client,
        "name": f"c{client}",
        "done": client % 2 == 0,
        "none": None,
    }


def _same(a: dict, b: dict) -> bool:
    return a.keys() == b.keys() and all(
        np.array_equal(a[k], b[k]) and np.asarray(a[k]).dtype == np.asarray(b[k]).dtype
        if isinstance(a[k], np.ndarray)
        else (a[k] == b[k] and type(a[k]) is type(b[k]))
        for k in a
    )


def test_states_spill_past_the_budget_and_come_back_with_the_same_values_and_types(tmp_path):
    size = state_bytes(_state(0))
    assert size == 100 * 4 + 8 + 8 + 2 + 8 + 8
    store = ClientStateStore(tmp_path, memory_budget=2 * size)
    for client in range(5):
        store.put(client, server_round=1, state=_state(client))
    assert store.memory_bytes == 2 * size and store.total_bytes == 5 * size
    assert store.spilled_bytes == 3 * size
    assert sorted(p.name for p in tmp_path.iterdir()) == [f"client{c}_round1.npz" for c in range(3)]
    assert store.snapshot().files.keys() == set(range(5))  # a checkpoint writes the other two
    for client in range(5):
        assert _same(store.get(client), _state(client)), client
        assert store.last_round(client) == 1
    assert store.get(7) == {} and store.last_round(7) is None


def test_a_look_that_is_not_a_use_leaves_which_state_spills_next_as_it_was(tmp_path):
    size = state_bytes(_state(0))
    looked, used = ClientStateStore(tmp_path / "looked", 2 * size), ClientStateStore(tmp_path / "used", 2 * size)
    for store in (looked, used):
        store.put(0, server_round=1, state=_state(0))
        store.put(1, server_round=1, state=_state(1))
    assert _same(looked.get(0, use=False), _state(0))  # a query's look: client 0 stays the least recently used
    used.get(0)  # a training's use: client 1 becomes the least recently used
    for store in (looked, used):
        store.put(2, server_round=2, state=_state(2))
    assert [p.name for p in (tmp_path / "looked").iterdir()] == ["client0_round1.npz"]
    assert [p.name for p in (tmp_path / "used").iterdir()] == ["client1_round1.npz"]


def test_state_arrays_are_read_only_as_they_arrive_from_rays_object_store(tmp_path):
    store = ClientStateStore(tmp_path, memory_budget=0)  # every state spills
    store.put(3, 2, {"a": np.zeros(4)})
    with pytest.raises(ValueError, match="read-only"):
        store.get(3)["a"][0] = 1.0
    in_memory = ClientStateStore(tmp_path / "m", memory_budget=10**6)
    in_memory.put(3, 2, {"a": np.zeros(4)})
    with pytest.raises(ValueError, match="read-only"):
        in_memory.get(3)["a"][0] = 1.0


def test_a_snapshot_writes_changed_states_once_and_restores_the_store_as_it_was(tmp_path):
    store = ClientStateStore(tmp_path, memory_budget=10**6)
    for client in range(3):
        store.put(client, 1, _state(client))
    snapshot = store.snapshot()  # as the checkpoint after round 1 keeps it: names, no states
    assert snapshot.files == {c: f"client{c}_round1.npz" for c in range(3)}
    written = {p.name: p.stat().st_mtime_ns for p in tmp_path.iterdir()}
    store.put(0, 2, _state(10))  # round 2 replaces client 0: a run killed now ...
    assert store.snapshot().files[0] == "client0_round2.npz"
    assert {p.name: p.stat().st_mtime_ns for p in tmp_path.iterdir() if p.name in written} == written  # unchanged

    resumed = ClientStateStore(tmp_path, memory_budget=10**6, snapshot=snapshot)
    for client in range(3):  # ... resumes with round 1's states, whatever round 2 wrote
        assert _same(resumed.get(client), _state(client))
        assert resumed.last_round(client) == 1
    assert {p.name for p in tmp_path.iterdir()} == set(snapshot.files.values())
    assert resumed.total_bytes == 3 * state_bytes(_state(0)) and resumed.memory_bytes == 0


def test_the_store_keeps_a_copy_not_the_callers_array(tmp_path):
    live = np.zeros(3)  # e.g. a view of the worker's model, which the next client trains
    store = ClientStateStore(tmp_path, memory_budget=10**6)
    store.put(1, 1, {"bias": live})
    live += 1.0
    assert store.get(1)["bias"].tolist() == [0.0, 0.0, 0.0]
    assert live.flags.writeable  # the caller's array is left as it was


def test_a_state_is_checked_for_values_the_store_can_keep():
    assert check_state({"a": np.zeros(2), "n": 1, "s": "x"})
    with pytest.raises(ClientStateError, match=r"client state\['fisher'\] is a Tensor.*\.cpu\(\)\.numpy\(\)"):
        check_state({"fisher": torch.zeros(2)})
    with pytest.raises(ClientStateError, match="'objects'"):
        check_state({"objects": np.array([object()])})
    with pytest.raises(ClientStateError, match="keys must be strings"):
        check_state({3: 1})
