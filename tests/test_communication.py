"""Communication cost and the run directory's exact numbers: bytes counted from the arrays the
messages carry, totals that survive a resume, a full-precision accuracy matrix, TensorBoard hparams."""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import numpy as np
import pytest
import torch
from helpers import compose_run, dataset_of, local_grid, numbers_of, read_metrics, run_experiment, stream_of

from clients.models import build_model
from simulator import metrics
from simulator.held_array import held_array_record
from simulator.plot import read_accuracy_matrix
from simulator.run_dir import MB, scalar_leaves
from strategies.queries import ask_clients

COHORT = 3
SMALL = ["engine.backend=local", "eval.probes=false", f"federation.clients_per_round={COHORT}", "rounds=3"]


def _model_arrays(overrides: list[str]) -> dict[str, np.ndarray]:
    """The configured model's arrays, by name (their sizes are what the messages carry)."""
    run = compose_run(overrides)
    dataset = dataset_of(run)
    model = build_model(dataset.input_shape, 10, run.model, torch.Generator().manual_seed(0))
    return {name: tensor.numpy() for name, tensor in model.state_dict().items()}


def _nbytes(arrays) -> int:
    return sum(array.nbytes for array in arrays)


def _per_round(run_dir: Path) -> list[tuple[float, float]]:
    """(uplink, downlink) bytes of each round, from the records' running totals (one record a round)."""
    records = read_metrics(run_dir)
    assert [r["round"] for r in records] == list(range(1, len(records) + 1))
    totals = [(0.0, 0.0)] + [(r["uplink_mb"] * MB, r["downlink_mb"] * MB) for r in records]
    return [(up - up0, down - down0) for (up0, down0), (up, down) in zip(totals, totals[1:])]


@pytest.mark.parametrize("federated", [False, True])
def test_fedavg_sends_and_receives_the_global_arrays_once_per_sampled_client(tmp_path, federated):
    overrides = [*SMALL, f"eval.federated={str(federated).lower()}"]
    summary = run_experiment(tmp_path, overrides)
    model = _nbytes(_model_arrays(overrides).values())
    # Training: the cohort gets the model and sends it back; federated evaluation: the model out again.
    expected = (COHORT * model, (2 if federated else 1) * COHORT * model)
    assert _per_round(tmp_path) == [expected] * 3
    assert (summary["uplink_mb"], summary["downlink_mb"]) == (3 * expected[0] / MB, 3 * expected[1] / MB)
    last = read_metrics(tmp_path)[-1]
    assert (summary["uplink_mb"], summary["downlink_mb"]) == (last["uplink_mb"], last["downlink_mb"])


def test_an_encoder_only_method_counts_only_the_arrays_it_shares(tmp_path):
    overrides = [*SMALL, "client.method=fedper"]
    summary = run_experiment(tmp_path, overrides)
    arrays = _model_arrays(overrides)
    encoder = _nbytes(a for name, a in arrays.items() if not name.startswith("head."))
    assert 0 < encoder < _nbytes(arrays.values())
    assert _per_round(tmp_path) == [(COHORT * encoder, COHORT * encoder)] * 3
    assert (summary["uplink_mb"], summary["downlink_mb"]) == (3 * COHORT * encoder / MB,) * 2


def test_a_query_counts_the_model_and_its_own_arrays_out_and_the_answers_back(tmp_path):
    run = compose_run(["engine.backend=local"])
    grid = local_grid(run, stream_of(run), tmp_path)
    model = _model_arrays(["engine.backend=local"])
    basis = np.ones((64, 2), dtype=np.float32)
    arrays = held_array_record(list(model), list(model.values()))
    answers = ask_clients(grid, arrays, "layer_input_sketches", {"encoder.1": basis})
    clients = len(list(grid.get_node_ids()))
    assert len(answers) == clients
    assert grid.traffic.downlink_bytes == clients * (_nbytes(model.values()) + basis.nbytes)
    assert grid.traffic.uplink_bytes == sum(_nbytes(answer.values()) for answer in answers) > 0


def test_totals_after_a_resume_between_evaluations_equal_the_uninterrupted_runs(tmp_path):
    # Records at rounds 3 and 5 only; resuming from round 4's checkpoint must still count round 4.
    overrides = [*SMALL, "rounds=5", "eval.every=3"]
    run_experiment(tmp_path, overrides)
    whole = numbers_of(tmp_path)
    assert [r["round"] for r in whole[0]] == [3, 5]
    shutil.rmtree(tmp_path / "checkpoints" / "round-000005")  # as if killed before round 5's checkpoint
    run_experiment(tmp_path, overrides, resume=True)
    assert numbers_of(tmp_path) == whole
    assert whole[1]["uplink_mb"] == whole[0][-1]["uplink_mb"] > whole[0][0]["uplink_mb"] > 0


def test_the_summary_recomputes_exactly_from_the_written_accuracy_matrix(tmp_path):
    summary = run_experiment(
        tmp_path,
        [
            "scenario=digits_class_incremental",
            "engine.backend=local",
            "eval.probes=false",
            "stream.rounds_per_task=1",
            "client.epochs=1",
        ],
    )
    R = read_accuracy_matrix(tmp_path)
    assert R.shape == (5, 5)
    recomputed = metrics.summarize(R, np.array(summary["initial_acc_per_task"]))
    assert recomputed == {key: summary[key] for key in recomputed}


def test_tensorboard_holds_the_config_as_hparams_with_the_summary_as_their_metrics(tiny_run):
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator
    from tensorboard.plugins.hparams import metadata, plugin_data_pb2

    assert not [path for path in (tiny_run / "tb").iterdir() if path.is_dir()]  # in tb/ itself
    events = EventAccumulator(str(tiny_run / "tb"))
    events.Reload()
    content = events.PluginTagToContent(metadata.PLUGIN_NAME)
    start = plugin_data_pb2.HParamsPluginData.FromString(content[metadata.SESSION_START_INFO_TAG])
    hparams = start.session_start_info.hparams
    assert hparams["client.method"].string_value == "sgd"
    assert hparams["strategy._target_"].string_value == "flwr.serverapp.strategy.FedAvg"
    assert hparams["federation.clients_per_round"].number_value == 10
    experiment = plugin_data_pb2.HParamsPluginData.FromString(content[metadata.EXPERIMENT_TAG])
    tags = {info.name.tag for info in experiment.experiment.metric_infos}
    summary = json.loads((tiny_run / "summary.json").read_text())
    assert {"summary/average_accuracy", "summary/uplink_mb", "summary/downlink_mb"} <= tags
    assert events.Scalars("summary/uplink_mb")[0].value == pytest.approx(summary["uplink_mb"])


def test_scalar_leaves_flattens_nested_keys_and_leaves_out_what_hparams_cannot_take():
    config = {"seed": 0, "client": {"method": "sgd", "lr": 0.05, "ewc": {"on": True}}, "rounds": None, "tasks": [1]}
    assert scalar_leaves(config) == {"seed": 0, "client.method": "sgd", "client.lr": 0.05, "client.ewc.on": True}
