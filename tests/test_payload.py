"""A strategy's payload beside the model (strategies/payload.py), with SCAFFOLD (both halves) as its user:
the payload goes once per actor and is counted per client, the client's corrected steps and control variate
are the paper's, the server's control variate stays the mean of the clients', one half without the other is
refused, and a run killed with SIGKILL resumes to the same numbers."""

from __future__ import annotations

import json
from collections import defaultdict

import numpy as np
import pytest
import torch
from flwr.app import ArrayRecord, ConfigRecord, Message, MessageType, RecordDict
from helpers import (
    TINY,
    USER_CODE,
    final_checkpoint,
    kill_after_records,
    numbers_of,
    read_metrics,
    run_experiment,
    run_py_to_the_end,
    saved_strategy_state,
    tiny_images,
    tiny_model,
    train_context,
)
from torch.nn import functional as F

from clients.base import ClientMethod, flat_parameters, train_only
from clients.scaffold import STEP_SUM, ScaffoldClient
from simulator.backends import ClientFailure, LocalBackend
from simulator.config import ClientConfig, ConfigError
from simulator.protocol import TRAIN
from strategies.payload import add_payload

SCAFFOLD = ["strategy=scaffold", "client.method=scaffold"]


def test_a_payload_is_one_array_set_a_call_and_one_tensor_a_worker_for_every_client(tmp_path, monkeypatch):
    calls, seen = [], defaultdict(set)
    execute, begin = LocalBackend.execute, ScaffoldClient.begin

    def recording_execute(self, jobs, weights):
        train = [job for job in jobs if job.kind == TRAIN]
        if train:
            calls.append((len(train), len(weights), {job.payload.index for job in train}))
        return execute(self, jobs, weights)

    def recording_begin(self, model, context):
        seen[context.server_round].add(id(context.payload["head.weight"]))
        return begin(self, model, context)

    monkeypatch.setattr(LocalBackend, "execute", recording_execute)
    monkeypatch.setattr(ScaffoldClient, "begin", recording_begin)
    run_experiment(tmp_path, [*TINY, *SCAFFOLD])
    assert calls == [(10, 2, {1})] * 3  # ten clients, one model and one payload, every round
    assert [len(tensors) for tensors in seen.values()] == [1, 1, 1]  # one copy on the device per call


def test_the_payload_is_counted_in_downlink_mb_once_per_client(tmp_path):
    plain = run_experiment(tmp_path / "fedavg", [*TINY, "strategy=fedavg", "client.method=sgd"])
    scaffold = run_experiment(tmp_path / "scaffold", [*TINY, *SCAFFOLD])
    # SCAFFOLD's control variate is one array per parameter: the downlink doubles, the uplink does not grow.
    assert scaffold["downlink_mb"] == 2 * plain["downlink_mb"] > 0
    assert scaffold["uplink_mb"] == plain["uplink_mb"]


