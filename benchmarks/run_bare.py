"""The floor: one process, one model reused, no framework: ``python benchmarks/run_bare.py WORKLOAD``.

The same data, partition, cohorts, initial weights and client method as the
other implementations, with FedAvg written as a running weighted sum. Client
states live in plain dicts by client id and go through the task lifecycle the
engine applies (:class:`ClientMemory`). One torch thread, like one client
actor with one CPU. What the worker does to a batch it does too: ``data.augment``
from the same (seed, round, client) generator, ``engine.amp``'s autocast,
``engine.channels_last``'s memory layout.
"""

from __future__ import annotations

import sys
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

import numpy as np
import torch

from benchmarks.workloads import WORKLOADS, RoundClock, report, save_weights, shared_data
from clients import METHODS
from clients.augment import AUGMENTATIONS
from clients.base import Batch, ReadOnlyState, TrainContext
from clients.models import (
    build_model,
    evaluate,
)
from simulator.config import NO_AUGMENTATION, ExperimentConfig
from simulator.jobs import task_change
from simulator.protocol import ClientState
from simulator.seeding import Purpose, torch_generator
from simulator.streams import Stream
from simulator.worker import WorkerData


def as_tensor(array: np.ndarray | None) -> torch.Tensor | None:
    return None if array is None else torch.from_numpy(array)


@dataclass
class ClientMemory:
    """What the engine keeps per client, in plain dicts: its state and the last round it trained in."""

    config: ExperimentConfig
    stream: Stream
    states: dict[int, ClientState] = field(default_factory=dict)
    last_round: dict[int, int] = field(default_factory=dict)
    task_masks: np.ndarray | None = field(init=False)

    def __post_init__(self) -> None:
        self.task_masks = WorkerData.of(self.stream).task_masks

    def inputs(self, array: np.ndarray) -> torch.Tensor:
        """Model inputs, channels-last where ``engine.channels_last`` asks: ``ClientWorker._inputs``."""
        x = torch.from_numpy(array)
        return x.contiguous(memory_format=torch.channels_last) if self.config.engine.channels_last else x

    def samples(self, indices: np.ndarray, task: np.ndarray | int) -> Batch:
        """Stored training samples by index, masked as their task(s) are: ``ClientWorker._samples``."""
        masks = self.task_masks
        return Batch(
            self.inputs(self.stream.x_train[indices]),
            as_tensor(self.stream.y_train[indices]),
            None if masks is None else as_tensor(masks[task]),
        )

    def context(self, server_round: int, client: int) -> TrainContext:
        """The context the engine's worker would build for ``client`` in ``server_round``."""
        task = self.stream.client_task(server_round, client)
        new_task, previous = task_change(self.stream, client, task, self.last_round.get(client))
        augment = self.config.data.augment
        return TrainContext(
            server_round,
            client,
            {},
            torch_generator(self.config.seed, Purpose.CLIENT_TRAIN, server_round, client),
            self.config.client.lr,
            task=task,
            state=ReadOnlyState(self.states.get(client, {})),
            samples=self.samples,
            new_task=new_task,
            previous=previous,
            class_mask=as_tensor(self.stream.class_mask(server_round, client)),
            augment=None
            if augment == NO_AUGMENTATION
            else augmentation(augment, self.config.seed, server_round, client),
            autocast=torch.bfloat16 if self.config.engine.amp == "bf16" else None,
        )

    def keep(self, context: TrainContext, state: ClientState) -> None:
        """Store the state the client's training returned."""
        self.states[context.client_id] = dict(state)
        self.last_round[context.client_id] = context.server_round


def augmentation(name: str, seed: int, server_round: int, client: int) -> Callable[[torch.Tensor], torch.Tensor]:
    """``data.augment`` drawing from the client's generator for the round: ``ClientWorker._augmentation``."""
    augment, generator = AUGMENTATIONS.resolve(name), torch_generator(seed, Purpose.AUGMENT, server_round, client)
    return lambda x: augment(x, generator)


def load(state: dict[str, torch.Tensor], weights: list[torch.Tensor]) -> None:
    """The global weights into the model's tensors; integer ones (batch norm's counter) rounded to the
    nearest, as FedStream's engine rounds what a strategy returns (``simulator/strategy_calls.py``):
    copying 9.999999 into an integer tensor would truncate it to 9."""
    with torch.no_grad():
        for tensor, weight in zip(state.values(), weights):
            tensor.copy_(weight if tensor.is_floating_point() else weight.round())


def fedavg(trained: list[tuple[list[torch.Tensor], int]]) -> list[torch.Tensor]:
    """The sample-weighted mean with Flower's FedAvg arithmetic (``aggregate_arrayrecords``): each
    client's float32 weights times its share, summed in reply order. Training amplifies a last-bit
    difference of the sum (another order, weighting then dividing) to 1e-2 over A's rounds."""
    total = sum(n for _, n in trained)
    aggregated: list[torch.Tensor] = []
    for tensors, n in trained:
        share = n / total
        if not aggregated:
            aggregated = [t * share for t in tensors]
        else:
            for mean, tensor in zip(aggregated, tensors):
                mean += tensor * share
    return aggregated


def main(name: str) -> None:
    torch.set_num_threads(1)
    workload = WORKLOADS[name]
    config, stream = shared_data(workload)
    model = build_model(
        stream.x_train.shape[1:], stream.num_classes, config.model, torch_generator(config.seed, Purpose.MODEL_INIT)
    )
    if config.engine.channels_last:
        model = model.to(memory_format=torch.channels_last)
    state = model.state_dict()
    global_weights = [t.clone() for t in state.values()]
    method, clock, samples = METHODS.resolve(config.client.method)(config.client), RoundClock(), 0
    memory = ClientMemory(config, stream)
    for server_round in range(1, workload.rounds + 1):
        trained: list[tuple[list[torch.Tensor], int]] = []
        for client in workload.cohort(server_round):
            load(state, global_weights)
            idx = stream.train_indices(server_round, client)
            x, y = memory.inputs(stream.x_train[idx]), torch.from_numpy(stream.y_train[idx])
            context = memory.context(server_round, client)
            result = method.train(model, x, y, context)
            memory.keep(context, result.state)
            trained.append(([t.detach().clone() for t in state.values()], result.num_examples))
        samples += sum(n for _, n in trained) * workload.epochs
        if trained:
            global_weights = fedavg(trained)
        clock.tick()
    load(state, global_weights)
    save_weights([t.numpy() for t in global_weights])
    x_test, y_test = torch.from_numpy(stream.x_test), torch.from_numpy(stream.y_test)
    report(clock, evaluate(model, x_test, y_test, config.eval.batch_size)[1], samples)


if __name__ == "__main__":
    main(sys.argv[1])
