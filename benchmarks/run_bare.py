"""The floor: one process, one model reused, no framework: ``python benchmarks/run_bare.py WORKLOAD``.

The same data, partition, cohorts, initial weights and local SGD as the other
implementations, with FedAvg written as a running weighted sum. One torch
thread, like one client actor with one CPU.
"""

from __future__ import annotations

import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

import torch  # noqa: E402

from benchmarks.workloads import WORKLOADS, RoundClock, report, shared_data  # noqa: E402
from clients.base import TrainContext  # noqa: E402
from clients.models import build_model  # noqa: E402
from clients.sgd import SGDClient  # noqa: E402
from simulator.seeding import Purpose, torch_generator  # noqa: E402
from simulator.worker import evaluate  # noqa: E402


def main(name: str) -> None:
    torch.set_num_threads(1)
    workload = WORKLOADS[name]
    run, stream = shared_data(workload)
    model = build_model(stream.x_train.shape[1:], stream.num_classes, run.model,
                        torch_generator(run.seed, Purpose.MODEL_INIT))
    state = model.state_dict()
    global_weights = [t.clone() for t in state.values()]
    method, clock, samples = SGDClient(run.client), RoundClock(), 0
    for server_round in range(1, workload.rounds + 1):
        total = [torch.zeros_like(t) for t in global_weights]
        examples = 0
        for client in workload.cohort(server_round):
            with torch.no_grad():
                for tensor, weights in zip(state.values(), global_weights):
                    tensor.copy_(weights)
            idx = stream.train_indices(server_round, client)
            x, y = torch.from_numpy(stream.x_train[idx]), torch.from_numpy(stream.y_train[idx])
            generator = torch_generator(run.seed, Purpose.CLIENT_TRAIN, server_round, client)
            result = method.train(model, x, y, TrainContext(server_round, client, {}, generator, run.client.lr))
            with torch.no_grad():
                for accumulated, tensor in zip(total, state.values()):
                    accumulated.add_(tensor, alpha=result.num_examples)
            examples += result.num_examples
        samples += examples * workload.epochs
        if examples:
            global_weights = [t / examples for t in total]
        clock.tick()
    with torch.no_grad():
        for tensor, weights in zip(state.values(), global_weights):
            tensor.copy_(weights)
    x_test, y_test = torch.from_numpy(stream.x_test), torch.from_numpy(stream.y_test)
    report(clock, evaluate(model, x_test, y_test, run.eval.batch_size)[1], samples)


if __name__ == "__main__":
    main(sys.argv[1])