def test_a_scaffold_client_steps_along_the_corrected_gradient_and_keeps_the_papers_control_variate():
    model, (x, y) = tiny_model(), tiny_images()
    names = [name for name, _ in model.named_parameters()]
    start = [p.detach().clone() for p in model.parameters()]
    server = {
        n: torch.randn(p.shape, generator=torch.Generator().manual_seed(i))
        for i, (n, p) in enumerate(model.named_parameters())
    }
    own = flat_parameters(model) * 0 + np.random.default_rng(3).normal(size=flat_parameters(model).size).astype(
        np.float32
    )
    config = ClientConfig(lr=0.05, momentum=0.0, weight_decay=0.0, epochs=2, batch_size=16)
    context = train_context({"control": own}, lr=0.05, payload=server)
    result = ScaffoldClient(config).train(model, x, y, context)

    # By hand: the same minibatches (the context's generator), each step along g + c - c_i.
    weights = [w.clone().requires_grad_(True) for w in start]
    offsets = np.cumsum([0] + [w.numel() for w in start])
    mine = [torch.from_numpy(own[a:b]).view_as(w) for a, b, w in zip(offsets, offsets[1:], start)]
    reference, generator, steps = tiny_model(), torch.Generator().manual_seed(5), 0
    for _ in range(2):
        for batch in torch.randperm(40, generator=generator).split(16):
            for param, w in zip(reference.parameters(), weights):
                param.data = w.data
            loss = F.cross_entropy(reference(x[batch]), y[batch])
            grads = torch.autograd.grad(loss, list(reference.parameters()))
            with torch.no_grad():
                for w, g, name, c_i in zip(weights, grads, names, mine):
                    w -= 0.05 * (g + server[name] - c_i)
            steps += 1
    for param, w in zip(model.parameters(), weights):
        torch.testing.assert_close(param, w, rtol=1e-5, atol=1e-6)
    assert result.metrics[STEP_SUM] == pytest.approx(steps * 0.05)
    x0, y1 = torch.cat([w.reshape(-1) for w in start]), torch.cat([w.detach().reshape(-1) for w in weights])
    c = torch.cat([server[name].reshape(-1) for name in names])
    expected = torch.from_numpy(own) - c + (x0 - y1) / (steps * 0.05)  # c_i+ = c_i - c + (x - y_i) / (K lr)
    np.testing.assert_allclose(result.state["control"], expected.numpy(), rtol=1e-4, atol=1e-4)


def test_with_every_client_every_round_the_servers_control_variate_is_the_mean_of_the_clients(tmp_path):
    # Option II keeps c = mean_i c_i when all N clients take part: the two halves agree on every update.
    overrides = [*TINY, *SCAFFOLD, "federation.num_clients=6", "federation.clients_per_round=6"]
    run_experiment(tmp_path, overrides)
    _, states = final_checkpoint(tmp_path)
    server = saved_strategy_state(tmp_path / "checkpoints")["control"]
    assert len(states) == 6 and all("control" in state for state in states.values())
    clients_mean = np.mean([state["control"] for state in states.values()], axis=0)
    flat = np.concatenate([np.asarray(server[name]).reshape(-1) for name in server])
    assert np.abs(flat).max() > 0.01  # it moved
    np.testing.assert_allclose(flat, clients_mean, rtol=1e-3, atol=1e-4)


@pytest.mark.parametrize(
    ("overrides", "message"),
    [
        (["strategy=scaffold", "client.method=sgd"], "needs its client half, client.method=scaffold"),
        (["strategy=fedavg", "client.method=scaffold"], "is the client half of strategy=scaffold"),
    ],
)
def test_one_half_of_scaffold_without_the_other_is_refused_before_any_work(tmp_path, overrides, message):
    with pytest.raises(ConfigError, match=message):
        run_experiment(tmp_path, [*TINY, *overrides])
    assert not (tmp_path / "metrics.jsonl").exists()


def test_scaffold_with_the_default_momentum_counts_its_steps_reach_and_learns(tmp_path):
    # Momentum 0.9 moves the weights up to 10 lr a step; counted as lr, the control variates blew up (round 11).
    summary = run_experiment(tmp_path, ["rounds=15", "engine.backend=local", *SCAFFOLD])
    assert summary["final_accuracy"] > 0.75  # it learns; counting lr a step: loss 2.6e4 at round 7
    assert all(record["train_loss"] < 1.5 for record in read_metrics(tmp_path)[5:])
    model, (x, y) = tiny_model(), tiny_images()
    config = ClientConfig(lr=0.05, momentum=0.9, epochs=1, batch_size=10)
    context = train_context(lr=0.05, payload={n: torch.zeros_like(p) for n, p in model.named_parameters()})
    metrics = ScaffoldClient(config).train(model, x, y, context).metrics
    assert metrics[STEP_SUM] == pytest.approx(sum(0.05 * (1 - 0.9**k) / 0.1 for k in range(1, 5)))


