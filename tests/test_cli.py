"""run.py as a user runs it: custom strategies, multirun sweeps, and bad input."""

from __future__ import annotations

import json
import textwrap

import pytest
import ray
import yaml
from helpers import USER_CODE, read_metrics, run_command_line, run_experiment
from hydra.errors import MissingConfigException

import run as cli
from simulator.config import ConfigError, compose_config
from strategies import build_strategy

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


@pytest.mark.slow
def test_a_users_strategy_outside_the_repo_is_the_one_that_aggregates(tmp_path):
    module_dir = tmp_path / "their_code"
    module_dir.mkdir()
    (module_dir / "their_module.py").write_text(textwrap.dedent(USER_STRATEGY))
    run_dir = tmp_path / "run"
    result = run_command_line(
        [
            "strategy._target_=their_module.KeepsInitialWeights",
            "rounds=3",
            "engine.backend=local",
            f"hydra.run.dir={run_dir}",
        ],
        pythonpath=module_dir,
    )
    assert result.returncode == 0, result.stderr
    records = read_metrics(run_dir)
    # Its metrics reached the log, and the global model stayed at its initial weights.
    assert [r["train_loss"] for r in records] == [1001.0, 1002.0, 1003.0]
    assert len({r["acc_seen"] for r in records}) == 1
    assert f"run directory: {run_dir}" in result.stdout
    assert '"final_accuracy"' in result.stdout


@pytest.mark.slow
def test_multirun_sweeps_seeds_into_separate_run_directories(tmp_path):
    result = run_command_line(
        [
            "--multirun",
            "seed=0,1",
            "rounds=1",
            "engine.backend=local",
            f"hydra.sweep.dir={tmp_path}",
            "hydra.sweep.subdir=seed${seed}",
        ]
    )
    assert result.returncode == 0, result.stderr
    summaries = [json.loads((tmp_path / f"seed{s}" / "summary.json").read_text()) for s in (0, 1)]
    assert summaries[0]["final_accuracy"] != summaries[1]["final_accuracy"]


@pytest.mark.slow
def test_an_impossible_value_exits_with_the_key_and_reason_before_any_work(tmp_path):
    result = run_command_line(["data.partition.alpha=-1", f"hydra.run.dir={tmp_path}"])
    assert result.returncode == 2
    assert "data.partition.alpha = -1.0: Dirichlet concentration must be > 0" in result.stderr
    assert "scenarios/scenario/digits.yaml" in result.stderr
    assert not (tmp_path / "metrics.jsonl").exists()


@pytest.mark.slow
def test_an_unknown_scenario_lists_the_valid_names():
    result = run_command_line(["scenario=no_such_scenario"])
    assert result.returncode == 2 and "Traceback" not in result.stderr
    assert "error: scenario=no_such_scenario: no scenario file" in result.stderr
    assert "digits" in result.stderr


