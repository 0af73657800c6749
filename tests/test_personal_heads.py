"""FedPer and FedRep: each client keeps its head, only the encoder travels and is aggregated.

Encoder-only aggregation, heads the server never touches, the same numbers on any
number of Ray actors and after a kill -9 and resume, FedRep's two phases, the
personalised client accuracy, and models that cannot serve a personal head.
"""

from __future__ import annotations

import json
from collections import defaultdict

import numpy as np
import pytest
import torch
from helpers import (
    USER_CODE,
    compose_run,
    kill_after_records,
    numbers_of,
    read_metrics,
    run_experiment,
    run_py_to_the_end,
    stream_of,
    tiny_images,
    wait_for_free_cpus,
)
from helpers import final_checkpoint as _final
from helpers import tiny_model as _model
from helpers import train_context as _context

from clients.base import ClientMethod, shared_keys
from clients.fedper import FedPerClient
from clients.fedrep import FedRepClient, FedRepSettings
from clients.models import build_model
from simulator import checkpoint
from simulator.config import ClientConfig, ConfigError
from simulator.grid import SimulationGrid
from simulator.seeding import Purpose, torch_generator

HEAD = ("head.",)
# Digits, 20 clients, few per round: clients come back after missed rounds, some never train.
SMALL = ["engine.backend=local", "eval.probes=false", "federation.clients_per_round=3"]
FEDREP = ["client.method=fedrep", "client.fedrep.head_epochs=2"]


def _same_arrays(a: dict[str, np.ndarray], b: dict[str, np.ndarray]) -> bool:
    return list(a) == list(b) and all(a[k].dtype == b[k].dtype and np.array_equal(a[k], b[k]) for k in a)


def _same_states(a: dict[int, dict], b: dict[int, dict]) -> bool:
    return a.keys() == b.keys() and all(_same_arrays(a[c], b[c]) for c in a)


def _head(model: torch.nn.Module) -> dict[str, np.ndarray]:
    return {k: v.detach().numpy().copy() for k, v in model.state_dict().items() if k.startswith(HEAD)}


def _stream_and_model(overrides: list[str]):
    run = compose_run(overrides)
    stream = stream_of(run)
    model = build_model(
        stream.x_train.shape[1:], stream.num_classes, run.model, torch_generator(run.seed, Purpose.MODEL_INIT)
    )
    return run, stream, model


# 1. Encoder-only aggregation; the server never changes a head.


def test_only_the_encoder_travels_and_each_head_is_what_its_client_last_trained(tmp_path, monkeypatch):
    overrides = [*SMALL, "rounds=4", "client.method=fedper"]
    started: dict[tuple[int, int], dict] = {}  # (client, round) -> the head it trained from
    trained: dict[tuple[int, int], dict] = {}  # -> the head it left
    encoders: dict[tuple[int, int], tuple[dict, int]] = {}  # -> the encoder it left, its examples
    sent_keys, returned_keys = set(), set()

    begin, train, send = FedPerClient.begin, FedPerClient.train, SimulationGrid.send_and_receive

    def recording_begin(self, model, context):
        begin(self, model, context)
        started[context.client_id, context.server_round] = _head(model)

    def recording_train(self, model, x, y, context):
        result = train(self, model, x, y, context)
        key = context.client_id, context.server_round
        trained[key] = _head(model)
        encoders[key] = (
            {k: v.detach().numpy().copy() for k, v in model.state_dict().items() if not k.startswith(HEAD)},
            result.num_examples,
        )
        return result

    def recording_send(self, messages, **kwargs):
        messages = list(messages)
        for message in messages:
            for record in message.content.array_records.values():
                sent_keys.update(record.keys())
        replies = send(self, messages, **kwargs)
        for reply in replies:
            for record in reply.content.array_records.values():
                returned_keys.update(record.keys())
        return replies

    monkeypatch.setattr(FedPerClient, "begin", recording_begin)
    monkeypatch.setattr(FedPerClient, "train", recording_train)
    monkeypatch.setattr(SimulationGrid, "send_and_receive", recording_send)
    run_experiment(tmp_path, overrides)

    _, _, model = _stream_and_model(overrides)
    encoder_keys = {k for k in model.state_dict() if not k.startswith(HEAD)}
    assert shared_keys(model, FedPerClient) == [k for k in model.state_dict() if k in encoder_keys]
    assert sent_keys == returned_keys == encoder_keys  # no head goes either way
    arrays, states = _final(tmp_path)
    assert set(arrays) == encoder_keys  # the checkpoint's global arrays: the encoder alone
    for folder in (tmp_path / "checkpoints").glob("round-*"):
        with np.load(folder / "arrays.npz") as saved:
            assert not [k for k in saved.files if k.startswith("head.")], folder

    # Each client's rounds in order: it starts from its own last head (the initial one the first
    # time, whatever client the worker's model served before), and its state keeps what it left.
    initial = _head(model)
    rounds_of = defaultdict(list)
    for client, server_round in sorted(trained, key=lambda k: k[1]):
        rounds_of[client].append(server_round)
    assert set(states) == set(rounds_of) and len(rounds_of) < 20  # a never sampled client: no state
    assert any(rounds[-1] < 4 for rounds in rounds_of.values())  # some clients sat out the last rounds
    for client, rounds in rounds_of.items():
        assert _same_arrays(started[client, rounds[0]], initial), client
        for before, after in zip(rounds, rounds[1:]):
            assert _same_arrays(started[client, after], trained[client, before]), (client, after)
        assert _same_arrays(states[client], trained[client, rounds[-1]]), client  # byte-identical
        assert not np.array_equal(states[client]["head.weight"], initial["head.weight"])
    heads = [states[c]["head.weight"] for c in states]
    assert all(not np.array_equal(heads[0], other) for other in heads[1:])  # each its own

    # The global encoder is FedAvg of the last round's encoders, weighted by examples.
    last = [encoders[c, 4] for c in rounds_of if rounds_of[c][-1] == 4]
    assert len(last) == 3
    total = sum(n for _, n in last)
    for key in encoder_keys:
        expected = sum(enc[key].astype(np.float64) * n for enc, n in last) / total
        np.testing.assert_allclose(arrays[key], expected, rtol=1e-5, atol=1e-6)


