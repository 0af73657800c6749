"""When a client starts a new task: the rule the engine's Grid and the benchmark's bare loop share."""

from __future__ import annotations

from clients.base import PreviousTask
from simulator.streams.base import Stream


def task_change(
    stream: Stream, client: int, task: int, last_round: int | None
) -> tuple[bool, PreviousTask | None]:
    """Whether ``client`` trains on ``task`` for the first time, and the task it left, if any.

    ``last_round`` is the last round the client trained in (None: never). The
    task it left is that round's, and its data is what it trained on in that
    round: all of a class-incremental or domain task's share, the last draw of
    a label-shift period.
    """
    if last_round is None:
        return True, None
    left = stream.client_task(last_round, client)
    if left == task:
        return False, None
    return True, PreviousTask(left, stream.train_indices(last_round, client))
