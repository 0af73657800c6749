"""Asking clients for statistics at a task end: the server side of ``MessageType.QUERY``.

A strategy that implements ``on_task_end(task, arrays, grid)`` (see
``simulator.engine``) may call :func:`ask_clients` there: one query message to
each present client with the global arrays, the query's name and the
strategy's own arrays for it; the clients' methods answer (``clients/queries.py``).
"""

from __future__ import annotations

import numpy as np
from flwr.app import ArrayRecord, ConfigRecord, Message, MessageType, RecordDict
from flwr.serverapp import Grid

from clients.queries import QUERY_NAME
from simulator.grid import GLOBAL_ARRAYS, QUERY_ARRAYS
from simulator.held_array import held_array_record


def ask_clients(
    grid: Grid, arrays: ArrayRecord, query: str, query_arrays: dict[str, np.ndarray] | None = None
) -> list[dict[str, np.ndarray]]:
    """Each present client's answer to ``query`` on the global ``arrays``, in client order."""
    content = RecordDict({GLOBAL_ARRAYS: arrays, "config": ConfigRecord({QUERY_NAME: query})})
    if query_arrays:
        content[QUERY_ARRAYS] = held_array_record(list(query_arrays), [np.ascontiguousarray(v) for v in query_arrays.values()])
    messages = [Message(content=content, dst_node_id=node, message_type=MessageType.QUERY)
                for node in sorted(grid.get_node_ids())]
    answers = []
    for reply in grid.send_and_receive(messages):
        if reply.has_error():
            raise RuntimeError(f"query {query!r}: client {reply.metadata.src_node_id} failed: {reply.error}")
        record = reply.content["arrays"]
        answers.append(dict(zip(record.keys(), record.to_numpy_ndarrays())))
    return answers
