"""Checkpoints: everything needed to continue a run exactly where it stopped.

A checkpoint holds the global weights, the strategy object itself (adaptive
optimizers and DP accountants keep state between rounds), the client states
(the names of their files, written at each checkpoint), the round and the
evaluations so far (the accuracy matrix and summary are built from them).
Every other random draw is derived from the seed and the round, so nothing
more is needed for a resumed run to match an uninterrupted one.

Each checkpoint is a folder ``checkpoints/round-NNNNNN/``; the newest two are kept:

- ``arrays.npz``: the global arrays, in order (numpy, read without pickle);
- ``strategy.pkl``: the strategy, read back by an unpickler that resolves only
  classes and functions of Flower, numpy's arrays and scalars, ``strategies``
  and the configured strategy's own modules, so a crafted file runs no code;
- ``state.json``: round, run time, config, number of tasks, bytes communicated, the client-state
  snapshot and the evaluation records;
- ``manifest.json``: the sha256 of each file above and of each client-state
  file the snapshot names, and of itself; checked before anything is read.

A folder is written under a temporary name and renamed whole, so a crash while
saving leaves the earlier checkpoints intact. Any damage is a ConfigError naming
the file; the previous checkpoint is kept, so the run can go back one checkpoint.
"""

from __future__ import annotations

import dataclasses
import hashlib
import inspect
import json
import os
import pickle
import re
import shutil
from collections import OrderedDict
from collections.abc import Iterable, Iterator
from contextlib import contextmanager
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
from flwr.app import Array, ArrayRecord
from flwr.serverapp.strategy import Strategy

from simulator.client_state import StoreSnapshot
from simulator.config import ConfigError, to_dict
from simulator.grid import Traffic
from simulator.hooks import Hook, RoundView, RunSetup

CLIENT_STATE_DIR = "client_state"  # beside checkpoints/ in the run directory
ARRAYS, STRATEGY, STATE, MANIFEST = "arrays.npz", "strategy.pkl", "state.json", "manifest.json"
KEPT = 2  # checkpoints kept: the last, and the previous in case the last is damaged
_FOLDER = re.compile(r"round-(\d+)")

