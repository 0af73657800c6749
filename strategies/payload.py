"""A strategy's payload: arrays and settings it adds to a round's train messages beside the global model.

A method whose server sends clients more than the global weights (SCAFFOLD's
control variate, TARGET's synthetic samples and teacher) calls
:func:`add_payload` on the messages its ``configure_train`` built. Every
message gets the same ArrayRecord (``simulator.protocol.PAYLOAD_ARRAYS``), so
the Grid ships it once per actor per round however many clients share it, and
counts it once per client in ``downlink_mb``, as a real federation would move
it. The client's method reads the arrays as ``context.payload`` (by name, on its
device) and the settings in ``context.config``.
"""

from __future__ import annotations

from collections.abc import Iterable, Mapping

import numpy as np
from flwr.app import ConfigRecord, Message, RecordDict

from simulator.held_array import held_array_record
from simulator.protocol import PAYLOAD_ARRAYS

PAYLOAD_CONFIG = "payload-config"  # the ConfigRecord of a payload's settings (every ConfigRecord reaches the client)


def add_payload(
    messages: Iterable[Message], arrays: Mapping[str, np.ndarray], config: Mapping[str, int | float | str] | None = None
) -> list[Message]:
    """``messages`` with ``arrays`` (one shared record) and ``config`` added to each; their other records kept.

    Each message gets a content of its own (Flower's strategies give all of a round's messages one), so a
    strategy may call this per message with a payload per client. A ValueError where a setting would
    replace one the message's config already holds (``lr``, ``train-only``)."""
    record = held_array_record(list(arrays), [np.require(array, requirements="C") for array in arrays.values()])
    settings = ConfigRecord(dict(config or {}))
    messages = list(messages)
    for message in messages:
        taken = {key for other in message.content.config_records.values() for key in other} & set(settings)
        if taken:
            raise ValueError(f"add_payload: the message's config already holds {sorted(taken)}; name them apart")
        content = RecordDict(dict(message.content))
        content[PAYLOAD_ARRAYS] = record
        if config:
            content[PAYLOAD_CONFIG] = settings
        message.content = content
    return messages
