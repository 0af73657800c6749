"""run.py as a user runs it: custom strategies, multirun sweeps, and bad input."""

from __future__ import annotations

import json
import os
import subprocess
import sys
import textwrap
from pathlib import Path

import pytest
import ray
from hydra.errors import MissingConfigException

from conftest import ROOT, read_metrics, run_experiment
from simulator.config import ConfigError

USER_STRATEGY = '''
from flwr.app import MetricRecord
from flwr.serverapp.strategy import FedAvg


class KeepsInitialWeights(FedAvg):
    """Takes the clients' replies and ignores them: the global model never moves."""

    def aggregate_train(self, server_round, replies):
        replies = list(replies)
        assert len(replies) == 10 and all(r.content["arrays"] for r in replies)
        return None, MetricRecord({"train_loss": 1000.0 + server_round})
'''


def run_cli(args: list[str], pythonpath: Path | None = None) -> subprocess.CompletedProcess:
    env = dict(os.environ)
    if pythonpath is not None:
        env["PYTHONPATH"] = str(pythonpath)
    return subprocess.run(
        [sys.executable, "run.py", *args], cwd=ROOT, env=env,
        capture_output=True, text=True, timeout=300,
    )


def test_a_users_strategy_outside_the_repo_is_the_one_that_aggregates(tmp_path):
    module_dir = tmp_path / "their_code"
    module_dir.mkdir()
    (module_dir / "their_module.py").write_text(textwrap.dedent(USER_STRATEGY))
    run_dir = tmp_path / "run"
    result = run_cli(
        ["strategy._target_=their_module.KeepsInitialWeights", "rounds=3",
         "engine.backend=local", f"hydra.run.dir={run_dir}"],
        pythonpath=module_dir,
    )
    assert result.returncode == 0, result.stderr
    records = read_metrics(run_dir)
    # Its metrics reached the log, and the global model stayed at its initial weights.
    assert [r["train_loss"] for r in records] == [1001.0, 1002.0, 1003.0]
    assert len({r["acc_seen"] for r in records}) == 1
    assert f"run directory: {run_dir}" in result.stdout
    assert '"final_accuracy"' in result.stdout


def test_multirun_sweeps_seeds_into_separate_run_directories(tmp_path):
    result = run_cli(
        ["--multirun", "seed=0,1", "rounds=1", "engine.backend=local",
         f"hydra.sweep.dir={tmp_path}", "hydra.sweep.subdir=seed${seed}"]
    )
    assert result.returncode == 0, result.stderr
    summaries = [json.loads((tmp_path / f"seed{s}" / "summary.json").read_text()) for s in (0, 1)]
    assert summaries[0]["final_accuracy"] != summaries[1]["final_accuracy"]


def test_an_impossible_value_exits_with_the_key_and_reason_before_any_work(tmp_path):
    result = run_cli(["data.partition.alpha=-1", f"hydra.run.dir={tmp_path}"])
    assert result.returncode == 2
    assert "data.partition.alpha = -1.0: Dirichlet concentration must be > 0" in result.stderr
    assert "scenarios/scenario/digits.yaml" in result.stderr
    assert not (tmp_path / "metrics.jsonl").exists()


def test_an_unknown_scenario_lists_the_valid_names():
    result = run_cli(["scenario=no_such_scenario"])
    assert result.returncode == 2 and "Traceback" not in result.stderr
    assert "error: scenario=no_such_scenario: no scenario file" in result.stderr
    assert "digits" in result.stderr


@pytest.mark.parametrize(
    ("overrides", "fragments"),
    [
        (["data.partition.alpha=0"], ["data.partition.alpha", "must be > 0"]),
        (["client.lr=-0.1"], ["client.lr", "learning rate must be > 0"]),
        (["federation.clients_per_round=21"],
         ["federation.clients_per_round", "more clients per round than clients"]),
        (["data.partition.kind=classes", "data.partition.classes_per_client=11"],
         ["data.partition.classes_per_client", "10"]),
        (["data.dataset=imagenet"], ["data.dataset", "digits", "mnist5k", "cifar10", "npz"]),
        (["data.scale=0"], ["data.scale = 0.0", "must be > 0"]),
        (["data.dataset=mnist", "data.path=/no/such/folder"], ["data.path", "/no/such/folder"]),
        (["data.partition.kind=zipf"], ["data.partition.kind", "dirichlet", "shards"]),
        (["strategy._target_=no_such_module.Strategy"], ["strategy._target_", "no_such_module"]),
        (["strategy.min_available_nodes=50"], ["strategy.min_available_nodes", "wait forever"]),
        (["client.method=adam"], ["client.method", "sgd", "fedprox"]),
        (["model.name=resnet"], ["model.name", "mlp", "cnn"]),
        (["+client.learning_rate=0.1"], ["client.learning_rate", "unknown key", "lr"]),
    ],
)
def test_bad_input_is_rejected_with_key_and_reason_before_ray_starts(tmp_path, overrides, fragments):
    with pytest.raises(ConfigError) as error:
        run_experiment(tmp_path, ["engine.backend=ray", *overrides])
    for fragment in fragments:
        assert fragment in str(error.value)
    assert not ray.is_initialized()
    assert not (tmp_path / "metrics.jsonl").exists()


def test_an_unknown_strategy_name_lists_the_valid_names(tmp_path):
    with pytest.raises(MissingConfigException) as error:
        run_experiment(tmp_path, ["strategy=fedsgd"])
    assert "fedavg" in str(error.value) and "krum" in str(error.value)
