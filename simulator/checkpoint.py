"""Checkpoints: everything needed to continue a run exactly where it stopped.

A checkpoint holds the global weights, the strategy object itself (adaptive
optimizers and DP accountants keep state between rounds), the client states
(the names of their files, written at each checkpoint) and the round.
Every other random draw is derived from the seed and the round, so nothing
more is needed for a resumed run to match an uninterrupted one. Writes are atomic: a
crash while saving leaves the previous checkpoint intact.
"""

from __future__ import annotations

import os
import pickle
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from flwr.app import ArrayRecord
from flwr.serverapp.strategy import Strategy

from simulator.client_state import StoreSnapshot
from simulator.config import ConfigError

CHECKPOINT_FILE = "last.pkl"


@dataclass(frozen=True)
class Checkpoint:
    """The state of a run after ``round`` finished."""

    round: int
    arrays: ArrayRecord
    strategy: Strategy
    client_states: StoreSnapshot
    wall_s: float  # run time so far, so resumed timings continue
    config: dict[str, Any]  # the run config, to refuse resuming a different run
    num_tasks: int  # the stream's tasks: more rounds must not change them (label shift)


def save(directory: Path, checkpoint: Checkpoint) -> None:
    """Write ``checkpoint`` to ``directory/last.pkl`` atomically."""
    directory.mkdir(parents=True, exist_ok=True)
    temporary = directory / f".{CHECKPOINT_FILE}.tmp"
    with temporary.open("wb") as file:
        pickle.dump(checkpoint, file, protocol=pickle.HIGHEST_PROTOCOL)
    os.replace(temporary, directory / CHECKPOINT_FILE)


def load(directory: Path) -> Checkpoint:
    """Read the checkpoint in ``directory``; a ConfigError names the file if there is none."""
    path = directory / CHECKPOINT_FILE
    if not path.exists():
        raise ConfigError(f"resume = true: there is no checkpoint at {path}")
    with path.open("rb") as file:
        return pickle.load(file)