def test_each_message_may_carry_its_own_payload_and_none_replaces_the_strategys_settings():
    shared = RecordDict({"arrays": ArrayRecord(), "config": ConfigRecord({"lr": 0.1})})
    messages = [Message(content=shared, dst_node_id=node, message_type=MessageType.TRAIN) for node in (1, 2)]
    for node, message in zip((1, 2), messages):
        add_payload([message], {"mine": np.full(2, float(node))})
    assert [m.content["payload"]["mine"].numpy().tolist() for m in messages] == [[1.0, 1.0], [2.0, 2.0]]
    assert "payload" not in shared  # the strategy's content is left as it built it
    with pytest.raises(ValueError, match=r"already holds \['lr'\]"):
        add_payload(messages, {}, {"lr": 0.5})


def test_a_client_that_changes_the_shared_payload_fails_the_run_naming_it(tmp_path, monkeypatch):
    monkeypatch.syspath_prepend(str(USER_CODE))
    overrides = [*TINY, "strategy=scaffold", "client.method=payload_users.MutatingScaffold"]
    with pytest.raises(ClientFailure, match=r"client \d+ changed the payload's \['head.bias'\] in place"):
        run_experiment(tmp_path, overrides)


def test_scaffold_inside_a_dp_wrapper_is_refused(tmp_path):
    overrides = [*TINY, "strategy=dp_fixed_server", "strategy.strategy._target_=strategies.scaffold.Scaffold"]
    with pytest.raises(ConfigError, match=r"strategy.strategy._target_ = Scaffold: .* cannot be wrapped"):
        run_experiment(tmp_path, [*overrides, "client.method=scaffold"])


def test_a_strategy_that_keeps_the_server_model_function_checkpoints(tmp_path, monkeypatch):
    monkeypatch.syspath_prepend(str(USER_CODE))
    summary = run_experiment(tmp_path, [*TINY, "strategy._target_=payload_users.BoundToTheModel"])
    assert summary["rounds"] == 3 and (tmp_path / "checkpoints" / "round-000003").is_dir()


def test_train_only_names_the_parameters_a_round_trains_and_keeps_the_rest_as_sent():
    model, (x, y) = tiny_model(), tiny_images()
    before = {name: p.detach().clone() for name, p in model.named_parameters()}
    context = train_context(config={"train-only": "head."})
    assert train_only(context.config) == ("head.",)
    ClientMethod(ClientConfig(lr=0.1, epochs=1, batch_size=8)).train(model, x, y, context)
    for name, param in model.named_parameters():
        assert torch.equal(param, before[name]) != name.startswith("head."), name
    with pytest.raises(ValueError, match="nothing to train"):
        ClientMethod(ClientConfig()).train(model, x, y, train_context(config={"train-only": "nope."}))


@pytest.mark.slow
def test_a_scaffold_run_killed_with_sigkill_resumes_to_the_uninterrupted_numbers(tmp_path):
    # The server's control variate is strategy state, the clients' are client states: both are checkpointed.
    # Every state spills to a file (budget 0), so the resumed run's spilled megabytes are the whole run's.
    overrides = ["rounds=8", *SCAFFOLD, "engine.backend=local", "engine.checkpoint_every=2"]
    overrides.append("engine.client_state_memory_mb=0")
    run_py_to_the_end(tmp_path / "whole", overrides)
    done = kill_after_records(tmp_path / "killed", overrides, 5)
    assert not (tmp_path / "killed" / "summary.json").exists() and done < 8, done
    run_py_to_the_end(tmp_path / "killed", [*overrides, "resume=true"])
    assert numbers_of(tmp_path / "killed") == numbers_of(tmp_path / "whole")


@pytest.mark.ray
def test_scaffold_gives_the_same_numbers_on_two_ray_actors_as_in_process(tmp_path):
    local = run_experiment(tmp_path / "local", [*TINY, *SCAFFOLD])
    ray = run_experiment(tmp_path / "ray", ["rounds=3", *SCAFFOLD, "engine.backend=ray", "engine.num_actors=2"])
    assert numbers_of(tmp_path / "ray") == numbers_of(tmp_path / "local")
    assert json.loads((tmp_path / "ray" / "summary.json").read_text())["downlink_mb"] == local["downlink_mb"]
    assert ray["final_accuracy"] == local["final_accuracy"]
