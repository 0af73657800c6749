"""Checkpoints: everything needed to continue a run exactly where it stopped, as data only.

A checkpoint holds the global weights, the strategy's state (adaptive
optimizers and continual strategies keep some between rounds), the client
states (the names of their files, written at each checkpoint), the round and
the evaluations so far (the accuracy matrix and summary are built from them).
Every other random draw is derived from the seed and the round, so nothing
more is needed for a resumed run to match an uninterrupted one.

Each checkpoint is a folder ``checkpoints/round-NNNNNN/``; the newest two are kept:

- ``arrays.npz``: the global arrays, in order;
- ``strategy.npz``: the arrays of the strategy's state, referenced from ``state.json``;
- ``state.json``: the format version, round, run time, config, number of tasks,
  bytes communicated, the strategy's state (``strategies.state``), the
  client-state snapshot and the evaluation records;
- ``manifest.json``: the format version, the sha256 of each file above and of
  each client-state file the snapshot names, and of itself; checked first.

Nothing is unpickled: a resume rebuilds the strategy from the validated config
and restores only its state, checked against the global arrays; every ``.npz``
is read with its sizes bounded before a byte is inflated (``plain_npz``). So a
checkpoint from someone else can change the numbers (weights, states: the
manifest is a checksum anyone can recompute), never the code that runs or the
configuration. :class:`Checkpoints` proves at every checkpoint that the saved
state restores the live strategy whole, so a strategy with state it does not
declare fails there, not at resume.

A folder is written under a temporary name and renamed whole, so a crash while
saving leaves the earlier checkpoints intact. Any damage is a ConfigError naming
the file; the previous checkpoint is kept, so the run can go back one checkpoint.
"""

from __future__ import annotations

import copy
import dataclasses
import hashlib
import json
import os
import re
import shutil
from collections import OrderedDict
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
from flwr.app import Array, ArrayRecord

from simulator.client_state import StoreSnapshot, check_state_files
from simulator.config import ConfigError, to_dict
from simulator.grid import Traffic
from simulator.hooks import Hook, RoundView, RunSetup
from simulator.plain_npz import read_npz, write_npz
from simulator.strategy_calls import StrategyFailure
from strategies.state import LayerState, lost_on_resume, restore_strategy_state, strategy_state

FORMAT = 2  # 1: the strategy pickled (strategy.pkl); 2: its state as data
CLIENT_STATE_DIR = "client_state"  # beside checkpoints/ in the run directory
ARRAYS, STRATEGY, STATE, MANIFEST = "arrays.npz", "strategy.npz", "state.json", "manifest.json"
KEPT = 2  # checkpoints kept: the last, and the previous in case the last is damaged
_FOLDER = re.compile(r"round-(\d+)")
_ARRAY_REFERENCE = "__array__"  # in state.json's strategy state: {"__array__": key in strategy.npz}


@dataclass(frozen=True)
class Checkpoint:
    """The state of a run after ``round`` finished."""

    round: int
    arrays: ArrayRecord
    strategy: list[LayerState]
    client_states: StoreSnapshot
    wall_s: float  # run time so far, so resumed timings continue
    config: dict[str, Any]  # the run config, to refuse resuming a different run
    num_tasks: int  # the stream's tasks: more rounds must not change them (label shift)
    records: list[dict[str, Any]]  # metrics.jsonl's records so far: resume rebuilds it from them
    nonfinite_dropped: int  # replies left out as non-finite so far (engine.on_nonfinite = drop)
    traffic: Traffic  # bytes sent and received so far: rounds since the last record count too


@dataclass(frozen=True)
class Start:
    """Where the rounds start: round 1 from the initial arrays, or after a checkpoint's round."""

    arrays: ArrayRecord
    round: int = 1
    wall_s: float = 0.0
    records: list[dict[str, Any]] = field(default_factory=list)
    client_states: StoreSnapshot | None = None
    nonfinite_dropped: int = 0
    traffic: Traffic = Traffic()

    @classmethod
    def after(cls, saved: Checkpoint) -> Start:
        """The round after ``saved``'s, with everything the run had by then."""
        return cls(
            saved.arrays,
            saved.round + 1,
            saved.wall_s,
            saved.records,
            saved.client_states,
            saved.nonfinite_dropped,
            saved.traffic,
        )


