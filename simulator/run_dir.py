"""Writes the run directory contract of DESIGN.md: metrics, matrix, summary, TensorBoard.

``metrics.jsonl`` gets one line per evaluation as it happens (flushed, so a
crash keeps every finished round); the accuracy matrix and summary are written
at the end from the evaluations of each task's last round.
"""

from __future__ import annotations

import csv
import json
import math
import os
from pathlib import Path
from typing import Any

import numpy as np

from simulator import metrics


class RunDirectory:
    """The files of one run under ``path``."""

    def __init__(self, path: Path, records: list[dict[str, Any]] | None = None) -> None:
        """``records``: a resumed run's evaluations, from its checkpoint; metrics.jsonl is rewritten from them.

        From the checkpoint, not from metrics.jsonl: a crash may have cut its last
        line or left rounds past the checkpoint in it.
        """
        from torch.utils.tensorboard import SummaryWriter  # slow import; only when writing

        self.path = path
        path.mkdir(parents=True, exist_ok=True)
        self.metrics_path = path / "metrics.jsonl"
        self.records = list(records or [])
        self._rewrite_metrics()
        resumed_round = self.records[-1]["round"] if self.records else 0
        self.tensorboard = SummaryWriter(str(path / "tb"), purge_step=resumed_round + 1)

    def _rewrite_metrics(self) -> None:
        """Replace metrics.jsonl by the records so far, atomically: a crash leaves the old or the new."""
        temporary = self.path / f".{self.metrics_path.name}.tmp"
        with temporary.open("w") as file:
            file.writelines(json.dumps(record) + "\n" for record in self.records)
        os.replace(temporary, self.metrics_path)

    def log(self, record: dict[str, Any]) -> None:
        """Append one evaluation to metrics.jsonl and TensorBoard."""
        record = finite_or_null(record)
        self.records.append(record)
        with self.metrics_path.open("a") as file:
            file.write(json.dumps(record, allow_nan=False) + "\n")
        step = record["round"]
        for key, value in record.items():
            if isinstance(value, float):
                self.tensorboard.add_scalar(key, value, step)
        for task, accuracy in enumerate(record["acc_per_task"]):
            if accuracy is not None:
                self.tensorboard.add_scalar(f"acc_task/{task}", accuracy, step)
        self.tensorboard.flush()

    def accuracy_matrix(self) -> np.ndarray:
        """R[i][j]: accuracy on task j at the last evaluation of task i, for every task j."""
        last_of_task: dict[int, dict[str, Any]] = {}
        for record in self.records:
            last_of_task[record["task"]] = record
        return np.array([last_of_task[t]["acc_all_tasks"] for t in sorted(last_of_task)], dtype=float)

    def finish(self, wall_time_s: float, rounds: int, initial: list[float]) -> dict[str, Any]:
        """Write accuracy_matrix.csv and summary.json; ``initial``: the untrained model's accuracies."""
        R = self.accuracy_matrix()
        last = self.records[-1]
        with (self.path / "accuracy_matrix.csv").open("w", newline="") as file:
            writer = csv.writer(file)
            writer.writerow([f"task_{j}" for j in range(R.shape[1])])
            writer.writerows([[f"{a:.6f}" for a in row] for row in R])
        summary: dict[str, Any] = {
            "final_accuracy": last["acc_seen"],
            **metrics.summarize(R, np.array(initial)),
            **{k: v for k, v in last.items() if k.startswith("client_acc_")},
            "initial_acc_per_task": initial,
            "rounds": rounds,
            "wall_time_s": round(wall_time_s, 3),
        }
        summary = finite_or_null(summary)
        for key, value in summary.items():
            if isinstance(value, float) and key != "wall_time_s":
                self.tensorboard.add_scalar(f"summary/{key}", value, rounds)
        self.tensorboard.close()
        (self.path / "summary.json").write_text(json.dumps(summary, indent=2, allow_nan=False) + "\n")
        return summary


def finite_or_null(value: Any) -> Any:
    """``value`` with every NaN or infinity, however nested, as None: strict JSON has no such numbers."""
    if isinstance(value, float):
        return value if math.isfinite(value) else None
    if isinstance(value, dict):
        return {k: finite_or_null(v) for k, v in value.items()}
    if isinstance(value, list):
        return [finite_or_null(v) for v in value]
    return value
