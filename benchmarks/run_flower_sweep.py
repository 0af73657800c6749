"""One job of the sweep workload in Flower's simulation: ``python benchmarks/run_flower_sweep.py STRATEGY SEED [key=value ...]``.

The default scenario (scikit-learn digits, 20 clients by Dirichlet(0.5), 10 a
round, 30 rounds, the MLP, local SGD) with the Flower strategy FedStream's
``scenarios/strategy/STRATEGY.yaml`` builds, run as a Flower user runs a sweep:
one ``run_simulation`` per job. Each node trains the partition Flower gives it
(``node_config["partition-id"]``) with FedStream's own SGD client and data;
the strategy samples its cohorts itself. Prints the final test accuracy.
Workers learn the job from the environment (:data:`JOB_ENV`), and the apps are
taken from this module imported by name (see ``benchmarks/run_flower.py``).
"""

from __future__ import annotations

import importlib
import json
import os
import sys
from pathlib import Path

REPO_ROOT = str(Path(__file__).resolve().parents[1])
if REPO_ROOT not in sys.path:  # run as a script, and in Ray workers
    sys.path.insert(0, REPO_ROOT)

import torch
from flwr.app import ArrayRecord, Context, Message, MetricRecord, RecordDict
from flwr.clientapp import ClientApp
from flwr.serverapp import Grid, ServerApp
from flwr.simulation import run_simulation

from clients.base import TrainContext
from clients.models import build_model, evaluate
from clients.sgd import SGDClient
from simulator.config import ExperimentConfig, compose_config
from simulator.data import load_dataset
from simulator.plugins import load_config
from simulator.protocol import LEARNING_RATE, NUM_EXAMPLES, TRAIN_LOSS
from simulator.seeding import Purpose, torch_generator
from simulator.streams import Stream, build_stream
from strategies import build_strategy

JOB_ENV = "FEDSTREAM_SWEEP_JOB"  # the job's config overrides, as JSON
SERVER_ROUND_KEY = "server-round"  # what Flower's strategies put in the train ConfigRecord
_job: dict[str, tuple] = {}  # per process: the job's (composed config, run config, stream)


def job() -> tuple:
    """The job's config and data, loaded once per process."""
    key = os.environ[JOB_ENV]
    if key not in _job:
        cfg = compose_config(json.loads(key))
        experiment = load_config(cfg)
        _job[key] = (
            cfg,
            experiment,
            build_stream(experiment, load_dataset(experiment.data, experiment.federation.num_clients, experiment.seed)),
        )
    return _job[key]


def new_model(experiment: ExperimentConfig, stream: Stream) -> torch.nn.Module:
    return build_model(
        stream.x_train.shape[1:],
        stream.num_classes,
        experiment.model,
        torch_generator(experiment.seed, Purpose.MODEL_INIT),
    )


client_app = ClientApp()


@client_app.train()
def train(msg: Message, context: Context) -> Message:
    """Train this node's partition on the arrays the message carries."""
    torch.set_num_threads(1)
    _, experiment, stream = job()
    client = int(context.node_config["partition-id"])
    config = msg.content["config"]
    server_round = int(config.get(SERVER_ROUND_KEY, 0))
    model = new_model(experiment, stream)
    model.load_state_dict(msg.content["arrays"].to_torch_state_dict())
    indices = stream.train_indices(server_round, client)
    x, y = torch.from_numpy(stream.x_train[indices]), torch.from_numpy(stream.y_train[indices])
    generator = torch_generator(experiment.seed, Purpose.CLIENT_TRAIN, server_round, client)
    lr = float(config.get(LEARNING_RATE, experiment.client.lr))
    result = SGDClient(experiment.client).train(
        model, x, y, TrainContext(server_round, client, dict(config), generator, lr)
    )
    metrics = MetricRecord({NUM_EXAMPLES: result.num_examples, TRAIN_LOSS: result.train_loss})
    return Message(RecordDict({"arrays": ArrayRecord(model.state_dict()), "metrics": metrics}), reply_to=msg)


server_app = ServerApp()
accuracies: list[float] = []


@server_app.main()
def main(grid: Grid, context: Context) -> None:
    """The scenario's rounds with the configured strategy, then the final model on the test set."""
    cfg, experiment, stream = job()
    model = new_model(experiment, stream)
    strategy = build_strategy(cfg.strategy)
    result = strategy.start(grid, initial_arrays=ArrayRecord(model.state_dict()), num_rounds=experiment.rounds)
    model.load_state_dict(result.arrays.to_torch_state_dict())
    x_test, y_test = torch.from_numpy(stream.x_test), torch.from_numpy(stream.y_test)
    accuracies.append(evaluate(model, x_test, y_test, experiment.eval.batch_size)[1])


def run_job(strategy: str, seed: int, extra: list[str]) -> float:
    """One job in Flower's simulation (``extra``: further config overrides); its final test accuracy."""
    os.environ[JOB_ENV] = json.dumps([f"strategy={strategy}", f"seed={seed}", *extra])
    os.environ["PYTHONPATH"] = os.pathsep.join(filter(None, [REPO_ROOT, os.environ.get("PYTHONPATH")]))
    apps = importlib.import_module("benchmarks.run_flower_sweep")  # by name: see the module docstring
    _, experiment, _ = apps.job()
    run_simulation(
        server_app=apps.server_app,
        client_app=apps.client_app,
        num_supernodes=experiment.federation.num_clients,
        backend_config={"client_resources": {"num_cpus": 1, "num_gpus": 0.0}},
    )
    if not apps.accuracies:
        raise RuntimeError("the Flower ServerApp finished without a result; see its log above")
    return apps.accuracies[-1]


if __name__ == "__main__":
    if len(sys.argv) < 3:
        sys.exit("usage: python benchmarks/run_flower_sweep.py STRATEGY SEED [key=value ...]")
    print(f"accuracy {run_job(sys.argv[1], int(sys.argv[2]), sys.argv[3:]):.4f}")
