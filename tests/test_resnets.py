"""The CIFAR ResNets as encoders, and what federated averaging does with their batch norm."""

from __future__ import annotations

import numpy as np
import pytest
import torch
from flwr.app import Array, ArrayRecord
from flwr.serverapp.strategy import FedAvg
from helpers import (
    USER_CODE,
    final_checkpoint,
    flower_task_identity,
    read_metrics,
    run_experiment,
    timeless_records,
    train_reply,
)

from clients.base import shared_keys
from clients.heads import HEADS
from clients.models import build_model
from clients.sgd import SGDClient
from simulator.config import ConfigError, ModelConfig
from simulator.held_array import held_array_record
from simulator.running_statistics import RunningStatistics
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


def test_resnets_need_images_their_strides_leave_more_than_one_pixel():
    with pytest.raises(ConfigError, match="model.name = 'resnet18' needs image inputs"):
        build_model((60,), 10, ModelConfig(name="resnet18"), torch.Generator())
    with pytest.raises(ConfigError, match="needs images larger than 8x8: use resnet32 or model.name=cnn"):
        build_model((1, 8, 8), 10, ModelConfig(name="resnet18"), torch.Generator())
    model = build_model((1, 9, 9), 10, ModelConfig(name="resnet18"), torch.Generator())
    assert model.train()(torch.rand(1, 1, 9, 9)).shape == (1, 10)  # one sample trains: 2x2 at the end


@pytest.mark.parametrize("head", list(HEADS))
def test_every_head_sits_on_a_resnet(head):
    model = build_model((3, 32, 32), 10, ModelConfig(name="resnet32", head=head), torch.Generator().manual_seed(0))
    logits = model(torch.rand(4, 3, 32, 32))
    assert logits.shape == (4, 10) and torch.isfinite(logits).all()


def test_batch_norms_running_statistics_and_counter_travel_between_server_and_clients():
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
    model = resnet("resnet32", shape=(3, 16, 16), classes=10)
    statistics = RunningStatistics(list(state), (name for name, _ in model.named_buffers()))
    assert "encoder.stem.1.running_var" in statistics.names and "encoder.stem.1.weight" in statistics.parameters
    parameters = statistics.for_strategy(ArrayRecord(state))
    replies = []
    for node in (1, 2, 3):  # three clients that trained to the same model on 4 examples each
        names, arrays = statistics.reply_arrays(ArrayRecord(state).to_numpy_ndarrays(), examples=4.0)
        replies.append(train_reply(node, held_array_record(names, arrays), {"num-examples": 4}))
    assert all(list(reply.content["arrays"].keys()) == statistics.parameters for reply in replies)
    averaged, _ = FedAvg().aggregate_train(1, replies)
    model_after = statistics.with_averaged(as_global_arrays(averaged, parameters, "FedAvg.aggregate_train"))
    # Flower's weighted mean of the counter would give 6.999999999999999 (7/3 three times), which an int64
    # tensor truncates to 6: the engine averages buffers itself and rounds counters to the nearest.
    assert list(model_after.keys()) == list(state)
    for name, before in state.items():
        after, before = model_after[name].numpy(), before.numpy()
        assert after.dtype == before.dtype, name
        if before.dtype.kind == "i":
            assert np.array_equal(after, before) and int(after) == 7, name
        else:
            np.testing.assert_allclose(after, before, rtol=1e-6, atol=1e-7, err_msg=name)