@pytest.mark.parametrize(
    ("overrides", "fragments"),
    [
        (["data.partition.alpha=0"], ["data.partition.alpha", "must be > 0"]),
        (["client.lr=-0.1"], ["client.lr", "learning rate must be > 0"]),
        (["federation.clients_per_round=21"], ["federation.clients_per_round", "more clients per round than clients"]),
        (
            ["data.partition.kind=classes", "data.partition.classes_per_client=11"],
            ["data.partition.classes_per_client", "10"],
        ),
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


FEDAVG_ARGUMENTS = ["fraction_train", "weighted_by_key", "train_metrics_aggr_fn"]  # some FedAvg file does not set
FOT_ARGUMENTS = ["threshold", "threshold_step", *FEDAVG_ARGUMENTS]
# A strategy whose constructor's **kwargs reach object: which keys it takes cannot be read.
OPAQUE_STRATEGY = """
class TakesAnything:
    def __init__(self, **anything):
        self.anything = anything
"""


@pytest.mark.parametrize(
    ("overrides", "fragments"),
    [
        (["federation.clients_per_rnd=5"], ["federation.clients_per_rnd: unknown key", "clients_per_round"]),
        (["strategy.etaa=0.1"], ["strategy.etaa: unknown key", "FedAvg", *FEDAVG_ARGUMENTS]),
        (["+strategy.etaa=0.1"], ["strategy.etaa: unknown key", "FedAvg", *FEDAVG_ARGUMENTS]),
        (["strategy=dp_adaptive_client", "strategy.strategy.etaa=1"], ["strategy.strategy.etaa", *FEDAVG_ARGUMENTS]),
        (
            ["strategy._target_=flwr.serverapp.strategy.FedProx", "strategy.proximal_mu=0.1"],
            ["FedProx takes it", "+strategy.proximal_mu="],
        ),
        # **kwargs passed on to the parent: its arguments and the parent's, up the MRO.
        (["strategy=fot", "strategy.etaa=1"], ["strategy.etaa: unknown key", "FOT", *FOT_ARGUMENTS]),
        (["strategy=fot", "+strategy.etaa=1"], ["strategy.etaa: unknown key", "FOT", *FOT_ARGUMENTS]),
        (
            ["strategy=ccvr", "strategy.etaa=1"],
            ["strategy.etaa: unknown key", "CCVR", "virtual_per_class", *FEDAVG_ARGUMENTS],
        ),
        (
            ["strategy._target_=lr_strategy.SendsLearningRate", "strategy.client_lrr=0.5"],
            ["strategy.client_lrr: unknown key", "valid keys: client_lr, ", *FEDAVG_ARGUMENTS],
        ),
        (
            ["strategy._target_=opaque_strategy.TakesAnything", "strategy.etaa=1"],
            ["strategy.etaa: unknown key", "cannot be read", "+strategy.etaa="],
        ),
        (
            ["strategy._target_=flwr.serverapp.strategy.Missing"],
            ["flwr.serverapp.strategy has no 'Missing'", "FedAvg", "Krum"],
        ),
        (["strategy._target_=strategies.fot.Missing"], ["strategies.fot has no 'Missing'", "FOT"]),
        (
            ["strategy=dp_adaptive_client", "strategy.strategy._target_=strategies.fot.Nope"],
            ["strategy.strategy._target_ = 'strategies.fot.Nope': strategies.fot has no 'Nope'"],
        ),
    ],
)
def test_an_unknown_key_or_strategy_class_ends_with_fedstreams_error(
    tmp_path, capsys, monkeypatch, overrides, fragments
):
    monkeypatch.syspath_prepend(str(USER_CODE))
    (tmp_path / "opaque_strategy.py").write_text(OPAQUE_STRATEGY)
    monkeypatch.syspath_prepend(str(tmp_path))
    code = cli.main_cli([*overrides, "engine.backend=local", "rounds=1", f"hydra.run.dir={tmp_path / 'run'}"])
    captured = capsys.readouterr()
    errors = [line for line in captured.err.splitlines() if line.startswith("error: ")]
    assert code == 2 and len(errors) == 1, captured.err
    assert "Traceback" not in captured.err and "not a package" not in errors[0]
    for fragment in fragments:
        assert fragment in errors[0]
    assert "takes it" not in errors[0] or "FedProx takes it" in fragments  # only where it does


def test_an_unknown_key_in_composition_leaves_no_run_directory(tmp_path):
    assert cli.main_cli(["federation.clients_per_rnd=5", f"hydra.run.dir={tmp_path / 'run'}"]) == 2
    assert not (tmp_path / "run").exists()


@pytest.mark.parametrize(
    ("overrides", "message"),
    [
        (["data.partition.alpha=-1"], "data.partition.alpha = -1.0"),
        # data.scale only for datasets read from files: refused before config_resolved.yaml is written.
        *[
            (
                [f"data.dataset={name}", "data.scale=16"],
                f"data.scale = 16.0: applies only to datasets read "
                f"from files (mnist, fashion_mnist, cifar10, cifar100, tiny_imagenet, npz), not data.dataset = '{name}'",
            )
            for name in ("digits", "mnist5k", "synthetic")
        ],
    ],
)
def test_a_config_error_after_composition_is_written_to_run_log_and_nothing_else(tmp_path, overrides, message):
    run_dir = tmp_path / "run"
    assert cli.main_cli([*overrides, "engine.backend=local", "rounds=1", f"hydra.run.dir={run_dir}"]) == 2
    assert (
        f"error: scenarios/scenario/digits.yaml (or the command line): {message}" in (run_dir / "run.log").read_text()
    )
    assert sorted(p.name for p in run_dir.iterdir()) == [".hydra", "run.log"]  # no resolved config, no summary


def test_a_client_failure_leaves_its_error_and_both_tracebacks_in_run_log(tmp_path, monkeypatch):
    monkeypatch.syspath_prepend(str(USER_CODE))
    run_dir = tmp_path / "run"
    code = cli.main_cli(
        [
            "engine.backend=local",
            "rounds=1",
            "client.method=failing_client.FailsOnClientThree",
            "federation.clients_per_round=20",
            "strategy.min_available_nodes=20",
            f"hydra.run.dir={run_dir}",
        ]
    )
    log = (run_dir / "run.log").read_text()
    assert code == 1 and "error: client 3 failed in round 1" in log
    assert "sensor data corrupted on this device" in log  # the client's traceback, in the message
    assert "Traceback" in log and "ClientFailure" in log  # the driver's
    assert not (run_dir / "summary.json").exists()


def test_any_other_error_leaves_its_traceback_in_run_log(tmp_path, monkeypatch):
    def breaks(self):
        raise RuntimeError("a bug in the engine")

    monkeypatch.setattr(cli.Experiment, "run", breaks)
    run_dir = tmp_path / "run"
    assert cli.main_cli(["engine.backend=local", "rounds=1", f"hydra.run.dir={run_dir}"]) == 1
    log = (run_dir / "run.log").read_text()
    assert "error: RuntimeError: a bug in the engine" in log and "Traceback" in log and "breaks" in log


def test_the_resolved_config_is_written_beside_hydras_own(tmp_path):
    run_dir = tmp_path / "run"
    assert (
        cli.main_cli(["engine.backend=local", "rounds=1", "federation.clients_per_round=4", f"hydra.run.dir={run_dir}"])
        == 0
    )
    assert "${" in (run_dir / ".hydra" / "config.yaml").read_text()
    text = (run_dir / cli.RESOLVED_CONFIG).read_text()
    resolved = yaml.safe_load(text)
    assert "${" not in text and resolved["scenario_name"] == "digits"
    assert resolved["strategy"]["min_train_nodes"] == 4 and resolved["strategy"]["fraction_train"] == 0.2
    assert resolved["rounds"] == 1 and "hydra" not in resolved


def test_the_resolved_config_and_the_hparams_show_what_the_run_derived_beside_overridden_defaults(tmp_path):
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    run_dir = tmp_path / "run"
    tasks = "stream.class_incremental.tasks=[[0,1,2],[3,4,5],[6,7,8]]"  # the scenario says classes_per_task: 2
    overrides = ["scenario=digits_class_incremental", tasks, "stream.rounds_per_task=1", "engine.backend=local"]
    assert cli.main_cli([*overrides, "eval.probes=false", f"hydra.run.dir={run_dir}"]) == 0
    resolved = yaml.safe_load((run_dir / cli.RESOLVED_CONFIG).read_text())
    assert resolved["stream"]["class_incremental"]["classes_per_task"] == 2  # as given, overridden by tasks
    assert resolved["derived"] == {"rounds": 3, "num_tasks": 3, "task_classes": [[0, 1, 2], [3, 4, 5], [6, 7, 8]]}
    events = EventAccumulator(str(run_dir / "tb"), size_guidance={"tensors": 0})
    events.Reload()
    hparams = str(events.summary_metadata)
    assert "derived.num_tasks" in hparams and "derived.task_classes" in hparams and "derived.rounds" in hparams


def test_a_strategy_that_keeps_its_own_kwargs_is_built_with_a_key_no_constructor_names(monkeypatch):
    monkeypatch.syspath_prepend(str(USER_CODE))
    cfg = compose_config(["strategy._target_=options_strategy.KeepsOptions", "+strategy.beta=2", "+strategy.mu=0.5"])
    strategy = build_strategy(cfg.strategy)
    assert (strategy.mu, strategy.options["beta"]) == (0.5, 2)  # beside the strategy file's keys, kept too
