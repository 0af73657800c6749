"""Asking clients for statistics at a task end: the server side of ``MessageType.QUERY``.

A strategy that implements ``on_task_end(task, arrays, grid)``
(``simulator.protocol.TaskEndStrategy``) may call :func:`ask_clients` there:
one query message to each present client with the global arrays, the query's
name and the strategy's own arrays for it; the clients' methods answer
(``clients/queries.py``). It needs only Flower's ``Grid`` interface and the
wire protocol, so importing a strategy loads neither the engine nor torch.
"""

from __future__ import annotations

import numpy as np
from flwr.app import ArrayRecord, ConfigRecord, Message, MessageType, RecordDict
from flwr.serverapp import Grid

from simulator.held_array import held_array_record
from simulator.protocol import GLOBAL_ARRAYS, QUERY_ARRAYS, QUERY_NAME, QUERY_SAMPLES, REPLY_ARRAYS


def ask_clients(
    grid: Grid,
    arrays: ArrayRecord,
    query: str,
    query_arrays: dict[str, np.ndarray] | None = None,
    max_samples: int | None = None,
) -> list[dict[str, np.ndarray]]:
    """Each present client's answer to ``query`` on the global ``arrays``: one dict of named arrays per
    client present in the round, in ascending client id.

    ``query``: a shipped query's name (``simulator.protocol`` lists them and their answers' keys) or the
    dotted path of a user's handler; ``query_arrays``: the strategy's own arrays, which the handler gets
    as ``query.arrays``; ``max_samples``: each client answers on at most this many of its samples, a subset
    drawn from (seed, round, client), the same for every query of the round. A client's failure fails the run, naming it (the Grid raises); a reply with an
    error raises here.
    """
    if max_samples is not None and (
        isinstance(max_samples, bool) or not isinstance(max_samples, int) or max_samples < 1
    ):
        raise ValueError(f"ask_clients(max_samples={max_samples!r}): expected a whole number >= 1, or None for all")
    config = {QUERY_NAME: query} if max_samples is None else {QUERY_NAME: query, QUERY_SAMPLES: max_samples}
    content = RecordDict({GLOBAL_ARRAYS: arrays, "config": ConfigRecord(config)})
    if query_arrays:
        content[QUERY_ARRAYS] = held_array_record(
            list(query_arrays), [np.require(v, requirements="C") for v in query_arrays.values()]
        )
    messages = [
        Message(content=content, dst_node_id=node, message_type=MessageType.QUERY)
        for node in sorted(grid.get_node_ids())
    ]
    answers = []
    for reply in grid.send_and_receive(messages):
        if reply.has_error():
            raise RuntimeError(f"query {query!r}: client {reply.metadata.src_node_id} failed: {reply.error}")
        record = reply.content[REPLY_ARRAYS]
        answers.append(dict(zip(record.keys(), record.to_numpy_ndarrays())))
    return answers
