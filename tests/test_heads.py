"""Classifier heads: the ETF's geometry, the cosine head's numbers, the linear head's identity with nn.Linear."""

from __future__ import annotations

import math
from pathlib import Path

import numpy as np
import pytest
import torch
from helpers import TINY, compose_run, numbers_of, run_experiment, stream_of
from torch import nn
from torch.nn import functional as F

from clients.base import sgd_step
from clients.heads import (
    HEADS,
    ETFHead,
    ETFSettings,
    LinearHead,
    LinearSettings,
    NormalizedHead,
    NormalizedSettings,
)
from clients.heads.etf import simplex_etf
from clients.models import build_model
from simulator import checkpoint
from simulator.config import ClientConfig, ConfigError, ModelConfig
from simulator.seeding import Purpose, torch_generator
from simulator.worker import ClientWorker, WorkerData


def _generator(seed: int = 0) -> torch.Generator:
    return torch.Generator().manual_seed(seed)


@pytest.mark.parametrize(("dim", "classes"), [(2, 2), (3, 3), (10, 10), (16, 10), (64, 5)])
def test_the_etf_is_a_simplex_equiangular_tight_frame(dim, classes):
    etf = simplex_etf(dim, classes, _generator()).double()
    assert etf.shape == (dim, classes)
    gram = etf.T @ etf
    expected = torch.full((classes, classes), -1.0 / (classes - 1), dtype=torch.float64).fill_diagonal_(1.0)
    torch.testing.assert_close(gram, expected, atol=1e-5, rtol=0)
    torch.testing.assert_close(etf.sum(dim=1), torch.zeros(dim, dtype=torch.float64), atol=1e-5, rtol=0)  # centred


def test_the_etf_is_drawn_from_the_generator_alone():
    settings = ETFSettings(dim=12)
    first = ETFHead(8, 10, settings, _generator(3)).etf
    torch.manual_seed(123)  # the global RNG plays no part
    again = ETFHead(8, 10, settings, _generator(3)).etf
    other = ETFHead(8, 10, settings, _generator(4)).etf
    assert torch.equal(first, again)
    assert (first - other).abs().max() > 0.1


def test_the_etf_is_not_in_state_dict_and_stays_fixed_while_the_projection_and_scale_train():
    head = ETFHead(6, 4, ETFSettings(), _generator())
    assert set(head.state_dict()) == {"scale", "projection.weight", "projection.bias"}
    assert [name for name, _ in head.named_parameters()] == ["scale", "projection.weight", "projection.bias"]
    etf, projection = head.etf.clone(), head.projection.weight.detach().clone()
    data = _generator(1)
    x, y = torch.randn(32, 6, generator=data), torch.randint(0, 4, (32,), generator=data)
    losses = []
    for _ in range(5):  # plain SGD steps on every parameter and buffer that has a gradient
        head.zero_grad()
        loss = F.cross_entropy(head(x), y)
        loss.backward()
        with torch.no_grad():
            for tensor in [*head.parameters(), *head.buffers()]:
                if tensor.grad is not None:
                    tensor.sub_(0.5 * tensor.grad)
        losses.append(loss.item())
    assert not head.etf.requires_grad and head.etf.grad is None
    assert torch.equal(head.etf, etf)
    assert (head.projection.weight - projection).abs().max() > 1e-3
    assert head.scale.item() != 1.0
    assert losses[-1] < losses[0]


def test_loading_a_state_dict_leaves_the_etf_alone():
    sender, receiver = ETFHead(6, 4, ETFSettings(), _generator(0)), ETFHead(6, 4, ETFSettings(), _generator(0))
    with torch.no_grad():
        sender.projection.weight.add_(1.0)
        sender.scale.fill_(7.5)
    receiver.load_state_dict(sender.state_dict())  # strict: the ETF is neither expected nor sent
    assert torch.equal(receiver.projection.weight, sender.projection.weight)
    assert receiver.scale.item() == 7.5
    assert torch.equal(receiver.etf, sender.etf)


@pytest.mark.parametrize("learn", [True, False])
def test_etf_logits_are_cosines_to_the_etf_columns_over_the_temperature(learn):
    head = ETFHead(5, 3, ETFSettings(temperature=0.5, learn_temperature=learn, dim=4), _generator())
    features = torch.randn(7, 5, generator=_generator(2))
    logits = head(features)
    z = head.projection(features)
    expected = (z @ head.etf) / (z.norm(dim=1, keepdim=True) * head.etf.norm(dim=0)) / 0.5
    torch.testing.assert_close(logits, expected)  # the learnable scale starts at 1 / temperature
    assert logits.shape == (7, 3) and logits.abs().max() <= 2.0 + 1e-6