def save(directory: Path, checkpoint: Checkpoint) -> None:
    """Write ``checkpoint`` as ``directory/round-N/`` atomically; keep only the newest two."""
    directory.mkdir(parents=True, exist_ok=True)
    for leftover in directory.glob(".round-*.tmp"):  # a save killed midway
        shutil.rmtree(leftover)
    temporary = directory / f".{_folder_name(checkpoint.round)}.tmp"
    temporary.mkdir()
    write_npz(temporary / ARRAYS, {key: array.numpy() for key, array in checkpoint.arrays.items()})
    strategy_arrays: dict[str, np.ndarray] = {}
    layers = [
        {"path": layer.path, "class": layer.kind, "state": _encoded(layer.state, strategy_arrays, layer.path)}
        for layer in checkpoint.strategy
    ]
    write_npz(temporary / STRATEGY, strategy_arrays)
    (temporary / STATE).write_text(json.dumps(_plain(checkpoint, layers)))
    # A client-state file is written once and never changed, so its hash carries over.
    known = _known_state_hashes(directory)
    state_directory = directory.parent / CLIENT_STATE_DIR
    manifest = {
        "format": FORMAT,
        "files": {name: _sha256(temporary / name) for name in (ARRAYS, STRATEGY, STATE)},
        "client_state": {
            name: known.get(name) or _sha256(state_directory / name) for name in checkpoint.client_states.files.values()
        },
    }
    (temporary / MANIFEST).write_text(json.dumps({**manifest, "sha256": _digest(manifest)}, sort_keys=True))
    final = directory / _folder_name(checkpoint.round)
    shutil.rmtree(final, ignore_errors=True)  # a damaged one, left when the run resumed from an earlier one
    os.replace(temporary, final)
    for old in _checkpoints(directory)[:-KEPT]:
        shutil.rmtree(old)


def load(directory: Path) -> Checkpoint:
    """Read the newest checkpoint in ``directory``, checked.

    Any damage is a ConfigError naming the file and what failed, and how to go
    back to the previous checkpoint where one is kept.
    """
    found = _checkpoints(directory)
    if not found:
        raise ConfigError(f"resume = true: there is no checkpoint at {directory}")
    _check_format(found[-1])
    try:
        return _read(found[-1])
    except ConfigError as error:
        if len(found) == 1:
            raise ConfigError(f"resume = true: {error}; no earlier checkpoint is kept") from None
        try:
            _read(found[-2])
        except ConfigError as earlier:  # a client-state file both name, say
            raise ConfigError(f"resume = true: {error}; the previous checkpoint is damaged too: {earlier}") from None
        raise ConfigError(
            f"resume = true: {error}. The previous checkpoint ({found[-2].name}) is intact: remove or "
            f"rename {found[-1]} and resume again to continue from it"
        ) from None


def _read(folder: Path) -> Checkpoint:
    manifest = _read_manifest(folder)
    for name in (ARRAYS, STRATEGY, STATE):
        _verify(folder / name, manifest["files"].get(name))
    state_directory = folder.parent.parent / CLIENT_STATE_DIR
    for name, digest in manifest["client_state"].items():
        _verify(state_directory / name, digest)
    with _reading(folder / ARRAYS):
        arrays = ArrayRecord(array_dict=OrderedDict((key, Array(v)) for key, v in read_npz(folder / ARRAYS).items()))
    with _reading(folder / STRATEGY):
        strategy_arrays = read_npz(folder / STRATEGY)
    with _reading(folder / STATE):
        state = json.loads((folder / STATE).read_text())
        snapshot = StoreSnapshot(
            **{
                field: {int(client): value for client, value in state["client_states"][field].items()}
                for field in ("files", "last_round", "sizes")
            }
        )
        strategy = [
            LayerState(layer["path"], layer["class"], _decoded(layer["state"], strategy_arrays))
            for layer in state["strategy"]
        ]
        checkpoint = Checkpoint(
            round=state["round"],
            arrays=arrays,
            strategy=strategy,
            client_states=snapshot,
            wall_s=state["wall_s"],
            config=state["config"],
            num_tasks=state["num_tasks"],
            records=state["records"],
            nonfinite_dropped=state["nonfinite_dropped"],
            traffic=Traffic(**state["traffic"]),
        )
    problem = check_state_files(state_directory, snapshot)
    if problem:
        raise ConfigError(f"checkpoint file {problem}")
    return checkpoint


def restore_strategy(saved: Checkpoint, strategy: Any, where: Path, parameters: ArrayRecord) -> None:
    """Set the checkpoint's strategy state on ``strategy``, built from the config; a ConfigError if it does not
    fit (another strategy, or arrays of other shapes than the global ``parameters``', the saved arrays less
    batch norm's buffers, which strategies never see: simulator/running_statistics.py)."""
    try:
        restore_strategy_state(strategy, saved.strategy, parameters)
    except ValueError as error:
        file = where / _folder_name(saved.round) / STATE
        raise ConfigError(f"resume = true: the strategy state in {file} cannot be restored: {error}") from None


