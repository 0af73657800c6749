"""Streams: how the data a client trains on changes over rounds, task by task.

``STREAMS`` ships the kinds ``stream.kind`` names; a user's stream is the dotted
path of a :class:`Stream` subclass, with its settings under ``stream.<section>``.
A new stream is one new file plus one line here.
"""

from __future__ import annotations

from simulator.config import ExperimentConfig
from simulator.data import Dataset
from simulator.registry import Registry
from simulator.streams.base import Stream
from simulator.streams.class_incremental import ClassIncrementalStream
from simulator.streams.domain import PermutedStream, RotatedStream
from simulator.streams.label_shift import LabelShiftStream
from simulator.streams.static import StaticStream

STREAMS: Registry[type[Stream]] = Registry(
    "stream",
    "stream.kind",
    {
        "static": StaticStream,
        "class_incremental": ClassIncrementalStream,
        "permuted": PermutedStream,
        "rotated": RotatedStream,
        "label_shift": LabelShiftStream,
    },
    "a simulator.streams.Stream subclass",
    lambda plugin: isinstance(plugin, type) and issubclass(plugin, Stream),
)


def build_stream(config: ExperimentConfig, dataset: Dataset) -> Stream:
    """The stream ``stream.kind`` names, over ``dataset``."""
    return STREAMS.resolve(config.stream.kind)(config, dataset)


__all__ = ["STREAMS", "Stream", "build_stream"]