def test_a_fixed_temperature_is_no_parameter_and_gives_the_fixed_heads_logits_exactly():
    head = ETFHead(5, 3, ETFSettings(temperature=0.1, learn_temperature=False), _generator())
    assert head.scale is None and head.temperature == 0.1
    assert set(head.state_dict()) == {"projection.weight", "projection.bias"}
    assert [name for name, _ in head.named_parameters()] == ["projection.weight", "projection.bias"]
    features = torch.randn(7, 5, generator=_generator(2))
    assert torch.equal(head(features), F.normalize(head.projection(features), dim=1) @ head.etf / 0.1)


def test_the_learnable_scale_gets_a_gradient_and_moves_in_a_clients_sgd_step():
    head = ETFHead(6, 4, ETFSettings(temperature=0.5), _generator())
    assert isinstance(head.scale, nn.Parameter) and head.scale.shape == () and head.scale.item() == 2.0
    data = _generator(1)
    x, y = torch.randn(16, 6, generator=data), torch.randint(0, 4, (16,), generator=data)
    F.cross_entropy(head(x), y).backward()
    assert head.scale.grad is not None and head.scale.grad.item() != 0.0
    sgd_step(list(head.parameters()), {}, ClientConfig(momentum=0.9, weight_decay=1e-4), lr=0.05)
    assert head.scale.item() != 2.0


def test_etf_dim_below_the_class_count_is_a_config_error():
    with pytest.raises(ConfigError, match=r"dim >= 10"):
        ETFHead(8, 10, ETFSettings(dim=9), _generator())


def test_normalized_logits_equal_a_hand_computed_cosine_over_the_temperature():
    head = NormalizedHead(2, 3, NormalizedSettings(temperature=0.5), _generator())
    with torch.no_grad():
        head.classes.weight.copy_(torch.tensor([[2.0, 0.0], [0.0, 3.0], [-1.0, -1.0]]))
    logits = head(torch.tensor([[3.0, 4.0], [0.0, -2.0]]))
    # (3,4)/5 and (0,-1) against the unit rows (1,0), (0,1), (-1,-1)/sqrt(2)
    expected = torch.tensor([[0.6, 0.8, -7 / (5 * math.sqrt(2))], [0.0, -1.0, 1 / math.sqrt(2)]]) / 0.5
    torch.testing.assert_close(logits, expected)
    assert not any("bias" in name for name, _ in head.named_parameters())


def test_normalized_logits_are_bounded_and_ignore_the_feature_scale():
    head = NormalizedHead(8, 5, NormalizedSettings(temperature=0.2), _generator())
    nn.init.normal_(head.classes.weight, generator=_generator(1))
    features = torch.randn(16, 8, generator=_generator(2))
    logits = head(features)
    assert logits.abs().max() <= 1 / 0.2 + 1e-5
    torch.testing.assert_close(head(features * 37.5), logits)
    torch.testing.assert_close(head(features * 1e-3), logits)


def test_linear_head_is_nn_linear_with_bias():
    head = LinearHead(8, 10, LinearSettings(), _generator())
    assert isinstance(head, nn.Linear)
    assert {name: tuple(p.shape) for name, p in head.named_parameters()} == {"weight": (10, 8), "bias": (10,)}
    plain = nn.Linear(8, 10)
    plain.load_state_dict(head.state_dict())
    features = torch.randn(4, 8, generator=_generator(2))
    assert torch.equal(head(features), plain(features))
    assert torch.equal(head(features), features @ head.weight.T + head.bias)


def test_every_head_maps_features_to_logits_and_names_its_section():
    for name, head_class in HEADS.shipped.items():
        assert HEADS.resolve(name) is head_class and head_class.section == name
        head = head_class(8, 10, head_class.Settings(), _generator())
        assert head(torch.randn(3, 8, generator=_generator(1))).shape == (3, 10)


def test_an_unknown_head_names_the_key_and_the_valid_heads():
    with pytest.raises(ConfigError, match=r"model.head = 'cosine': unknown head; valid: etf, linear, normalized"):
        HEADS.resolve("cosine")


def test_settings_problems_flag_a_temperature_that_is_not_positive():
    for temperature in (0.0, -1.0):
        assert NormalizedSettings(temperature=temperature).problems() == [("temperature", "must be > 0")]
        assert [key for key, _ in ETFSettings(temperature=temperature).problems()] == ["temperature"]
    assert NormalizedSettings().problems() == [] and ETFSettings().problems() == []
    assert [key for key, _ in ETFSettings(dim=1).problems()] == ["dim"]


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a GPU")
def test_heads_move_to_the_gpu_with_their_etf():
    head = ETFHead(8, 10, ETFSettings(), _generator()).to("cuda")
    assert head.etf.device.type == "cuda"
    assert head(torch.randn(3, 8, device="cuda")).device.type == "cuda"


# --- Heads in the config and in a run ---------------------------------------------------


