"""Flower's ``Grid`` over our backends, so any Flower strategy runs unchanged.

Node ``c`` is client ``c``; the nodes are the clients the stream has present
this round. :meth:`SimulationGrid.send_and_receive` reads each message's
records (``simulator.protocol`` names them), has ``simulator.jobs`` plan each
client's job, runs them all in one backend call (each distinct ArrayRecord is
converted once, however many messages share it), stops the run on a failed or
diverged client, has the trained clients' states kept, and wraps the outcomes
as Flower reply messages in the order the messages came. Nothing waits or
polls: replies exist as soon as the call returns. It also counts the bytes the
messages carry (:class:`Traffic`).
"""

from __future__ import annotations

import contextlib
import itertools
import logging
from collections.abc import Iterable, Iterator
from dataclasses import dataclass
from typing import Any

import numpy as np
from flwr.app import ArrayRecord, Message, MessageType, MetricRecord, RecordDict
from flwr.serverapp import Grid
from flwr.supercore.run import Run

from simulator.backends import Backend, ClientFailure
from simulator.client_state import ClientStateStore
from simulator.held_array import held_array_record
from simulator.jobs import JobPlanner
from simulator.protocol import (
    EVALUATE,
    GLOBAL_ARRAYS,
    NUM_EXAMPLES,
    NUM_TASKS,
    PAYLOAD_ARRAYS,
    QUERY,
    REPLY_ARRAYS,
    REPLY_METRICS,
    TRAIN,
    ClientJob,
    ClientOutcome,
    Payload,
)
from simulator.run_dir import MB
from simulator.running_statistics import RunningStatistics
from simulator.streams import Stream

_KINDS = {MessageType.TRAIN: TRAIN, MessageType.EVALUATE: EVALUATE, MessageType.QUERY: QUERY}
EMPTY_CLIENTS = "empty_clients"  # train metric: the round's clients with no training samples
log = logging.getLogger("fedstream")


@dataclass(frozen=True)
class Traffic:
    """Bytes the server has sent to clients (downlink) and received from them (uplink) so far.

    What a real federation would move for the same messages: every message counts once
    per client it goes to, though a backend ships one copy of the weights per actor, and
    every reply counts, one left out as non-finite too (it arrived). A message's bytes are
    the ``nbytes`` of the arrays it carries: its ArrayRecords (the model, or only the shared
    part where a method keeps personal layers, and a query's own arrays) and a reply's
    (trained weights, a query's answer: sketches, class statistics). Neither the ``.npy``
    headers Flower's serialization adds nor the config and metric records (a few scalars
    per message) count: the numbers are the payload, exactly, and cost no serialization.
    """

    uplink_bytes: int = 0
    downlink_bytes: int = 0

    def plus(self, uplink_bytes: int, downlink_bytes: int) -> Traffic:
        return Traffic(self.uplink_bytes + uplink_bytes, self.downlink_bytes + downlink_bytes)

    def megabytes(self) -> dict[str, float]:
        """The totals as ``uplink_mb`` and ``downlink_mb``: MiB (2**20 bytes), unrounded (exact floats)."""
        return {"uplink_mb": self.uplink_bytes / MB, "downlink_mb": self.downlink_bytes / MB}


