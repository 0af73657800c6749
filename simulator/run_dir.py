"""Writes the run directory contract (docs/architecture.md, "The run directory"): metrics, matrix, summary, TensorBoard.

``metrics.jsonl`` gets one line per evaluation as it happens (flushed, so a
crash keeps every finished round); the accuracy matrix and summary are written
at the end from the evaluations of each task's last round, the matrix at full
precision (``repr`` of each float), so the summary's metrics recompute from it
exactly. TensorBoard gets every record's numbers as scalars and, at the end, the
run's flattened config as hyperparameters (the hparams plugin) with the
summary's numbers as their metrics, so runs can be filtered and compared there.
"""

from __future__ import annotations

import contextlib
import csv
import io
import json
import math
import os
import threading
import zipfile
from pathlib import Path
from types import TracebackType
from typing import Any

import numpy as np
import yaml

from simulator import metrics
from simulator.disk_writes import DISK_FULL, naming

MB = 2**20  # bytes in the megabytes (MiB) the records report: client_state_mb, uplink_mb, downlink_mb
RESOLVED_CONFIG = "config_resolved.yaml"  # the config with interpolations resolved, and what the run derived


def _quiet_writer_threads(hook: Any) -> Any:
    """``threading.excepthook`` less TensorBoard's writer thread dying of a full disk: the writer raises
    its error again in the run's thread, at its next write or flush, which names the folder."""
    if getattr(hook, "quiets_writer_threads", False):
        return hook

    def quiet(args: Any) -> None:
        disk = isinstance(args.exc_value, OSError) and args.exc_value.errno in DISK_FULL
        if not (disk and type(args.thread).__module__.startswith("tensorboard.")):
            hook(args)

    quiet.quiets_writer_threads = True  # type: ignore[attr-defined]
    return quiet


def disk_full(error: BaseException) -> str | None:
    """``no space left on device writing FILE`` where ``error``, or an error it was raised from, is a full
    disk's or a full quota's; None for any other error (one raised while handling a full disk included: that
    is a bug of its own, whose traceback must show).

    FILE is the error's own ``filename``; where the writer did not name it (a write
    or flush names none), the file being written where it was raised (an open file
    or archive held by the innermost frame that has one).
    """
    full = _disk_full_errors(error)
    if not full:
        return None
    named = next((e.filename for e in full if e.filename is not None), None)
    file = named or next(filter(None, (_file_written(e.__traceback__) for e in full)), None)
    return f"no space left on device writing {file or 'a file the error does not name'}"


def _disk_full_errors(error: BaseException) -> list[OSError]:
    """Every OSError of a full disk along ``error``'s explicit causes (``raise ... from``), outermost first."""
    found: list[OSError] = []
    seen: set[int] = set()
    current: BaseException | None = error
    while current is not None and id(current) not in seen:
        seen.add(id(current))
        if isinstance(current, OSError) and current.errno in DISK_FULL:
            found.append(current)
        current = current.__cause__
    return found


def _file_written(trace: TracebackType | None) -> str | None:
    """The name of a file open for writing in the innermost frame of ``trace`` that holds one."""
    frames = []
    while trace is not None:
        frames.append(trace.tb_frame)
        trace = trace.tb_next
    for frame in reversed(frames):
        for value in frame.f_locals.values():
            if isinstance(value, zipfile.ZipFile) and value.mode in ("w", "a", "x") and value.filename:
                return value.filename
            if isinstance(value, io.IOBase):
                with contextlib.suppress(AttributeError, ValueError):
                    name, mode = value.name, value.mode  # type: ignore[attr-defined]
                    if isinstance(name, str) and any(c in mode for c in "wax+"):
                        return name
    return None


