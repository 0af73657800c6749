"""Client-side pieces with hand-computed expectations: FedProx, DP clipping, models."""

from __future__ import annotations

import numpy as np
import pytest
import torch
from helpers import tiny_model as _model
from helpers import train_context

from clients import METHODS
from clients.base import TrainContext
from clients.clipping import clip_update
from clients.fedprox import FedProxClient
from clients.models import build_model
from clients.sgd import SGDClient
from simulator.config import ClientConfig, ConfigError, ModelConfig
from simulator.protocol import PROXIMAL_MU


def _data() -> tuple[torch.Tensor, torch.Tensor]:
    g = torch.Generator().manual_seed(1)
    return torch.rand(64, 1, 8, 8, generator=g), torch.randint(0, 10, (64,), generator=g)


def _context(config: dict | None = None, lr: float = 0.1) -> TrainContext:
    """Round 1's context."""
    return train_context(server_round=1, config=config, lr=lr)


def _flat(model: torch.nn.Module) -> torch.Tensor:
    return torch.cat([p.detach().flatten() for p in model.parameters()])


def test_fedprox_adds_mu_times_the_distance_to_the_global_weights_to_each_gradient():
    model = _model()
    client = FedProxClient(ClientConfig(settings=FedProxClient.Settings()))
    client.begin(model, _context({PROXIMAL_MU: 0.5}))
    with torch.no_grad():
        for p in model.parameters():
            p.add_(1.0)  # now w - w_global = 1 everywhere
            p.grad = torch.full_like(p, 2.0)
    client.adjust_gradients(model, _context())
    for p in model.parameters():
        torch.testing.assert_close(p.grad, torch.full_like(p, 2.0 + 0.5 * 1.0))


def test_fedprox_with_mu_zero_is_exactly_sgd_and_with_mu_stays_closer_to_the_global_model():
    x, y = _data()
    start = _flat(_model())
    trained = {}
    for name, method, mu in [("sgd", SGDClient, 0.0), ("prox0", FedProxClient, 0.0), ("prox", FedProxClient, 5.0)]:
        model = _model()
        method(ClientConfig(lr=0.1, epochs=3, batch_size=8, settings=method.Settings())).train(
            model, x, y, _context({PROXIMAL_MU: mu})
        )
        trained[name] = _flat(model)
    assert torch.equal(trained["sgd"], trained["prox0"])
    assert (trained["prox"] - start).norm() < 0.8 * (trained["sgd"] - start).norm()


def test_fedprox_uses_client_fedprox_proximal_mu_when_the_strategy_sends_none():
    model = _model()
    client = FedProxClient(ClientConfig(settings=FedProxClient.Settings(proximal_mu=0.25)))
    client.begin(model, _context())
    assert client.mu == 0.25


def test_local_training_reports_examples_and_lowers_the_loss():
    x, y = _data()
    model = _model()
    loss_before = torch.nn.functional.cross_entropy(model(x), y).item()
    result = SGDClient(ClientConfig(lr=0.1, epochs=5, batch_size=8)).train(model, x, y, _context())
    assert result.num_examples == 64
    assert torch.nn.functional.cross_entropy(model(x), y).item() < loss_before


def test_clip_update_scales_the_update_to_the_norm_and_reports_it():
    reference = [np.zeros(2, np.float32), np.ones(1, np.float32)]
    arrays = [np.array([3.0, 0.0], np.float32), np.array([5.0], np.float32)]  # update (3, 0, 4)
    assert clip_update(arrays, reference, 1.0) is False
    np.testing.assert_allclose(arrays[0], [0.6, 0.0], rtol=1e-6)
    np.testing.assert_allclose(arrays[1], [1.8], rtol=1e-6)  # 1 + 4/5
    assert clip_update(arrays, reference, 1.0) is True  # now exactly within


def test_models_split_into_encoder_and_head_and_init_is_seeded():
    for name, shape in [("mlp", (1, 8, 8)), ("cnn", (1, 28, 28)), ("cnn", (3, 32, 32))]:
        cfg = ModelConfig(name=name, feature_dim=32)
        model = build_model(shape, 10, cfg, torch.Generator().manual_seed(3))
        x = torch.rand(4, *shape)
        assert model.features(x).shape == (4, 32)
        assert model(x).shape == (4, 10)
        again = build_model(shape, 10, cfg, torch.Generator().manual_seed(3))
        assert torch.equal(_flat(model), _flat(again))
    with pytest.raises(ConfigError, match="model.name = 'cnn' needs image inputs"):
        build_model((60,), 10, ModelConfig(name="cnn"), torch.Generator())


def test_client_methods_resolve_by_short_name_or_dotted_path():
    assert METHODS.resolve("fedprox") is FedProxClient
    assert METHODS.resolve("clients.sgd.SGDClient") is SGDClient
    with pytest.raises(ConfigError, match="expected a clients.ClientMethod subclass"):
        METHODS.resolve("collections.OrderedDict")
    with pytest.raises(ConfigError, match="no module named 'no_such_pkg'"):
        METHODS.resolve("no_such_pkg.Method")


@pytest.mark.parametrize(("momentum", "weight_decay"), [(0.0, 0.0), (0.9, 0.0), (0.5, 1e-3)])
def test_local_sgd_steps_match_torch_optim_sgd(momentum, weight_decay):
    x, y = _data()
    cfg = ClientConfig(lr=0.1, momentum=momentum, weight_decay=weight_decay, epochs=2, batch_size=8)
    ours = _model()
    SGDClient(cfg).train(ours, x, y, _context())
    reference = _model()
    optimizer = torch.optim.SGD(reference.parameters(), lr=0.1, momentum=momentum, weight_decay=weight_decay)
    generator = _context().generator
    for _ in range(2):
        for batch in torch.randperm(64, generator=generator).split(8):
            optimizer.zero_grad()
            torch.nn.functional.cross_entropy(reference(x[batch]), y[batch]).backward()
            optimizer.step()
    torch.testing.assert_close(_flat(ours), _flat(reference), rtol=1e-5, atol=1e-6)


def test_frozen_parameters_are_left_alone():
    x, y = _data()
    model = _model()
    for param in model.encoder.parameters():
        param.requires_grad_(False)
    encoder_before = [p.clone() for p in model.encoder.parameters()]
    head_before = [p.clone() for p in model.head.parameters()]
    SGDClient(ClientConfig(lr=0.1, momentum=0.9)).train(model, x, y, _context())
    assert all(torch.equal(a, b) for a, b in zip(encoder_before, model.encoder.parameters()))
    assert not all(torch.equal(a, b) for a, b in zip(head_before, model.head.parameters()))


def test_asking_for_a_gpu_without_cuda_is_an_error_naming_the_key_not_a_cpu_run():
    import torch

    from simulator.worker import gpu_device

    if torch.cuda.is_available():
        pytest.skip("this torch has CUDA")
    with pytest.raises(RuntimeError, match=r"engine\.num_gpus_per_actor = 0\.5, but this actor's torch .* no CUDA"):
        gpu_device(0.5)