@pytest.mark.parametrize(
    ("override", "message"),
    [
        ("model.head=cosine", "model.head = 'cosine': unknown head; valid: etf, linear, normalized"),
        ("model.normalized.temperature=0", "model.normalized.temperature = 0.0: must be > 0"),
        (
            "model.normalised.temperature=0.1",
            "model.normalised: no head has this section; did you mean model.normalized?",
        ),
        (
            "model.etf.dimension=4",
            "model.etf.dimension: unknown key; valid keys: temperature, learn_temperature, dim",
        ),
        ("model.etf.learn_temperature=maybe", "model.etf.learn_temperature = 'maybe': expected bool"),
        ("model.temperature=0.1", "model.temperature = 0.1: unknown key; valid keys: name, hidden, feature_dim, head"),
    ],
)
def test_a_head_and_its_settings_are_checked_with_the_key_before_any_work(override, message):
    with pytest.raises(ConfigError) as error:
        compose_run([override])
    assert message in str(error.value)


def test_a_heads_settings_reach_the_model_and_others_sections_are_checked_but_unused():
    run = compose_run(["model.head=etf", "model.etf.temperature=0.5", "model.normalized.temperature=2"])
    assert run.model.head_settings == ETFSettings(temperature=0.5)
    model = build_model((1, 8, 8), 10, run.model, torch.Generator().manual_seed(0))
    assert isinstance(model.head, ETFHead) and model.head.scale.item() == 2.0
    fixed = compose_run(["model.head=etf", "model.etf.learn_temperature=false", "model.etf.temperature=0.5"])
    assert fixed.model.head_settings == ETFSettings(temperature=0.5, learn_temperature=False)
    model = build_model((1, 8, 8), 10, fixed.model, torch.Generator().manual_seed(0))
    assert model.head.scale is None and model.head.temperature == 0.5


@pytest.fixture(scope="module")
def etf_run(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A finished 3-round run with the ETF head and its learnable scale."""
    run_dir = tmp_path_factory.mktemp("etf")
    run_experiment(run_dir, [*TINY, "model.head=etf", "eval.probes=false"])
    return run_dir


def test_an_etf_run_sends_the_projection_and_scale_but_never_the_fixed_frame(etf_run):
    sent = np.load(etf_run / "checkpoints" / "round-000003" / "arrays.npz")
    head_arrays = sorted(k for k in sent.files if k.startswith("head."))
    assert head_arrays == ["head.projection.bias", "head.projection.weight", "head.scale"]
    assert sent["head.scale"].shape == () and sent["head.scale"] > 1.0  # trained, aggregated, saved (from 1)
    # The frame a worker builds from the seed is the server's, and its encoder starts as a linear head's does.
    cfg = compose_run([*TINY, "model.head=etf"])
    stream = stream_of(cfg)
    worker = ClientWorker(cfg, WorkerData.of(stream))
    server = build_model(stream.x_train.shape[1:], 10, cfg.model, torch_generator(cfg.seed, Purpose.MODEL_INIT))
    assert torch.equal(worker.model.head.etf, server.head.etf)
    linear = build_model(stream.x_train.shape[1:], 10, ModelConfig(), torch_generator(cfg.seed, Purpose.MODEL_INIT))
    assert all(torch.equal(a, b) for a, b in zip(linear.encoder.parameters(), server.encoder.parameters()))


def test_an_etf_run_resumes_to_the_uninterrupted_runs_numbers_and_scale(etf_run, tmp_path):
    common = ["engine.backend=local", "model.head=etf", "eval.probes=false"]
    run_experiment(tmp_path, [*common, "rounds=2"])
    run_experiment(tmp_path, [*common, "rounds=3"], resume=True)
    (records, summary), (whole_records, whole_summary) = numbers_of(tmp_path), numbers_of(etf_run)
    assert summary == whole_summary
    # The split run's round 2 ended a run, so it may have end-of-run measurements the whole run's lacks.
    assert [{k: r[k] for k in w} for r, w in zip(records, whole_records, strict=True)] == whole_records
    resumed, whole = (checkpoint.load(run / "checkpoints").arrays for run in (tmp_path, etf_run))
    assert resumed.keys() == whole.keys() and "head.scale" in whole
    assert all(np.array_equal(resumed[name].numpy(), whole[name].numpy()) for name in whole.keys())


def test_a_users_model_builds_its_own_head():
    with pytest.raises(ConfigError, match="model.head = 'etf': heads go on the shipped encoders"):
        build_model(
            (1, 8, 8),
            10,
            ModelConfig(name="tests.user_code.plain_models.with_features", head="etf"),
            torch.Generator().manual_seed(0),
        )


def test_a_users_model_gets_the_encoders_width_where_feature_dim_is_null():
    model = build_model(
        (1, 8, 8), 10, ModelConfig(name="tests.user_code.plain_models.with_features"), torch.Generator().manual_seed(0)
    )
    assert model.features(torch.rand(2, 1, 8, 8)).shape == (2, 64)  # feature_dim null: the MLP's and CNN's 64