def _encoded(value: Any, arrays: dict[str, np.ndarray], where: str) -> Any:
    """``value`` (a strategy's state) as JSON, its arrays moved to ``arrays`` and referenced; a TypeError naming
    ``where`` (the state's path) for anything else."""
    if isinstance(value, (np.ndarray, np.generic)) and not isinstance(value, np.bool_):
        if value.dtype.hasobject:
            raise TypeError(f"{where}: an array of Python objects")
        key = f"a{len(arrays)}"
        arrays[key] = np.asarray(value)
        return {_ARRAY_REFERENCE: key}
    if isinstance(value, dict):
        if not all(isinstance(k, str) and k != _ARRAY_REFERENCE for k in value):
            raise TypeError(f"{where}: dict keys must be strings other than {_ARRAY_REFERENCE!r}")
        return {k: _encoded(v, arrays, f"{where}.{k}") for k, v in value.items()}
    if isinstance(value, (list, tuple)):
        return [_encoded(v, arrays, f"{where}[{i}]") for i, v in enumerate(value)]
    if value is None or isinstance(value, (bool, int, float, str, np.bool_)):
        return bool(value) if isinstance(value, np.bool_) else value
    raise TypeError(
        f"{where} is a {type(value).__name__}: a strategy's state holds JSON values and numpy arrays "
        "(simulator.protocol.StatefulStrategy)"
    )


def _decoded(value: Any, arrays: dict[str, np.ndarray]) -> Any:
    if isinstance(value, dict):
        if set(value) == {_ARRAY_REFERENCE}:
            return arrays[value[_ARRAY_REFERENCE]]
        return {k: _decoded(v, arrays) for k, v in value.items()}
    if isinstance(value, list):
        return [_decoded(v, arrays) for v in value]
    return value


def _plain(checkpoint: Checkpoint, strategy: list[dict[str, Any]]) -> dict[str, Any]:
    """``state.json``'s content: everything but the arrays."""
    snapshot = checkpoint.client_states
    return {
        "format": FORMAT,
        "round": checkpoint.round,
        "wall_s": checkpoint.wall_s,
        "config": checkpoint.config,
        "num_tasks": checkpoint.num_tasks,
        "records": checkpoint.records,
        "nonfinite_dropped": checkpoint.nonfinite_dropped,
        "traffic": dataclasses.asdict(checkpoint.traffic),
        "strategy": strategy,
        "client_states": {"files": snapshot.files, "last_round": snapshot.last_round, "sizes": snapshot.sizes},
    }


def _check_format(folder: Path) -> None:
    """Refuse a checkpoint of another format, saying which; before its hashes, which an old one cannot pass."""
    path = folder / MANIFEST
    with _reading(path):
        found = json.loads(path.read_bytes()).get("format", 1) if path.exists() else FORMAT
    if found != FORMAT:
        age = "an older" if isinstance(found, int) and found < FORMAT else "a newer"
        raise ConfigError(
            f"resume = true: checkpoint {folder} is of format {found!r} ({path}), written by {age} FedStream; this "
            f"one reads format {FORMAT} only{' (format 1 pickled the strategy)' if found == 1 else ''}: resume it "
            "with the FedStream that wrote it, or start the run again with overwrite=true"
        )


class StrategyStateLost(StrategyFailure):
    """A strategy whose checkpointed state would not restore it: the run stops at that checkpoint."""


def _read_manifest(folder: Path) -> dict[str, Any]:
    """The manifest, checked against its own hash."""
    path = folder / MANIFEST
    if not path.exists():
        raise ConfigError(f"checkpoint file {path} is missing")
    with _reading(path):
        manifest = json.loads(path.read_bytes())
        content = {
            "format": manifest["format"],
            "files": dict(manifest["files"]),
            "client_state": dict(manifest["client_state"]),
        }
        intact = manifest["sha256"] == _digest(content)
    if not intact:
        raise ConfigError(f"checkpoint file {path} is damaged: its sha256 does not match its content")
    return content


def _verify(path: Path, digest: str | None) -> None:
    if not path.exists():
        raise ConfigError(f"checkpoint file {path} is missing")
    if digest is None:
        raise ConfigError(f"checkpoint file {path}: the manifest has no sha256 for it")
    if _sha256(path) != digest:
        raise ConfigError(f"checkpoint file {path} is damaged: its sha256 does not match the manifest")


