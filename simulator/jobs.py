"""A client's job for a round, as the stream and the state store make it, and its new state kept.

The Grid (``simulator/grid.py``) turns Flower messages into calls of
:meth:`JobPlanner.job`: which samples the client holds this round (training
data for training and queries, a test sample drawn like its data for
evaluation), its live task, whether it starts a new task and which one it left
(:func:`task_change`), and which state travels with it: the cohort's to
training, a queried client's to its query (without making it recently used, so
queries never change which states spill), and to evaluation only where the
method keeps personal layers. Once the backend
returns, :meth:`JobPlanner.keep_states` writes the trained clients' new states
back to the store.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

import numpy as np

from simulator.client_state import ClientStateStore
from simulator.protocol import EVALUATE, QUERY, TRAIN, ClientJob, ClientOutcome, Payload, PreviousTask
from simulator.streams.base import Stream


def task_change(stream: Stream, client: int, task: int, last_round: int | None) -> tuple[bool, PreviousTask | None]:
    """Whether ``client`` trains on ``task`` for the first time, and the task it left, if any.

    ``last_round`` is the last round the client trained in (None: never). The
    task it left is that round's, and its data is what it trained on in that
    round: all of a class-incremental or domain task's share, the last draw of
    a label-shift period. The engine's Grid and the benchmark's bare loop share this rule.
    """
    if last_round is None:
        return True, None
    left = stream.client_task(last_round, client)
    if left == task:
        return False, None
    return True, PreviousTask(left, stream.train_indices(last_round, client))


class JobPlanner:
    """Makes each client's job from the stream and the state store; keeps what the jobs return."""

    def __init__(self, stream: Stream, states: ClientStateStore, client_test_size: int, personal: bool) -> None:
        self.stream = stream
        self.states = states
        self.client_test_size = client_test_size
        self.personal = personal  # the method keeps personal layers: evaluation needs the state too

    def job(
        self,
        kind: str,
        client: int,
        server_round: int,
        weights_index: int,
        config: dict[str, Any],
        query_arrays: dict[str, np.ndarray],
        payload: Payload | None = None,
    ) -> ClientJob:
        """Client ``client``'s job of ``kind`` in ``server_round``, on the call's weights ``weights_index``."""
        stream = self.stream
        task = stream.client_task(server_round, client)
        new_task, previous = False, None
        if kind == EVALUATE:
            indices = stream.client_test_indices(server_round, client, self.client_test_size)
        else:  # training, and queries on the data the client trains on this round: at a task end, the task's
            indices = stream.train_indices(server_round, client)
        if kind == TRAIN:
            new_task, previous = task_change(stream, client, task, self.states.last_round(client))
        travels = kind in (TRAIN, QUERY) or self.personal
        state = self.states.get(client, use=kind != QUERY) if travels else {}
        return ClientJob(
            client_id=client,
            kind=kind,
            server_round=server_round,
            weights_index=weights_index,
            indices=indices,
            task=task,
            class_mask=stream.class_mask(server_round, client),
            config=config,
            state=state,
            new_task=new_task,
            previous=previous,
            query_arrays=query_arrays,
            payload=payload,
        )

    def keep_states(self, jobs: Sequence[ClientJob], outcomes: Sequence[ClientOutcome]) -> None:
        """Store the new state of every client that returned one, its reply finite."""
        for job, outcome in zip(jobs, outcomes):
            if outcome.state is not None and outcome.finite:
                self.states.put(job.client_id, job.server_round, outcome.state)
