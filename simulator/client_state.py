"""The driver's store of client states, by client id (docs/architecture.md, "Client state").

A client method's memory of a client (a replay buffer, a Fisher diagonal, a
teacher) belongs to the client, not to the actor or the method object that
trained it: the store holds it between rounds, a job carries it in, the
outcome carries it back (as pfl-research's user state and FedJAX's client
inputs do). With it, per client, the store keeps the last round the client
trained, from which the engine knows when the client starts a new task.

Each version of a state can be written once, to ``.npz`` (no pickle) named by
its client and round, and is never rewritten. States live in memory up to a
budget; past it, the least recently used leave memory, written first if they
have no file yet. A checkpoint writes the states that changed since the last
one and keeps only the file names, so it costs the cohort's states, not all of
them; a named file stays valid until a later checkpoint supersedes it, and
:meth:`ClientStateStore.collect` deletes the files no checkpoint needs any more.
"""

from __future__ import annotations

import json
import re
from collections import OrderedDict
from collections.abc import Iterable
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np

from simulator.plain_npz import UnreadableArchive, read_npz, write_npz
from simulator.protocol import RESERVED_STATE_KEY, ClientState, ClientStateError, check_state

STATE_FILE = "client{client}_round{round}.npz"  # one version of a client's state, never rewritten
_STATE_FILE_PATTERN = re.compile(STATE_FILE.format(client=r"\d+", round=r"(\d+)").replace(".", r"\."))


def state_bytes(state: ClientState) -> int:
    """Bytes a state holds: its arrays' data, 8 per scalar, a string's length."""
    return sum(v.nbytes if isinstance(v, np.ndarray) else len(v) if isinstance(v, str) else 8 for v in state.values())


@dataclass
class StoreSnapshot:
    """What a checkpoint keeps of the store: each state's file, last round and size."""

    files: dict[int, str] = field(default_factory=dict)
    last_round: dict[int, int] = field(default_factory=dict)
    sizes: dict[int, int] = field(default_factory=dict)  # state_bytes of every state