class RunDirectory:
    """The files of one run under ``path``."""

    def __init__(
        self, path: Path, records: list[dict[str, Any]] | None = None, derived: dict[str, Any] | None = None
    ) -> None:
        """``records``: a resumed run's evaluations, from its checkpoint; metrics.jsonl is rewritten from them.

        From the checkpoint, not from metrics.jsonl: a crash may have cut its last
        line or left rounds past the checkpoint in it. ``derived``: the values the run
        derived from its config (its rounds, tasks and each task's classes), which
        ``config_resolved.yaml`` (where run.py wrote one) and the hyperparameters show
        under ``derived``, beside keys whose defaults the run overrode.
        """
        from torch.utils.tensorboard import SummaryWriter  # slow import; only when writing

        self.path = path
        path.mkdir(parents=True, exist_ok=True)
        self.metrics_path = path / "metrics.jsonl"
        self.records = list(records or [])
        self.derived = dict(derived or {})
        resolved = path / RESOLVED_CONFIG
        if self.derived and resolved.is_file():  # run.py wrote it afresh: the config, then what it derived
            with naming(resolved), resolved.open("a") as file:
                file.write(yaml.safe_dump({"derived": self.derived}, sort_keys=False, default_flow_style=None))
        self._rewrite_metrics()
        resumed_round = self.records[-1]["round"] if self.records else 0
        self.tensorboard_path = path / "tb"
        threading.excepthook = _quiet_writer_threads(threading.excepthook)
        with naming(self.tensorboard_path):
            self.tensorboard = SummaryWriter(str(self.tensorboard_path), purge_step=resumed_round + 1)

    def _rewrite_metrics(self) -> None:
        """Replace metrics.jsonl by the records so far, atomically: a crash leaves the old or the new."""
        temporary = self.path / f".{self.metrics_path.name}.tmp"
        with naming(temporary), temporary.open("w") as file:
            file.writelines(json.dumps(record) + "\n" for record in self.records)
        os.replace(temporary, self.metrics_path)

    def log(self, record: dict[str, Any]) -> dict[str, Any]:
        """Append one evaluation to metrics.jsonl and TensorBoard; return it as written (NaN as None)."""
        record = finite_or_null(record)
        self.records.append(record)
        with naming(self.metrics_path), self.metrics_path.open("a") as file:
            file.write(json.dumps(record, allow_nan=False) + "\n")
        step = record["round"]
        with naming(self.tensorboard_path):
            for key, value in record.items():
                if isinstance(value, float):
                    self.tensorboard.add_scalar(key, value, step)
            for key, values in record.items():
                if key.endswith(PER_TASK) and isinstance(values, list):
                    for task, accuracy in enumerate(values):
                        if accuracy is not None:
                            self.tensorboard.add_scalar(f"{_per_task_tag(key)}/{task}", accuracy, step)
            self.tensorboard.flush()
        return record

    def accuracy_matrix(self, name: str = "acc") -> np.ndarray:
        """R[i][j]: accuracy on task j at the last evaluation of task i, for every task j.

        ``name``: whose accuracy, the head's (``acc``) or a probe's (``probe_acc``, ``ncm_acc``).
        """
        return self.task_end_matrix(f"{name}_all_tasks")

    def task_end_matrix(self, key: str) -> np.ndarray:
        """Row i: the list under ``key`` in the last evaluation of task i (null as NaN), for each task reached."""
        last_of_task: dict[int, dict[str, Any]] = {}
        for record in self.records:
            last_of_task[record["task"]] = record
        return np.array([last_of_task[t][key] for t in sorted(last_of_task)], dtype=float)

    def write_matrix(self, R: np.ndarray, file_name: str) -> None:
        """``R`` as ``file_name`` in the run directory, a ``task_J`` header over its columns."""
        with naming(self.path / file_name), (self.path / file_name).open("w", newline="") as file:
            writer = csv.writer(file)
            writer.writerow([f"task_{j}" for j in range(R.shape[1])])
            writer.writerows([[repr(float(a)) for a in row] for row in R])

    def finish(
        self,
        wall_time_s: float,
        rounds: int,
        initial: list[float],
        entries: dict[str, Any],
        config: dict[str, Any],
    ) -> dict[str, Any]:
        """Write the accuracy matrix, summary.json and the hyperparameters; ``initial``: the untrained
        model's accuracies, ``entries``: what the hooks add to the summary (the probes' metrics, ...),
        ``config``: the resolved run config, nested (its scalars become the hyperparameters)."""
        from torch.utils.tensorboard.summary import hparams

        R = self.accuracy_matrix()
        last = self.records[-1]
        self.write_matrix(R, "accuracy_matrix.csv")
        summary: dict[str, Any] = {
            "final_accuracy": last["acc_seen"],
            **metrics.summarize(R, np.array(initial)),
            **{k: v for k, v in last.items() if k.startswith("client_acc_")},
            **entries,
            "initial_acc_per_task": initial,
            "rounds": rounds,
            "wall_time_s": round(wall_time_s, 3),
        }
        summary = finite_or_null(summary)
        scalars = {
            f"summary/{key}": value
            for key, value in summary.items()
            if isinstance(value, float) and key != "wall_time_s"
        }
        # Into tb/ itself (add_hparams would open a subfolder); the metrics are the scalars above.
        derived = {key: value if np.isscalar(value) else json.dumps(value) for key, value in self.derived.items()}
        with naming(self.tensorboard_path):
            for tag, value in scalars.items():
                self.tensorboard.add_scalar(tag, value, rounds)
            for event in hparams(scalar_leaves({**config, "derived": derived}), scalars):
                self.tensorboard.file_writer.add_summary(event)
            self.tensorboard.flush()  # raises what the writer's thread could not write; close() would not
            self.tensorboard.close()
        with naming(self.path / "summary.json"):
            (self.path / "summary.json").write_text(json.dumps(summary, indent=2, allow_nan=False) + "\n")
        return summary


PER_TASK = "_per_task"  # metrics.jsonl lists of a value per task (acc_per_task, probe_acc_per_task, cka_per_task)


def _per_task_tag(key: str) -> str:
    """The TensorBoard tag of a per-task list: acc_task for the head's, probe_task, ncm_task for probes',
    cka_task for the CKA with each task end's features."""
    name = key.removesuffix(PER_TASK)
    return f"{name if name == 'acc' else name.removesuffix('_acc')}_task"


def leaves(config: Any, prefix: str = "") -> dict[str, Any]:
    """Every value of a nested dict under its dotted key (``client.lr``)."""
    if not isinstance(config, dict):
        return {prefix.removesuffix("."): config}
    return {key: value for name, child in config.items() for key, value in leaves(child, f"{prefix}{name}.").items()}


def scalar_leaves(config: dict[str, Any]) -> dict[str, str | int | float | bool]:
    """The str, int, float and bool values of a nested dict under dotted keys (``client.lr``), the
    values TensorBoard's hparams take; lists and None are left out."""
    return {key: value for key, value in leaves(config).items() if isinstance(value, (str, int, float, bool))}


def finite_or_null(value: Any) -> Any:
    """``value`` with every NaN or infinity, however nested, as None: strict JSON has no such numbers."""
    if isinstance(value, float):
        return value if math.isfinite(value) else None
    if isinstance(value, dict):
        return {k: finite_or_null(v) for k, v in value.items()}
    if isinstance(value, list):
        return [finite_or_null(v) for v in value]
    return value