class SimulationGrid(Grid):
    """A Grid whose nodes are simulated clients run by a :class:`Backend`."""

    def __init__(
        self,
        backend: Backend,
        stream: Stream,
        states: ClientStateStore,
        client_test_size: int,
        run_id: int,
        on_nonfinite: str = "fail",
        nonfinite_dropped: int = 0,
        personal: bool = False,
        traffic: Traffic = Traffic(),
        statistics: RunningStatistics | None = None,
    ) -> None:
        self.backend = backend
        self.stream = stream
        self.jobs = JobPlanner(stream, states, client_test_size, personal)
        self.on_nonfinite = on_nonfinite  # fail | drop: what a client's NaN/inf loss or weights do
        self.nonfinite_dropped = nonfinite_dropped  # replies left out so far (on_nonfinite = drop)
        self.warned_empty = False  # the run was told once that clients with no samples weigh 0
        self.traffic = traffic  # bytes sent and received so far (a resumed run's included)
        # The model's buffers, added to messages and kept out of replies (none: a model without buffers).
        self.statistics = RunningStatistics([], []) if statistics is None else statistics
        self._run = Run.create_empty(run_id)
        self._run.override_config[NUM_TASKS] = stream.num_tasks  # a strategy can tell the last task's end
        self._ids = itertools.count()
        self._replies: dict[str, Message] = {}
        self.server_round = 1  # the round whose clients the nodes are: see round()

    @contextlib.contextmanager
    def round(self, server_round: int) -> Iterator[None]:
        """Messages inside are of ``server_round``: its present clients are the nodes, its data theirs."""
        previous, self.server_round = self.server_round, server_round
        try:
            yield
        finally:
            self.server_round = previous

    def set_run(self, run: Run) -> None:
        self._run = run

    @property
    def run(self) -> Run:
        return self._run

    def create_message(
        self,
        content: RecordDict,
        message_type: str,
        dst_node_id: int,
        group_id: str,
        ttl: float | None = None,
    ) -> Message:
        return Message(
            content=content,
            message_type=message_type,
            dst_node_id=dst_node_id,
            group_id=group_id,
            ttl=ttl,
        )

    def get_node_ids(self) -> Iterable[int]:
        return self.stream.available_clients(self.server_round)

    def push_messages(self, messages: Iterable[Message]) -> Iterable[str]:
        messages = list(messages)
        for message, reply in zip(messages, self._execute(messages)):
            if reply is not None:
                self._replies[message.metadata.message_id] = reply
        return [message.metadata.message_id for message in messages]

    def pull_messages(self, message_ids: Iterable[str]) -> Iterable[Message]:
        return [self._replies.pop(i) for i in message_ids if i in self._replies]

    def send_and_receive(self, messages: Iterable[Message], *, timeout: float | None = None) -> Iterable[Message]:
        """Run every message's client now; ``timeout`` has nothing to wait for."""
        return [reply for reply in self._execute(list(messages)) if reply is not None]

    def _execute(self, messages: list[Message]) -> list[Message | None]:
        """The replies in message order; None for a reply left out as non-finite."""
        if not messages:
            return []
        records: list[ArrayRecord] = []  # the distinct models and payloads of the messages, each converted once
        present = set(self.stream.available_clients(self.server_round))
        jobs = []
        for message in messages:
            _stamp(message, f"m{next(self._ids)}")
            jobs.append(self._job(message, records, present))
        empty = self._empty_clients(jobs)
        payloads = {job.payload.index for job in jobs if job.payload is not None}
        weights = [
            record.to_numpy_ndarrays() if i in payloads else self.statistics.full_weights(record)
            for i, record in enumerate(records)
        ]
        outcomes = self.backend.execute(jobs, weights)
        self.traffic = self.traffic.plus(
            uplink_bytes=sum(_nbytes(outcome.arrays or ()) for outcome in outcomes),
            downlink_bytes=sum(
                _nbytes(weights[job.weights_index])
                + _nbytes(job.query_arrays.values())
                + (_nbytes(weights[job.payload.index]) if job.payload is not None else 0)
                for job in jobs
            ),
        )
        failed = next((o for o in outcomes if o.error is not None), None)
        if failed is not None:
            raise ClientFailure(f"client {failed.client_id} failed in round {self.server_round}:\n{failed.error}")
        diverged = [o.client_id for o in outcomes if not o.finite]
        if diverged and self.on_nonfinite == "fail":
            raise ClientFailure(
                f"round {self.server_round}: clients {diverged} returned a non-finite loss or weights "
                "(training diverged); engine.on_nonfinite=drop leaves such replies out of aggregation"
            )
        if len(diverged) == len(outcomes) and jobs[0].kind == TRAIN:
            raise ClientFailure(
                f"round {self.server_round}: every client ({diverged}) returned a non-finite loss or weights; "
                "nothing is left to aggregate"
            )
        self.nonfinite_dropped += len(diverged)
        self.jobs.keep_states(jobs, outcomes)
        if empty:  # on every train reply: Flower aggregates only keys all replies have; the empty weigh 0
            for job, outcome in zip(jobs, outcomes):
                if job.kind == TRAIN:
                    outcome.metrics[EMPTY_CLIENTS] = float(len(empty))
        return [
            self._reply(message, job, outcome, list(records[job.weights_index].keys())) if outcome.finite else None
            for message, job, outcome in zip(messages, jobs, outcomes)
        ]

    def _empty_clients(self, jobs: list[ClientJob]) -> list[int]:
        """The clients of ``jobs`` with no training samples this round; fails where every one has none.

        Such a client trains nothing and replies with the global weights and ``num-examples`` 0,
        which a weighting strategy (FedAvg and its kin) gives weight 0. A round of only such clients
        leaves nothing to weigh: Flower's aggregation would divide by zero.
        """
        train = [job for job in jobs if job.kind == TRAIN]
        empty = [job.client_id for job in train if len(job.indices) == 0]
        if empty and len(empty) == len(train):
            raise ClientFailure(
                f"round {train[0].server_round}: no sampled client ({empty}) has training samples this "
                "round; nothing is left to aggregate (sample more clients per round, or give every client "
                "data, e.g. data.partition.min_size >= 1)"
            )
        if empty and not self.warned_empty:
            self.warned_empty = True
            log.warning(
                "round %d: clients %s have no training samples: they train nothing and weigh 0 in a weighted "
                "aggregation; train/%s counts such clients per round",
                train[0].server_round,
                empty,
                EMPTY_CLIENTS,
            )
        return empty

    def _job(self, message: Message, records: list[ArrayRecord], present: set[int]) -> ClientJob:
        """The job for ``message``; its model's ArrayRecord, and its payload's, join ``records`` unless already
        there (a strategy gives every client the same objects: each is shipped once per actor)."""
        kind = _KINDS.get(message.metadata.message_type)
        if kind is None:
            raise ValueError(f"unsupported message type {message.metadata.message_type!r}")
        client = message.metadata.dst_node_id
        if client not in present:
            raise ValueError(f"message to node {client}, not a client present in round {self.server_round}")
        content = message.content
        records_in = dict(content.array_records)
        payload = records_in.pop(PAYLOAD_ARRAYS, None)
        if payload is not None and kind != TRAIN:
            raise ValueError(
                f"a {message.metadata.message_type} message carries a {PAYLOAD_ARRAYS!r} record: a payload goes "
                "with train messages (a query's own arrays are its other ArrayRecords)"
            )
        if len(records_in) > 1 and GLOBAL_ARRAYS not in records_in:
            raise ValueError(
                f"a message with several ArrayRecords ({', '.join(records_in)}) must name the model's {GLOBAL_ARRAYS!r}"
            )
        arrays = records_in.pop(GLOBAL_ARRAYS) if len(records_in) > 1 else records_in.popitem()[1]
        query_arrays = {k: v for record in records_in.values() for k, v in zip(record, record.to_numpy_ndarrays())}
        config: dict[str, Any] = {}
        for record in content.config_records.values():
            config.update(record)
        index = _position(arrays, records)
        sent = None if payload is None else Payload(_position(payload, records), tuple(payload.keys()))
        return self.jobs.job(kind, client, self.server_round, index, config, query_arrays, sent)

    def _reply(self, message: Message, job: ClientJob, outcome: ClientOutcome, keys: list[str]) -> Message:
        content = RecordDict({REPLY_METRICS: MetricRecord(outcome.metrics)})
        if outcome.arrays is not None:  # the weights as the message's, or a query's named answer
            names, arrays = keys if outcome.array_names is None else outcome.array_names, outcome.arrays
            if self.statistics and outcome.array_names is None:  # trained weights: the buffers stay here
                examples = outcome.metrics[NUM_EXAMPLES] if job.kind == TRAIN else None
                names, arrays = self.statistics.reply_arrays(arrays, examples)
            content[REPLY_ARRAYS] = held_array_record(names, arrays)
        reply = Message(content, reply_to=message)
        _stamp(reply, f"r{message.metadata.message_id}")
        return reply


def _position(record: ArrayRecord, records: list[ArrayRecord]) -> int:
    """Where ``record`` (this very object) is in ``records``, appended if it is not there yet."""
    index = next((i for i, r in enumerate(records) if r is record), len(records))
    if index == len(records):
        records.append(record)
    return index


def _nbytes(arrays: Iterable[np.ndarray]) -> int:
    return sum(array.nbytes for array in arrays)


def _stamp(message: Message, message_id: str) -> None:
    """Give ``message`` the id a SuperLink would: Flower's metadata has no setter for it, and its
    own link state writes it just so (``flwr/server/superlink/linkstate/utils.py``). Replies name
    their message by it (``reply_to_message_id``), which is how push/pull users match them."""
    message.metadata.__dict__["_message_id"] = message_id
