"""The Flower baseline: a workload run by Flower's own simulation, Message API.

``python benchmarks/run_flower.py WORKLOAD`` trains the workload's clients with
``flwr.simulation.run_simulation`` on the Ray backend (one CPU per client
actor) and prints :func:`benchmarks.workloads.report` as its last stdout line.

It is written the way Flower's documentation writes an app, so that it times
Flower as a user would run it: the ServerApp runs
:class:`~benchmarks.cohort_strategy.FixedCohortFedAvg` (the cohorts FedStream
trains, each message naming its partition); the ClientApp builds a model per
message, loads the received arrays and trains with FedStream's own
:class:`~clients.sgd.SGDClient`, on data it loads once per worker process.
Initial weights, cohorts, partitions and local shuffling come from the same
seeded generators FedStream uses, so both train the same clients on the same
samples from the same start.

Two things are shaped by how Ray runs the ClientApp. Flower pickles the
ClientApp into every call, and cloudpickle pickles functions of ``__main__`` by
value, which would drop the per-process data cache on each call; so the apps
are taken from this module imported by name (``benchmarks.run_flower``), which
Ray workers import once each. And a worker learns the workload from the
environment (:data:`WORKLOAD_ENV`), which it inherits from the driver.
"""

from __future__ import annotations

import importlib
import os
import sys
import time
from dataclasses import dataclass
from pathlib import Path

REPO_ROOT = str(Path(__file__).resolve().parents[1])
if REPO_ROOT not in sys.path:  # run as a script, and in Ray workers
    sys.path.insert(0, REPO_ROOT)

import torch
from flwr.app import ArrayRecord, Context, Message, MetricRecord, RecordDict
from flwr.clientapp import ClientApp
from flwr.serverapp import Grid, ServerApp
from flwr.simulation import run_simulation

from benchmarks.cohort_strategy import PARTITION_ID, FixedCohortFedAvg
from benchmarks.workloads import WORKLOADS, Workload, report, save_weights, shared_data
from clients.base import TrainContext
from clients.models import RepresentationModel, build_model, evaluate
from clients.sgd import SGDClient
from simulator.config import ExperimentConfig
from simulator.protocol import NUM_EXAMPLES, SERVER_ROUND, TRAIN_LOSS
from simulator.seeding import Purpose, torch_generator
from simulator.streams.base import Stream

WORKLOAD_ENV = "FEDSTREAM_BENCHMARK_WORKLOAD"
NODE_WAIT_S = 60.0

_data: dict[str, tuple[ExperimentConfig, Stream]] = {}  # per process: workload name -> (run config, stream)


@dataclass
class Outcome:
    """What the ServerApp leaves for the driver: the strategy (clock, samples) and test accuracy."""

    strategy: FixedCohortFedAvg
    accuracy: float


outcomes: list[Outcome] = []


def workload() -> Workload:
    """The workload this process runs, named by the driver in the environment."""
    return WORKLOADS[os.environ[WORKLOAD_ENV]]


def data() -> tuple[ExperimentConfig, Stream]:
    """The workload's run config and stream, loaded once per process."""
    bench = workload()
    if bench.name not in _data:
        _data[bench.name] = shared_data(bench)
    return _data[bench.name]


def new_model(experiment: ExperimentConfig, stream: Stream) -> RepresentationModel:
    """The model with FedStream's initial weights."""
    generator = torch_generator(experiment.seed, Purpose.MODEL_INIT)
    return build_model(stream.x_train.shape[1:], stream.num_classes, experiment.model, generator)


client_app = ClientApp()


@client_app.train()
def train(msg: Message, context: Context) -> Message:
    """Train the partition the message names on the arrays it carries."""
    torch.set_num_threads(1)
    experiment, stream = data()
    config = msg.content["config"]
    server_round, client = int(config[SERVER_ROUND]), int(config[PARTITION_ID])
    model = new_model(experiment, stream)
    model.load_state_dict(msg.content["arrays"].to_torch_state_dict())
    indices = stream.train_indices(server_round, client)
    x, y = torch.from_numpy(stream.x_train[indices]), torch.from_numpy(stream.y_train[indices])
    generator = torch_generator(experiment.seed, Purpose.CLIENT_TRAIN, server_round, client)
    result = SGDClient(experiment.client).train(
        model, x, y, TrainContext(server_round, client, dict(config), generator, experiment.client.lr)
    )
    metrics = MetricRecord({NUM_EXAMPLES: result.num_examples, TRAIN_LOSS: result.train_loss})
    return Message(RecordDict({"arrays": ArrayRecord(model.state_dict()), "metrics": metrics}), reply_to=msg)


server_app = ServerApp()


@server_app.main()
def main(grid: Grid, context: Context) -> None:
    """Run FedAvg on the workload's cohorts, then evaluate the final model on the test set."""
    bench = workload()
    experiment, stream = data()
    model = new_model(experiment, stream)
    strategy = FixedCohortFedAvg(
        bench.name,
        by_partition=True,
        epochs=bench.epochs,
        fraction_evaluate=0.0,
        min_available_nodes=bench.num_clients,
    )
    await_nodes(grid, bench.num_clients)
    result = strategy.start(grid, initial_arrays=ArrayRecord(model.state_dict()), num_rounds=bench.rounds)
    model.load_state_dict(result.arrays.to_torch_state_dict())
    x_test, y_test = torch.from_numpy(stream.x_test), torch.from_numpy(stream.y_test)
    _, accuracy = evaluate(model, x_test, y_test, experiment.eval.batch_size)
    outcomes.append(Outcome(strategy, accuracy))


def await_nodes(grid: Grid, count: int) -> None:
    """Wait until ``count`` nodes are registered.

    The simulation starts the ServerApp before it registers the nodes, and
    ``FixedCohortFedAvg`` takes the nodes it finds without waiting for them.
    """
    deadline = time.monotonic() + NODE_WAIT_S
    while len(list(grid.get_node_ids())) < count:
        if time.monotonic() > deadline:
            raise TimeoutError(f"only {len(list(grid.get_node_ids()))} of {count} Flower nodes registered")
        time.sleep(0.1)


def run_workload(name: str) -> Outcome:
    """Run workload ``name`` in Flower's simulation; the driver's side of the benchmark."""
    os.environ[WORKLOAD_ENV] = name
    os.environ["PYTHONPATH"] = os.pathsep.join(filter(None, [REPO_ROOT, os.environ.get("PYTHONPATH")]))
    # By name, not ``__main__``: see the module docstring.
    apps = importlib.import_module("benchmarks.run_flower")
    run_simulation(
        server_app=apps.server_app,
        client_app=apps.client_app,
        num_supernodes=WORKLOADS[name].num_clients,
        backend_config={"client_resources": {"num_cpus": 1, "num_gpus": 0.0}},
    )
    if not apps.outcomes:
        raise RuntimeError("the Flower ServerApp finished without a result; see its log above")
    return apps.outcomes[-1]


if __name__ == "__main__":
    if len(sys.argv) != 2 or sys.argv[1] not in WORKLOADS:
        sys.exit(f"usage: python benchmarks/run_flower.py {{{'|'.join(WORKLOADS)}}}")
    outcome = run_workload(sys.argv[1])
    save_weights(outcome.strategy.final.to_numpy_ndarrays())
    report(outcome.strategy.clock, outcome.accuracy, outcome.strategy.samples)
