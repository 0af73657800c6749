"""Streams: how the data a client trains on changes over rounds, task by task.

``STREAMS`` maps ``stream.kind`` to its class; a new stream is one new file
plus one line here.
"""

from __future__ import annotations

from simulator.config import ConfigError, RunConfig
from simulator.data import Dataset
from simulator.streams.base import Stream
from simulator.streams.class_incremental import ClassIncrementalStream
from simulator.streams.domain import PermutedStream, RotatedStream
from simulator.streams.label_shift import LabelShiftStream
from simulator.streams.static import StaticStream

STREAMS: dict[str, type[Stream]] = {
    "static": StaticStream,
    "class_incremental": ClassIncrementalStream,
    "permuted": PermutedStream,
    "rotated": RotatedStream,
    "label_shift": LabelShiftStream,
}


def build_stream(run: RunConfig, dataset: Dataset) -> Stream:
    """The stream ``stream.kind`` names, over ``dataset``."""
    if run.stream.kind not in STREAMS:
        raise ConfigError(f"stream.kind = {run.stream.kind!r}: unknown stream; valid: {', '.join(STREAMS)}")
    return STREAMS[run.stream.kind](run, dataset)


__all__ = ["STREAMS", "Stream", "build_stream"]
