"""A run directory is its run's own: one live run at a time, no fresh run over an old one, no link out of it.

:func:`claim_run_directory` holds an exclusive ``flock`` on ``.fedstream.lock``
in the run directory for the run's life (a sweep's jobs each hold their own)
and removes the file when the run ends; the kernel releases the lock when the
process ends, however it ends, so a lock file left by a killed run is taken
over (with a warning naming that pid). Before any
work it refuses, as bad input (exit 2):

- a second live run into the directory, naming the holder's pid;
- a fresh run (no ``resume=true``) into a directory that holds a run's outputs,
  unless ``overwrite=true``, which first removes them (``tb/`` included);
- a symbolic link inside the directory that leads out of it: the run would
  read, write or delete files elsewhere through it (a linked ``client_state/``
  would have its target's other files collected as stale states).
"""

from __future__ import annotations

import contextlib
import errno
import fcntl
import logging
import os
import shutil
from collections.abc import Iterator
from pathlib import Path

from simulator.config import ConfigError

LOCK_FILE = ".fedstream.lock"
# What a run writes (besides Hydra's .hydra/ and run.log): their presence means the directory holds a run.
OUTPUTS = (
    "metrics.jsonl",
    "summary.json",
    "accuracy_matrix.csv",
    "probe_matrix.csv",
    "ncm_matrix.csv",
    "cka_matrix.csv",
    "cka_features",
    "config_resolved.yaml",
    "tb",
    "checkpoints",
    "client_state",
    "plots",
)
log = logging.getLogger("fedstream")


class RunDirectoryBusy(ConfigError):
    """Another live run holds the run directory: nothing of this run may touch it (its log included)."""


@contextlib.contextmanager
def claim_run_directory(run_dir: Path, resume: bool, overwrite: bool) -> Iterator[None]:
    """Hold ``run_dir`` for this run; refuse (ConfigError) a busy directory, a fresh run over an old
    one (``overwrite``: clear it first), and links out of it."""
    run_dir.mkdir(parents=True, exist_ok=True)
    with _locked(run_dir):
        _refuse_links_out(run_dir)
        previous = [name for name in OUTPUTS if (run_dir / name).exists()]
        if previous and not resume:
            if not overwrite:
                raise ConfigError(
                    f"{run_dir}: holds a run's outputs ({', '.join(previous)}); pass resume=true to continue it "
                    "or overwrite=true to replace it, or choose another hydra.run.dir"
                )
            for name in previous:
                path = run_dir / name
                if path.is_dir():
                    shutil.rmtree(path)
                else:
                    path.unlink()
            log.warning("%s: overwrite=true removed the previous run's %s", run_dir, ", ".join(previous))
        yield


@contextlib.contextmanager
def _locked(run_dir: Path) -> Iterator[None]:
    path = run_dir / LOCK_FILE
    _refuse_link(path, run_dir)
    with open(path, "a+") as lock:
        try:
            fcntl.flock(lock, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except OSError as error:
            if error.errno not in (errno.EAGAIN, errno.EACCES):
                raise
            lock.seek(0)
            holder = lock.read().strip() or "?"
            raise RunDirectoryBusy(
                f"{run_dir}: another run (pid {holder}) is writing this run directory; wait for it to end "
                "or choose another hydra.run.dir"
            ) from None
        lock.seek(0)
        stale = lock.read().strip()
        if stale and stale != str(os.getpid()):
            log.warning("%s: took over the lock of pid %s, which ended without releasing it", run_dir, stale)
        lock.seek(0)
        lock.truncate()
        lock.write(str(os.getpid()))
        lock.flush()
        try:
            yield
        finally:
            path.unlink(missing_ok=True)  # still held: a run that opens the path now makes a new lock file
            fcntl.flock(lock, fcntl.LOCK_UN)


def _refuse_links_out(run_dir: Path) -> None:
    """A ConfigError naming the first symbolic link in ``run_dir`` that leads out of it."""
    for path in run_dir.rglob("*"):  # ** does not follow links to folders
        if path.is_symlink():
            _refuse_link(path, run_dir)


def _refuse_link(path: Path, run_dir: Path) -> None:
    if path.is_symlink() and not path.resolve().is_relative_to(run_dir.resolve()):
        raise ConfigError(
            f"{path}: a symbolic link out of the run directory (to {path.resolve()}); the run would read, "
            "write or delete files there through it: remove the link or choose another hydra.run.dir"
        )
