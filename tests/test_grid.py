"""Our Flower Grid on the in-process backend, driven with Flower messages by hand."""

from __future__ import annotations

import numpy as np
import pytest
import torch
from flwr.app import ArrayRecord, ConfigRecord, MessageType, RecordDict
from helpers import compose_run, dataset_of, local_grid

from clients.models import build_model
from simulator.backends import LocalBackend
from simulator.protocol import ACCURACY, CLIPPING_NORM, NORM_BIT, NUM_EXAMPLES
from simulator.streams import build_stream


class CountingBackend(LocalBackend):
    """The real in-process backend, remembering what each call carried."""

    calls: list[tuple[list[int], int]]

    def execute(self, jobs, weights):
        self.calls.append(([job.client_id for job in jobs], len(weights)))
        return super().execute(jobs, weights)


@pytest.fixture(scope="module")
def grid_and_weights(tmp_path_factory):
    run = compose_run(["engine.backend=local"])
    dataset = dataset_of(run)
    stream = build_stream(run, dataset)
    grid = local_grid(run, stream, tmp_path_factory.mktemp("states"), CountingBackend)
    grid.backend.calls = []
    model = build_model(dataset.input_shape, 10, run.model, torch.Generator().manual_seed(0))
    return grid, ArrayRecord(model.state_dict()), stream.parts


def _messages(grid, arrays, nodes, kind=MessageType.TRAIN, config=None):
    content = RecordDict({"arrays": arrays, "config": ConfigRecord(config or {})})
    return [grid.create_message(content, kind, node, group_id="1") for node in nodes]


def test_replies_come_in_message_order_from_one_backend_call_with_the_weights_once(grid_and_weights):
    grid, arrays, parts = grid_and_weights
    grid.backend.calls.clear()
    nodes = [7, 2, 19, 4]
    replies = list(grid.send_and_receive(_messages(grid, arrays, nodes)))
    assert grid.backend.calls == [(nodes, 1)]
    assert [r.metadata.src_node_id for r in replies] == nodes
    for node, reply in zip(nodes, replies):
        assert reply.content["metrics"][NUM_EXAMPLES] == len(parts[node])
        assert list(reply.content["arrays"].keys()) == list(arrays.keys())
        assert not np.array_equal(reply.content["arrays"].to_numpy_ndarrays()[0], arrays.to_numpy_ndarrays()[0])


def test_push_then_pull_returns_the_same_replies(grid_and_weights):
    grid, arrays, _ = grid_and_weights
    ids = list(grid.push_messages(_messages(grid, arrays, [3, 5])))
    replies = list(grid.pull_messages(ids))
    assert [r.metadata.reply_to_message_id for r in replies] == ids
    assert list(grid.pull_messages(ids)) == []  # a reply is delivered once


def test_clients_clip_their_update_when_the_strategy_sends_a_clipping_norm(grid_and_weights):
    grid, arrays, _ = grid_and_weights
    reference = arrays.to_numpy_ndarrays()
    replies = grid.send_and_receive(_messages(grid, arrays, [0, 1], config={CLIPPING_NORM: 0.05}))
    for reply in replies:
        update = [a - r for a, r in zip(reply.content["arrays"].to_numpy_ndarrays(), reference)]
        assert np.sqrt(sum(float((u**2).sum()) for u in update)) == pytest.approx(0.05, rel=1e-3)
        assert reply.content["metrics"][NORM_BIT] == 0.0


def test_evaluate_messages_score_the_sent_weights_on_each_clients_test_sample(grid_and_weights):
    grid, arrays, _ = grid_and_weights
    replies = list(grid.send_and_receive(_messages(grid, arrays, [0, 6], MessageType.EVALUATE)))
    for reply in replies:
        metrics = reply.content["metrics"]
        assert metrics[NUM_EXAMPLES] == 50
        assert 0.0 <= metrics[ACCURACY] <= 1.0
        assert "arrays" not in reply.content


def test_a_message_to_an_unknown_node_is_refused(grid_and_weights):
    grid, arrays, _ = grid_and_weights
    with pytest.raises(ValueError, match="node 20, not a client present in round 1"):
        grid.send_and_receive(_messages(grid, arrays, [20]))