# What a strategy's pickle may name: the classes of Flower's record and strategy packages
# and of the configured strategy's modules; functions only from that list or these modules
# (a function is a gadget: one that builds objects from a dict can call anything); from
# numpy only what arrays, scalars and dtypes need (np.load or np.memmap touch files).
_TRUSTED_PACKAGES = ("flwr.app", "flwr.common", "flwr.serverapp")
_TRUSTED_FUNCTIONS = {
    ("flwr.serverapp.strategy.strategy_utils", "aggregate_metricrecords"),  # FedAvg's metric defaults
    ("flwr.serverapp.strategy.multikrum", "select_multikrum"),
    *(
        (f"flwr.app.message.{record}", check)
        for record in ("arrayrecord", "metricrecord", "configrecord")
        for check in ("_check_key", "_check_value")
    ),
}
_TRUSTED_GLOBALS = (
    {("builtins", name) for name in ("complex", "set", "frozenset", "bytearray", "slice", "range", "object")}
    | {("collections", name) for name in ("OrderedDict", "defaultdict", "deque", "Counter")}
    | {
        ("copyreg", "_reconstructor"),
        ("_codecs", "encode"),
        ("numpy._core.multiarray", "_reconstruct"),
        ("numpy._core.multiarray", "scalar"),
        ("numpy._core.numeric", "_frombuffer"),
        ("numpy.core.multiarray", "_reconstruct"),
        ("numpy.core.multiarray", "scalar"),
        ("numpy.core.numeric", "_frombuffer"),
    }
)


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
    np.savez(temporary / ARRAYS, **{key: array.numpy() for key, array in checkpoint.arrays.items()})
    with (temporary / STRATEGY).open("wb") as file:
        pickle.dump(checkpoint.strategy, file, protocol=pickle.HIGHEST_PROTOCOL)
    (temporary / STATE).write_text(json.dumps(_plain(checkpoint)))
    # A client-state file is written once and never changed, so its hash carries over.
    known = _known_state_hashes(directory)
    state_directory = directory.parent / CLIENT_STATE_DIR
    manifest = {
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


def load(directory: Path, strategy_modules: Iterable[str] = ()) -> Checkpoint:
    """Read the newest checkpoint in ``directory``, checked; ``strategy_modules`` may be unpickled too.

    Any damage is a ConfigError naming the file and what failed, and how to go
    back to the previous checkpoint where one is kept.
    """
    found = _checkpoints(directory)
    if not found:
        raise ConfigError(f"resume = true: there is no checkpoint at {directory}")
    try:
        return _read(found[-1], tuple(strategy_modules))
    except ConfigError as error:
        if len(found) == 1:
            raise ConfigError(f"resume = true: {error}; no earlier checkpoint is kept") from None
        try:
            _read(found[-2], tuple(strategy_modules))
        except ConfigError as earlier:  # a client-state file both name, say
            raise ConfigError(f"resume = true: {error}; the previous checkpoint is damaged too: {earlier}") from None
        raise ConfigError(
            f"resume = true: {error}. The previous checkpoint ({found[-2].name}) is intact: remove or "
            f"rename {found[-1]} and resume again to continue from it"
        ) from None


def _read(folder: Path, strategy_modules: tuple[str, ...]) -> Checkpoint:
    manifest = _read_manifest(folder)
    for name in (ARRAYS, STRATEGY, STATE):
        _verify(folder / name, manifest["files"].get(name))
    for name, digest in manifest["client_state"].items():
        _verify(folder.parent.parent / CLIENT_STATE_DIR / name, digest)
    with _reading(folder / ARRAYS), np.load(folder / ARRAYS, allow_pickle=False) as file:
        arrays = ArrayRecord(array_dict=OrderedDict((key, Array(file[key])) for key in file.files))
    with _reading(folder / STRATEGY), (folder / STRATEGY).open("rb") as file:
        strategy = _TrustedUnpickler(file, strategy_modules).load()
    with _reading(folder / STATE):
        state = json.loads((folder / STATE).read_text())
        snapshot = StoreSnapshot(
            **{
                field: {int(client): value for client, value in state["client_states"][field].items()}
                for field in ("files", "last_round", "sizes")
            }
        )
        return Checkpoint(
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


def _plain(checkpoint: Checkpoint) -> dict[str, Any]:
    """``state.json``'s content: everything but the arrays and the strategy."""
    snapshot = checkpoint.client_states
    return {
        "round": checkpoint.round,
        "wall_s": checkpoint.wall_s,
        "config": checkpoint.config,
        "num_tasks": checkpoint.num_tasks,
        "records": checkpoint.records,
        "nonfinite_dropped": checkpoint.nonfinite_dropped,
        "traffic": dataclasses.asdict(checkpoint.traffic),
        "client_states": {"files": snapshot.files, "last_round": snapshot.last_round, "sizes": snapshot.sizes},
    }


class _TrustedUnpickler(pickle.Unpickler):
    """Resolves only trusted globals, so unpickling cannot call anything else (os.system, np.load, ...)."""

    def __init__(self, file: Any, strategy_modules: tuple[str, ...]) -> None:
        super().__init__(file)
        self.strategy_modules = strategy_modules  # the configured strategy's: imported already

    def find_class(self, module: str, name: str) -> Any:
        # Every check on the names comes before the import: importing a module runs it.
        if (module, name) in _TRUSTED_GLOBALS | _TRUSTED_FUNCTIONS:
            return super().find_class(module, name)
        if self._trusted_module(module):
            found = super().find_class(module, name)
            # The object itself must be of a trusted module too: a dotted name or an import
            # may lead elsewhere; and a class, or a function of the strategy's own modules.
            own = getattr(found, "__module__", None)
            if (
                isinstance(found, type)
                and self._trusted_module(own)
                or (inspect.isfunction(found) and own in self.strategy_modules)
            ):
                return found
        if module.split(".")[0] == "numpy" and self._numpy_value_type(super().find_class(module, name)):
            return super().find_class(module, name)
        raise pickle.UnpicklingError(
            f"refused global {module}.{name}: a checkpoint's strategy may only name classes of "
            f"{', '.join((*_TRUSTED_PACKAGES, *self.strategy_modules))}, functions of the last, "
            "and numpy arrays and scalars"
        )

    def _trusted_module(self, module: str | None) -> bool:
        return module is not None and (
            module in self.strategy_modules
            or any(module == trusted or module.startswith(f"{trusted}.") for trusted in _TRUSTED_PACKAGES)
        )

    @staticmethod
    def _numpy_value_type(found: Any) -> bool:
        """ndarray itself (not memmap, which opens files), dtypes and scalar types."""
        return found is np.ndarray or isinstance(found, type) and issubclass(found, (np.dtype, np.generic))


def _read_manifest(folder: Path) -> dict[str, Any]:
    """The manifest, checked against its own hash."""
    path = folder / MANIFEST
    if not path.exists():
        raise ConfigError(f"checkpoint file {path} is missing")
    with _reading(path):
        manifest = json.loads(path.read_bytes())
        content = {"files": dict(manifest["files"]), "client_state": dict(manifest["client_state"])}
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
        save(
            setup.outputs.path / "checkpoints",
            Checkpoint(
                round=view.server_round,
                arrays=view.arrays,
                strategy=view.strategy,
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

    def at_end(self, view: RoundView) -> dict[str, Any]:
        if not self.every:
            shutil.rmtree(self.setup.states.directory, ignore_errors=True)
        return {}