# 4. FedRep's two phases, on their own.

X, Y = tiny_images()


def _client_config(epochs=1, head_epochs=2) -> ClientConfig:
    return ClientConfig(
        lr=0.1,
        momentum=0.5,
        weight_decay=0.01,
        epochs=epochs,
        batch_size=8,
        settings=FedRepSettings(head_epochs=head_epochs),
    )


def _parameters(model: torch.nn.Module) -> dict[str, torch.Tensor]:
    return {k: v.detach().clone() for k, v in model.named_parameters()}


class RecordingFedRep(FedRepClient):
    """FedRep that notes, for each call of run_epochs, what trains and what the weights were."""

    def __init__(self, cfg, fail_in_phase=None):
        super().__init__(cfg)
        self.calls, self.fail_in_phase = [], fail_in_phase

    def run_epochs(self, model, params, x, y, context, epochs):
        names = {id(p): n for n, p in model.named_parameters()}
        call = {
            "trains": [names[id(p)] for p in params],
            "epochs": epochs,
            "before": _parameters(model),
        }
        self.calls.append(call)
        if len(self.calls) == self.fail_in_phase:
            raise RuntimeError("failed mid-phase")
        loss = super().run_epochs(model, params, x, y, context, epochs)
        call["after"] = _parameters(model)
        return loss

    def loss(self, model, batch, context):  # what is frozen while the phase trains
        self.calls[-1].setdefault("requires_grad", {n: p.requires_grad for n, p in model.named_parameters()})
        return super().loss(model, batch, context)


