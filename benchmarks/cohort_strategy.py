"""FedAvg on the workload's fixed cohorts, timing each round: run by FedStream and by Flower.

Every train message names the partition its node trains (``partition-id`` in
its config), so Flower's simulation, whose node ids are random, trains exactly
the clients FedStream trains. The strategy counts the samples the replies
report and stamps the end of every round.
"""

from __future__ import annotations

from collections.abc import Iterable

from flwr.app import ArrayRecord, ConfigRecord, Message, MessageType, MetricRecord, RecordDict
from flwr.serverapp import Grid
from flwr.serverapp.strategy import FedAvg

from benchmarks.workloads import WORKLOADS, RoundClock
from simulator.hooks import Hook, RoundView
from simulator.protocol import NUM_EXAMPLES, SERVER_ROUND

PARTITION_ID = "partition-id"


class FixedCohortFedAvg(FedAvg):
    """FedAvg whose round r trains ``WORKLOADS[workload].cohort(r)``.

    ``by_partition``: send to any nodes, naming the partition in the config
    (Flower); otherwise node c is client c (FedStream).
    """

    def __init__(self, workload: str, by_partition: bool = False, epochs: int = 1, **fedavg: object) -> None:
        super().__init__(**fedavg)  # type: ignore[arg-type]
        self.workload = WORKLOADS[workload]
        self.by_partition = by_partition
        self.epochs = epochs
        self.clock = RoundClock()
        self.samples = 0
        self.final: ArrayRecord | None = None  # the last aggregate: the weights the benchmark compares

    def configure_train(
        self, server_round: int, arrays: ArrayRecord, config: ConfigRecord, grid: Grid
    ) -> Iterable[Message]:
        cohort = self.workload.cohort(server_round)
        nodes = sorted(grid.get_node_ids())[: len(cohort)] if self.by_partition else cohort
        messages = []
        for node, client in zip(nodes, cohort, strict=True):
            node_config = ConfigRecord({**config, SERVER_ROUND: server_round, PARTITION_ID: client})
            content = RecordDict({self.arrayrecord_key: arrays, self.configrecord_key: node_config})
            messages.append(Message(content=content, dst_node_id=node, message_type=MessageType.TRAIN))
        return messages

    def aggregate_train(
        self, server_round: int, replies: Iterable[Message]
    ) -> tuple[ArrayRecord | None, MetricRecord | None]:
        replies = list(replies)
        self.samples += self.epochs * sum(int(r.content["metrics"][NUM_EXAMPLES]) for r in replies if r.has_content())
        result = super().aggregate_train(server_round, replies)
        self.final = result[0] if result[0] is not None else self.final
        self.clock.tick()
        return result


class FinalGlobalWeights(Hook):
    """FedStream's global model after the last round, batch norm's buffers included (a strategy sees the
    parameters only): what the benchmark compares with the bare loop's. ``eval.hooks=[this class]``."""

    arrays: list = []  # the last run's, in the model's order

    def at_end(self, view: RoundView) -> dict:
        FinalGlobalWeights.arrays = view.arrays.to_numpy_ndarrays()
        return {}