class ClientStateStore:
    """Client states by id, in memory up to ``memory_budget`` bytes, in files under ``directory``."""

    def __init__(self, directory: Path, memory_budget: int, snapshot: StoreSnapshot | None = None) -> None:
        self.directory = directory
        self.memory_budget = memory_budget
        snapshot = snapshot or StoreSnapshot()
        self._memory: OrderedDict[int, ClientState] = OrderedDict()  # least recently used first
        self._files = dict(snapshot.files)  # the file of each state's current version, where written
        self.saved_files = list(snapshot.files.values())  # what the checkpoint it was restored from names
        self._last_round = dict(snapshot.last_round)
        self._bytes = dict(snapshot.sizes)
        self.total_bytes = sum(self._bytes.values())  # every state's state_bytes, in memory or not
        self.memory_bytes = 0
        self._discard_newer_than(max(self._last_round.values(), default=0))

    def get(self, client: int, use: bool = True) -> ClientState:
        """Client ``client``'s state (empty before it first trains); its arrays are read-only.

        ``use``: the state is used by the client's training (or evaluation), so it becomes the
        most recently used; a look that is not (a query) leaves the eviction order as it was.
        """
        if client in self._memory:
            if use:
                self._memory.move_to_end(client)
            return self._memory[client]
        if client in self._files:
            return _read(self.directory / self._files[client])
        return {}

    def last_round(self, client: int) -> int | None:
        """The last round ``client`` trained in, or None if it never did."""
        return self._last_round.get(client)

    def put(self, client: int, server_round: int, state: ClientState) -> None:
        """Keep a copy of ``state`` as ``client``'s after ``server_round``; evict others past the budget.

        A copy: the caller's arrays may be views of a live model (in-process) or
        of a whole Ray reply, which the store must neither follow nor keep alive.
        """
        self._last_round[client] = server_round
        self._files.pop(client, None)  # the old version's file stays until collect(): a checkpoint may name it
        old_size = self._bytes.pop(client, 0)
        self.total_bytes -= old_size
        if self._memory.pop(client, None) is not None:
            self.memory_bytes -= old_size
        if not state:  # a stateless method's: kept as its last round only, never written
            return
        size = state_bytes(state)
        self.total_bytes += size
        self.memory_bytes += size
        self._bytes[client] = size
        self._memory[client] = _freeze({k: np.array(v) if isinstance(v, np.ndarray) else v for k, v in state.items()})
        while self._memory and self.memory_bytes > self.memory_budget:
            self._evict(next(iter(self._memory)))

    def _evict(self, client: int) -> None:
        self._write(client)
        del self._memory[client]
        self.memory_bytes -= self._bytes[client]

    def _write(self, client: int) -> None:
        """Write ``client``'s in-memory state to its version's file, unless it has one."""
        if client in self._files:
            return
        name = STATE_FILE.format(client=client, round=self._last_round[client])
        state = self._memory[client]
        self.directory.mkdir(parents=True, exist_ok=True)
        scalars = {k: v for k, v in state.items() if not isinstance(v, np.ndarray)}
        arrays = {k: v for k, v in state.items() if isinstance(v, np.ndarray)}
        temporary = self.directory / f".{name}.tmp.npz"
        write_npz(temporary, {**arrays, RESERVED_STATE_KEY: np.frombuffer(json.dumps(scalars).encode(), np.uint8)})
        temporary.replace(self.directory / name)
        self._files[client] = name

    def snapshot(self) -> StoreSnapshot:
        """Write the states changed since the last snapshot; return what a checkpoint keeps."""
        for client in self._memory:
            self._write(client)
        return StoreSnapshot(dict(self._files), dict(self._last_round), dict(self._bytes))

    def collect(self, keep: Iterable[str] = ()) -> None:
        """Delete state files that name no current state; call once a checkpoint has the store.

        ``keep``: the files an older checkpoint still kept names (it is the fallback if the newest is damaged).
        """
        if not self.directory.exists():
            return
        named = {*self._files.values(), *keep}
        for path in self.directory.iterdir():
            if path.name not in named:
                path.unlink()

    def _discard_newer_than(self, last_round: int) -> None:
        """Delete state files of rounds after ``last_round``: a run killed after its last checkpoint wrote them.

        Older files stay: the previous kept checkpoint may name them, until the
        next :meth:`collect` knows which it does.
        """
        if not self.directory.exists():
            return
        for path in self.directory.iterdir():
            written = _STATE_FILE_PATTERN.fullmatch(path.name)
            if written is None or int(written.group(1)) > last_round:
                path.unlink()

    @property
    def spilled_bytes(self) -> int:
        """Bytes of the states that are not in memory (as :func:`state_bytes` counts them)."""
        return self.total_bytes - self.memory_bytes


def _freeze(state: ClientState) -> ClientState:
    """Make ``state``'s arrays read-only, as they arrive from Ray's object store: methods replace, never mutate."""
    for value in state.values():
        if isinstance(value, np.ndarray):
            value.flags.writeable = False
    return state


def check_state_files(directory: Path, snapshot: StoreSnapshot) -> str | None:
    """What is wrong with the first of ``snapshot``'s state files that is not a state of its declared size
    (a resume checks them all before the first round); None if none is. Each is read bounded (``plain_npz``)."""
    for client, name in snapshot.files.items():
        try:
            size = state_bytes(_read(directory / name))
        except (UnreadableArchive, ClientStateError, ValueError, KeyError) as error:
            return f"{directory / name} is not a client state: {error}"
        if size != snapshot.sizes.get(client):
            return f"{directory / name} holds {size} bytes of state; the checkpoint says {snapshot.sizes.get(client)}"
    return None


def _read(path: Path) -> ClientState:
    arrays = read_npz(path)
    scalars = json.loads(arrays.pop(RESERVED_STATE_KEY).tobytes().decode())
    if not isinstance(scalars, dict):
        raise ValueError(f"its {RESERVED_STATE_KEY!r} member is not a JSON object")
    return _freeze(check_state({**arrays, **scalars}))