def test_fedrep_trains_the_head_on_a_frozen_encoder_then_the_encoder_under_the_new_head():
    model, method, state = _model(), RecordingFedRep(_client_config(epochs=1, head_epochs=3)), {}
    start = _parameters(model)
    result = method.train(model, X, Y, _context(state))
    heads = [n for n in start if n.startswith("head.")]
    body = [n for n in start if not n.startswith("head.")]
    assert heads and body

    head_phase, body_phase = method.calls
    assert head_phase["trains"] == heads and head_phase["epochs"] == 3
    assert body_phase["trains"] == body and body_phase["epochs"] == 1
    assert head_phase["requires_grad"] == {n: n in heads for n in start}  # the encoder frozen
    assert body_phase["requires_grad"] == {n: n in body for n in start}  # the new head frozen
    for name in body:  # the head phase leaves the encoder exactly where it was
        assert torch.equal(head_phase["after"][name], start[name]), name
    for name in heads:  # the body phase leaves the new head exactly as the head phase left it
        assert torch.equal(body_phase["after"][name], head_phase["after"][name]), name
        assert not torch.equal(head_phase["after"][name], start[name]), name
    final = _parameters(model)
    assert all(not torch.equal(final[name], start[name]) for name in body)
    assert all(p.requires_grad for p in model.parameters())  # unfrozen afterwards
    assert result.num_examples == 40 and np.isfinite(result.train_loss)
    state = result.state  # the new state is returned, the one it came with left as it was
    assert set(state) == set(heads) and all(np.array_equal(state[n], final[n].numpy()) for n in heads)

    # The same numbers as two plain runs of SGD: head_epochs on the head, then epochs on the rest.
    manual, plain, context = _model(), ClientMethod(_client_config(epochs=1, head_epochs=3)), _context()
    named = dict(manual.named_parameters())
    plain.run_epochs(manual, [named[n] for n in heads], X, Y, context, 3)
    loss = plain.run_epochs(manual, [named[n] for n in body], X, Y, context, 1)
    assert all(torch.equal(p, final[n]) for n, p in manual.named_parameters())
    assert result.train_loss == pytest.approx(loss, rel=1e-6)  # the body phase's mean loss


@pytest.mark.parametrize("phase", [1, 2])
def test_fedrep_unfreezes_every_parameter_even_when_a_phase_fails(phase):
    model, method = _model(), RecordingFedRep(_client_config(), fail_in_phase=phase)
    with pytest.raises(RuntimeError, match="failed mid-phase"):
        method.train(model, X, Y, _context())
    assert all(p.requires_grad for p in model.parameters())


def test_fedrep_leaves_a_parameter_the_model_froze_frozen_and_untrained():
    for cls in (FedPerClient, FedRepClient):
        model = _model()
        model.encoder[1].weight.requires_grad_(False)  # e.g. a pretrained layer a user's model freezes
        frozen = model.encoder[1].weight.detach().clone()
        cls(_client_config()).train(model, X, Y, _context())
        assert torch.equal(model.encoder[1].weight, frozen), cls.__name__
        assert not model.encoder[1].weight.requires_grad, cls.__name__


def test_fedper_loads_the_clients_head_over_the_global_encoder_and_trains_both():
    model, method = _model(), FedPerClient(ClientConfig(lr=0.1, epochs=1, batch_size=8))
    own = {"head.weight": np.full((10, 8), 0.25, np.float32), "head.bias": np.arange(10, dtype=np.float32)}
    for array in own.values():
        array.setflags(write=False)  # as the store hands them out
    encoder_before = {k: v.clone() for k, v in model.state_dict().items() if not k.startswith("head.")}
    method.personalize(model, own)
    assert np.array_equal(model.head.weight.detach().numpy(), own["head.weight"])
    assert all(torch.equal(model.state_dict()[k], v) for k, v in encoder_before.items())
    state = method.train(model, X, Y, _context(dict(own))).state
    assert set(state) == {"head.weight", "head.bias"}
    assert not np.array_equal(state["head.weight"], own["head.weight"])
    assert np.array_equal(own["head.weight"], np.full((10, 8), 0.25, np.float32))  # the stored one untouched
    assert all(not torch.equal(model.state_dict()[k], v) for k, v in encoder_before.items())


def test_fedrep_head_epochs_is_checked_with_its_key():
    with pytest.raises(ConfigError, match=r"client\.fedrep\.head_epochs = 0: must be at least 1"):
        compose_run(["client.method=fedrep", "client.fedrep.head_epochs=0"])
    assert compose_run(["client.method=fedrep", "client.fedrep.head_epochs=4"]).client.settings.head_epochs == 4


# 5. Personalised client accuracy.


def _client_accuracies(stream, run, server_round, arrays, states, personal: bool) -> np.ndarray:
    """Each client's accuracy on its own test sample, computed here from the stored weights alone."""
    accuracies = []
    for client in stream.available_clients(server_round):
        model = build_model(
            stream.x_train.shape[1:], stream.num_classes, run.model, torch_generator(run.seed, Purpose.MODEL_INIT)
        )
        weights = {k: torch.from_numpy(v) for k, v in arrays.items()}
        if personal:
            weights.update({k: torch.from_numpy(np.array(v)) for k, v in states.get(client, {}).items()})
        model.load_state_dict(weights, strict=False)
        model.eval()
        sample = stream.client_test_indices(server_round, client, run.eval.client_test_size)
        with torch.no_grad():
            predicted = model(torch.from_numpy(stream.x_test[sample])).argmax(1).numpy()
        accuracies.append(float(np.mean(predicted == stream.y_test[sample])))
    return np.array(accuracies)