def test_the_global_buffers_are_the_trained_clients_mean_weighted_by_examples_counters_rounded():
    statistics = RunningStatistics(["w", "mean", "count"], ["mean", "count"])
    global_model = ArrayRecord(
        {"w": Array(np.ones(2, np.float32)), "mean": Array(np.zeros(2, np.float32)), "count": Array(np.array(4))}
    )
    assert list(statistics.for_strategy(global_model).keys()) == ["w"]
    clients = [(1.0, [np.float32(2), np.array([1.0, 2.0], np.float32), np.array(5)])]
    clients += [(3.0, [np.float32(2), np.array([5.0, 6.0], np.float32), np.array(6)]), (0.0, [0, np.ones(2), 99])]
    for examples, arrays in clients:
        assert statistics.reply_arrays([np.asarray(a) for a in arrays], examples)[0] == ["w"]
    merged = statistics.with_averaged(ArrayRecord({"w": Array(np.full(2, 7, np.float32))}))
    assert list(merged.keys()) == ["w", "mean", "count"]
    np.testing.assert_array_equal(merged["mean"].numpy(), np.array([4.0, 5.0], np.float32))  # (1 x a + 3 x b) / 4
    assert merged["count"].numpy().dtype == np.int64 and int(merged["count"].numpy()) == 6  # 5.75, rounded
    # A round no client trained an example in keeps the global buffers.
    assert np.array_equal(
        statistics.with_averaged(ArrayRecord({"w": Array(np.ones(2, np.float32))}))["mean"].numpy(), np.zeros(2)
    )


@pytest.mark.parametrize("strategy", ["fedavgm", "qfedavg", "dp_fixed_client", "dp_fixed_server"])
def test_strategies_aggregate_parameters_and_the_engine_averages_the_running_statistics(tmp_path, strategy):
    # FedAvgM's momentum, DP noise and clipping, QFedAvg's integer arithmetic: none reach the buffers.
    run_experiment(tmp_path, [*CLASS_IL, f"strategy={strategy}"])
    arrays, _ = final_checkpoint(tmp_path)
    variances = [array for name, array in arrays.items() if name.endswith("running_var")]
    assert len(variances) == 31 and all(np.isfinite(v).all() and (v > 0).all() for v in variances)
    assert all(np.isfinite(r["acc_seen"]) for r in read_metrics(tmp_path))


def test_a_strategy_never_sees_batch_norms_buffers(tmp_path, monkeypatch):
    monkeypatch.syspath_prepend(str(USER_CODE))
    import record_strategies

    record_strategies.SEEN.clear()
    run_experiment(tmp_path, [*CLASS_IL, "strategy._target_=record_strategies.KeysSeen"])
    assert record_strategies.SEEN and all(
        not any(key.endswith(("running_mean", "running_var", "num_batches_tracked")) for key in keys)
        for keys in record_strategies.SEEN
    )
    assert "encoder.stem.1.running_var" in final_checkpoint(tmp_path)[0]  # the global model has them


@pytest.mark.parametrize("method", ["sgd", "fedprox", "replay", "ewc", "lwf", "fedper", "fedrep"])
def test_every_method_trains_a_resnet_through_a_task_change(tmp_path, method):
    run_experiment(tmp_path, [*CLASS_IL, f"client.method={method}"])
    records = read_metrics(tmp_path)
    assert [r["task"] for r in records] == [0, 1] and all(np.isfinite(r["train_loss"]) for r in records)
    # Where a method acts only after a task change, it did act: on what the first task left.
    acted = {"lwf": "train/lwf_distillation", "ewc": "train/ewc_penalty", "replay": "train/replay_memory"}
    if method in acted:
        assert records[0][acted[method]] == 0 < records[1][acted[method]]


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


def test_a_resnet_run_resumed_from_a_checkpoint_matches_the_uninterrupted_one(tmp_path):
    # FedAdam's moments hold the parameters only; the checkpoint holds the buffers; LwF keeps its teacher's.
    common = [*CLASS_IL, "strategy=fedadam", "client.method=lwf", "federation.clients_per_round=10"]
    run_experiment(tmp_path / "whole", [*common, "rounds=3"])
    run_experiment(tmp_path / "split", common)
    run_experiment(tmp_path / "split", [*common, "rounds=3"], resume=True)
    # Resumed states are read back from the checkpoint's files, which the spill gauge counts (as it
    # always has, whatever the model); every number of the training is the same.
    spill = "client_state_spilled_mb"
    split_records, whole_records = timeless_records(tmp_path / "split"), timeless_records(tmp_path / "whole")
    assert [{k: v for k, v in r.items() if k != spill} for r in split_records] == [
        {k: v for k, v in r.items() if k != spill} for r in whole_records
    ]
    whole, _ = final_checkpoint(tmp_path / "whole")
    split, _ = final_checkpoint(tmp_path / "split")
    assert all(np.array_equal(whole[name], split[name]) for name in whole)