@contextmanager
def _reading(path: Path) -> Iterator[None]:
    """Turn any error while parsing ``path`` into a ConfigError naming it."""
    try:
        yield
    except ConfigError:
        raise
    except Exception as error:  # a crafted file that passed its hash may fail anywhere
        raise ConfigError(f"checkpoint file {path} cannot be read: {type(error).__name__}: {error}") from None


def _known_state_hashes(directory: Path) -> dict[str, str]:
    """The client-state hashes of the newest checkpoint, or none if it is unreadable."""
    found = _checkpoints(directory)
    try:
        return _read_manifest(found[-1])["client_state"] if found else {}
    except ConfigError:
        return {}


def _checkpoints(directory: Path) -> list[Path]:
    """The checkpoint folders in ``directory``, oldest first."""
    if not directory.is_dir():
        return []
    folders = [path for path in directory.iterdir() if _FOLDER.fullmatch(path.name) and path.is_dir()]
    return sorted(folders, key=lambda path: int(path.name.split("-")[1]))


def _folder_name(server_round: int) -> str:
    return f"round-{server_round:06d}"


def _sha256(path: Path) -> str:
    digest = hashlib.sha256()
    with path.open("rb") as file:
        for block in iter(lambda: file.read(2**20), b""):
            digest.update(block)
    return digest.hexdigest()


def _digest(content: dict[str, Any]) -> str:
    return hashlib.sha256(json.dumps(content, sort_keys=True).encode()).hexdigest()


class Checkpoints(Hook):
    """A checkpoint every ``engine.checkpoint_every`` rounds and after the last, so a crash never loses
    a finished round; then the client states' spill files that neither kept checkpoint names go.
    Without checkpoints nothing can continue the run, so its client-state files go at the end."""

    def __init__(self, setup: RunSetup) -> None:
        super().__init__(setup)
        self.every = setup.config.engine.checkpoint_every
        self.previous_files = list(setup.states.saved_files)  # what the previous kept checkpoint names

    def after_log(self, view: RoundView, record: dict[str, Any] | None) -> None:
        setup, states = self.setup, self.setup.states
        if not self.every:
            states.collect()
            return
        if view.server_round % self.every and view.server_round != setup.rounds and not view.interrupted:
            return
        snapshot = states.snapshot()
        saved_strategy = self._whole_strategy_state(view)
        save(
            setup.outputs.path / "checkpoints",
            Checkpoint(
                round=view.server_round,
                arrays=view.arrays,
                strategy=saved_strategy,
                client_states=snapshot,
                wall_s=setup.elapsed(),
                config=to_dict(setup.config),
                num_tasks=setup.stream.num_tasks,
                records=setup.outputs.records,
                nonfinite_dropped=setup.grid.nonfinite_dropped,
                traffic=setup.grid.traffic,
            ),
        )
        states.collect(keep=self.previous_files)
        self.previous_files = list(snapshot.files.values())

    def _whole_strategy_state(self, view: RoundView) -> list[LayerState]:
        """The strategy's state, proved whole: restored into a copy of the strategy as built, it gives the live
        strategy back; else the run stops here, naming what a resume would lose."""
        where = f"round {view.server_round}: the checkpoint of {type(view.strategy).__name__}"
        try:
            saved = strategy_state(view.strategy)
            arrays: dict[str, np.ndarray] = {}
            encoded = json.loads(json.dumps([_encoded(layer.state, arrays, layer.path) for layer in saved]))
            arrays = {key: np.array(array) for key, array in arrays.items()}  # as a resume reads them: copies
            copied = copy.deepcopy(self.setup.strategy_as_built)
            decoded = [LayerState(s.path, s.kind, _decoded(e, arrays)) for s, e in zip(saved, encoded)]
            restore_strategy_state(copied, decoded, self.setup.grid.statistics.parameters_of(view.arrays))
            lost = lost_on_resume(view.strategy, copied)
        except Exception as error:  # the strategy's own checkpoint_state or restore_state, or what it holds
            raise StrategyStateLost(f"{where}: {type(error).__name__}: {error}") from None
        if lost:
            raise StrategyStateLost(
                f"{where} would lose {', '.join(lost)}: these attributes changed since it was built, and its "
                "state does not restore them. Return them from checkpoint_state() and set them in restore_state() "
                "(simulator.protocol.StatefulStrategy), or run with engine.checkpoint_every=0"
            )
        return saved

    def at_end(self, view: RoundView) -> dict[str, Any]:
        if not self.every:
            shutil.rmtree(self.setup.states.directory, ignore_errors=True)
        return {}