@pytest.mark.slow
def test_personal_heads_beat_the_global_model_on_each_clients_own_classes(tmp_path):
    skewed = [
        "engine.backend=local",
        "eval.probes=false",
        "data.partition.kind=classes",
        "data.partition.classes_per_client=2",
        "rounds=15",
        "client.epochs=1",
        "eval.federated=true",
    ]
    summaries = {m: run_experiment(tmp_path / m, [*skewed, f"client.method={m}"]) for m in ("fedper", "sgd")}
    personal_keys = {"client_acc_personal_mean", "client_acc_personal_std", "client_acc_personal_worst10"}
    fedper, sgd = read_metrics(tmp_path / "fedper"), read_metrics(tmp_path / "sgd")
    assert len(fedper) == 15
    for record in fedper:
        assert personal_keys | {"client_acc_mean", "client_acc_std", "client_acc_worst10"} <= record.keys()
        assert 0 <= record["client_acc_personal_worst10"] <= record["client_acc_personal_mean"] <= 1
    assert all(not any(k.startswith("client_acc_personal") for k in r) for r in sgd)
    assert not any(k.startswith("client_acc_personal") for k in summaries["sgd"])
    last = fedper[-1]
    assert {k: summaries["fedper"][k] for k in personal_keys} == {k: last[k] for k in personal_keys}
    on_disk = json.loads((tmp_path / "fedper" / "summary.json").read_text())
    assert {k: on_disk[k] for k in personal_keys} == {k: last[k] for k in personal_keys}

    # The record's numbers, recomputed from the final global encoder and each client's stored head.
    run, stream, _ = _stream_and_model([*skewed, "client.method=fedper"])
    arrays, states = _final(tmp_path / "fedper")
    assert len(states) == 20  # 15 rounds of 10: every client has trained
    personal = _client_accuracies(stream, run, 15, arrays, states, personal=True)
    shared = _client_accuracies(stream, run, 15, arrays, states, personal=False)
    assert last["client_acc_personal_mean"] == pytest.approx(personal.mean(), abs=1e-9)
    assert last["client_acc_personal_std"] == pytest.approx(personal.std(), abs=1e-9)
    assert last["client_acc_personal_worst10"] == pytest.approx(np.sort(personal)[:2].mean(), abs=1e-9)
    assert last["client_acc_mean"] == pytest.approx(shared.mean(), abs=1e-9)  # global encoder, initial head

    # Two classes a client: its own head serves it far better than any one model's
    # (0.885 against 0.30 for the global encoder under the initial head and 0.20 for FedAvg's model).
    assert last["client_acc_personal_mean"] > 0.8
    assert last["client_acc_personal_mean"] > last["client_acc_mean"] + 0.3
    assert last["client_acc_personal_mean"] > sgd[-1]["client_acc_mean"] + 0.3
    # Federated evaluation sends each sampled client its state: it scores the client's own model too.
    assert last["federated_acc_personal"] > 0.8 and last["federated_acc_personal"] > last["client_acc_mean"] + 0.3


# 6. Models that cannot serve a personal head or the probes.


@pytest.mark.parametrize(
    ("model", "method", "probes", "message"),
    [
        ("plain_models.sequential", "fedper", "false", r"client\.method = 'fedper' keeps head\.\*"),
        ("plain_models.with_features", "fedrep", "false", r"client\.method = 'fedrep' keeps head\.\*"),
        (
            "plain_models.sequential",
            "sgd",
            "true",
            r"no features\(x\) method.*eval\.probes=false eval\.diagnostics=false",
        ),
    ],
)
def test_a_model_that_cannot_serve_the_run_is_refused_before_any_client_trains(
    tmp_path, monkeypatch, model, method, probes, message
):
    monkeypatch.syspath_prepend(str(USER_CODE))
    trained = []
    monkeypatch.setattr(ClientMethod, "train", lambda *args: trained.append(args))
    with pytest.raises(ConfigError, match=message):
        run_experiment(
            tmp_path / "run",
            [
                "rounds=2",
                "engine.backend=local",
                f"model.name={model}",
                f"client.method={method}",
                f"eval.probes={probes}",
                f"eval.diagnostics={probes}",
            ],
        )
    assert not trained and not (tmp_path / "run").exists()  # a refused run writes nothing


