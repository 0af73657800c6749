"""The CIFAR ResNets as encoders, and what federated averaging does with their batch norm."""

from __future__ import annotations

import numpy as np
import pytest
import torch
from flwr.app import ArrayRecord
from flwr.serverapp.strategy import FedAvg
from helpers import flower_task_identity, read_metrics, run_experiment, train_reply

from clients.base import shared_keys
from clients.heads import HEADS
from clients.models import build_model
from clients.sgd import SGDClient
from simulator.config import ConfigError, ModelConfig
from simulator.strategy_calls import as_global_arrays


def resnet(name: str, shape=(3, 32, 32), classes: int = 100, **model) -> torch.nn.Module:
    return build_model(shape, classes, ModelConfig(name=name, **model), torch.Generator().manual_seed(0))


@pytest.mark.parametrize(("name", "parameters", "width"), [("resnet18", 11_220_132, 512), ("resnet32", 470_004, 64)])
def test_each_resnet_has_its_papers_size_and_feature_width(name, parameters, width):
    model = resnet(name)
    assert sum(p.numel() for p in model.parameters()) == parameters  # with a 100-class linear head
    x = torch.rand(2, 3, 32, 32)
    assert model.features(x).shape == (2, width) and model(x).shape == (2, 100)
    assert (model.features(x) >= 0).all()  # ends in a ReLU, as the MLP and CNN do


def test_a_feature_dim_adds_a_projection_and_any_image_size_or_channel_count_is_taken():
    model = resnet("resnet32", shape=(1, 28, 28), classes=10, feature_dim=16)
    assert model.features(torch.rand(3, 1, 28, 28)).shape == (3, 16)
    assert isinstance(model.encoder[1], torch.nn.Linear) and model.encoder[1].in_features == 64


def test_resnets_need_images():
    with pytest.raises(ConfigError, match="model.name = 'resnet18' needs image inputs"):
        build_model((60,), 10, ModelConfig(name="resnet18"), torch.Generator())


@pytest.mark.parametrize("head", list(HEADS))
def test_every_head_sits_on_a_resnet(head):
    model = build_model((3, 32, 32), 10, ModelConfig(name="resnet32", head=head), torch.Generator().manual_seed(0))
    logits = model(torch.rand(4, 3, 32, 32))
    assert logits.shape == (4, 10) and torch.isfinite(logits).all()


def test_batch_norms_running_statistics_and_counter_travel_to_the_server():
    model = resnet("resnet32")
    sent = shared_keys(model, SGDClient)
    assert "encoder.stem.1.running_mean" in sent and "encoder.stem.1.running_var" in sent
    assert "encoder.stem.1.num_batches_tracked" in sent and sent == list(model.state_dict())


def _trained_state() -> dict[str, torch.Tensor]:
    """A ResNet-32's state after 7 training steps: running statistics and counter away from their start."""
    model = resnet("resnet32", shape=(3, 16, 16), classes=10)
    model.train()
    with torch.no_grad():
        for step in range(7):
            model(torch.rand(8, 3, 16, 16, generator=torch.Generator().manual_seed(step)))
    return model.state_dict()


def test_fedavg_of_identical_clients_gives_back_their_model_counter_included():
    flower_task_identity()
    state = _trained_state()
    assert int(state["encoder.stem.1.num_batches_tracked"]) == 7
    sent = ArrayRecord(state)
    replies = [train_reply(node, ArrayRecord(state), {"num-examples": 4}) for node in (1, 2, 3)]
    averaged, _ = FedAvg().aggregate_train(1, replies)
    # Flower's weighted mean turns the int64 counter into 6.999999999999999 (7/3 three times), which
    # an int64 tensor would truncate to 6; the engine gives it back its type, rounded.
    counter = averaged["encoder.stem.1.num_batches_tracked"].numpy()
    assert counter.dtype == np.float64 and int(counter.astype(np.int64)) == 6
    model = as_global_arrays(averaged, sent, "FedAvg.aggregate_train").to_numpy_ndarrays()
    for (name, before), after in zip(sent.items(), model, strict=True):
        before = before.numpy()
        assert after.dtype == before.dtype, name
        if before.dtype.kind == "i":
            assert np.array_equal(after, before), name
        else:
            np.testing.assert_allclose(after, before, rtol=1e-6, atol=1e-7, err_msg=name)


@pytest.mark.parametrize("method", ["sgd", "replay", "ewc", "lwf", "fedrep"])
def test_every_method_trains_a_resnet_through_a_task_change(tmp_path, method):
    run_experiment(tmp_path, [*CLASS_IL, f"client.method={method}"])
    records = read_metrics(tmp_path)
    assert [r["task"] for r in records] == [0, 1] and all(np.isfinite(r["train_loss"]) for r in records)


@pytest.mark.parametrize("strategy", ["fot", "ccvr", "fedadam"])
def test_the_server_side_continual_strategies_and_an_adaptive_one_aggregate_a_resnet(tmp_path, strategy):
    # FOT: two tasks, so one task end grows bases (none at the last), on 16 samples a client (its cap).
    fot = ["strategy.query_samples=16", "stream.class_incremental.tasks=[[0,1],[2,3]]"] if strategy == "fot" else []
    run_experiment(tmp_path, [*CLASS_IL, f"strategy={strategy}", *fot])
    records = read_metrics(tmp_path)
    assert len(records) == 2 and all(np.isfinite(r["acc_seen"]) for r in records)


CLASS_IL = [
    "scenario=digits_class_incremental",
    "model.name=resnet32",
    "engine.backend=local",
    "stream.rounds_per_task=1",
    "rounds=2",
    "federation.clients_per_round=2",
    "client.epochs=1",
    "eval.probe_samples=200",
]