def test_a_users_model_built_through_a_decorator_is_called_as_its_decorator_says(tmp_path, user_code):
    summary = run_experiment(
        tmp_path,
        [
            "rounds=2",
            "engine.backend=local",
            "eval.probes=false",
            "eval.diagnostics=false",
            "model.name=plain_models.decorated",
        ],
    )
    assert summary["final_accuracy"] > 0.3


def test_a_users_model_with_features_is_probed_and_one_with_a_head_keeps_it_personal(tmp_path, monkeypatch):
    monkeypatch.syspath_prepend(str(USER_CODE))
    common = ["rounds=2", "engine.backend=local", "federation.clients_per_round=3"]
    run_experiment(tmp_path / "probed", [*common, "model.name=plain_models.with_features", "eval.probes=true"])
    lines = (tmp_path / "probed" / "probe_matrix.csv").read_text().splitlines()
    assert lines[0] == "task_0" and 0.3 < float(lines[1]) <= 1.0  # a linear probe on a 2-round encoder
    assert (tmp_path / "probed" / "ncm_matrix.csv").exists()

    run_experiment(tmp_path / "personal", [*common, "model.name=plain_models.with_head", "client.method=fedper"])
    arrays, states = _final(tmp_path / "personal")
    assert set(arrays) == {"body.1.weight", "body.1.bias"} and 3 <= len(states) <= 6
    assert all(set(state) == {"head.weight", "head.bias"} for state in states.values())
    assert "client_acc_personal_mean" in read_metrics(tmp_path / "personal")[-1]


# 3. A kill -9 and resume.


@pytest.mark.slow
def test_a_fedper_run_killed_with_sigkill_resumes_to_the_uninterrupted_heads_andnumbers_of(tmp_path):
    # Checkpoints every 3 rounds, killed after round 5 is logged: resume goes back past logged rounds
    # whose client states were already written, and must redo them to the same heads.
    overrides = [
        *SMALL,
        "rounds=20",
        "client.method=fedper",
        "engine.checkpoint_every=3",
        "engine.client_state_memory_mb=0.005",
    ]  # some heads spill to files
    run_experiment(tmp_path / "whole", overrides)

    done = kill_after_records(tmp_path / "killed", overrides, 5)
    assert not (tmp_path / "killed" / "summary.json").exists() and done < 20, done
    saved = checkpoint.load(tmp_path / "killed" / "checkpoints")
    assert saved.round in (3, 6, 9, 12, 15, 18) and saved.client_states.files  # heads were saved

    run_py_to_the_end(tmp_path / "killed", [*overrides, "resume=true"], timeout_s=120)
    assert numbers_of(tmp_path / "killed") == numbers_of(tmp_path / "whole")
    whole_arrays, whole_states = _final(tmp_path / "whole")
    killed_arrays, killed_states = _final(tmp_path / "killed")
    assert _same_arrays(killed_arrays, whole_arrays) and _same_states(killed_states, whole_states)
    assert numbers_of(tmp_path / "whole")[0][-1]["client_state_spilled_mb"] > 0


# 2. The same numbers on 1, 2 and 3 Ray actors as in-process.


@pytest.mark.ray
@pytest.mark.parametrize(
    ("method", "actors"), [(["client.method=fedper"], (1, 2, 3)), (FEDREP, (3,))], ids=["fedper", "fedrep"]
)
def test_personal_heads_are_bit_identical_in_process_and_on_1_2_and_3_actors(
    tmp_path, ray_with_three_cpus, method, actors
):
    common = [*SMALL, "rounds=3", "federation.clients_per_round=6", "eval.federated=true", *method]
    run_experiment(tmp_path / "local", common)
    arrays, states = _final(tmp_path / "local")
    numbers = numbers_of(tmp_path / "local")
    assert len(states) >= 6 and all(set(s) == {"head.weight", "head.bias"} for s in states.values())
    for n in actors:
        run_dir = tmp_path / f"ray{n}"
        wait_for_free_cpus(n)
        run_experiment(run_dir, [*common, "engine.backend=ray", f"engine.num_actors={n}"])
        ray_arrays, ray_states = _final(run_dir)
        assert _same_arrays(ray_arrays, arrays), f"global encoder on {n} actors"
        assert _same_states(ray_states, states), f"client heads on {n} actors"
        assert numbers_of(run_dir) == numbers, f"metrics on {n} actors"
