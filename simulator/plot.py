"""Forgetting curves: accuracy on each task over rounds, task boundaries marked."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import matplotlib

matplotlib.use("Agg")
import matplotlib.pyplot as plt  # noqa: E402 - after choosing the file backend


def plot_forgetting(records: list[dict[str, Any]], out: Path, title: str = "") -> None:
    """Draw one line per task from metrics records and save the figure to ``out``."""
    rounds = [r["round"] for r in records]
    num_tasks = max(len(r["acc_per_task"]) for r in records)
    fig, ax = plt.subplots(figsize=(7, 4))
    for task in range(num_tasks):
        points = [
            (r["round"], r["acc_per_task"][task])
            for r in records
            if task < len(r["acc_per_task"]) and r["acc_per_task"][task] is not None
        ]
        if points:
            xs, ys = zip(*points)
            line, = ax.plot(xs, ys, marker="." if len(xs) < 40 else None, label=f"task {task}")
            ax.annotate(f"task {task}", (xs[-1], ys[-1]), color=line.get_color(),
                        xytext=(4, 0), textcoords="offset points", va="center", fontsize=8)
    for previous, current in zip(records, records[1:]):
        if current["task"] != previous["task"]:
            ax.axvline(previous["round"] + 0.5, color="grey", linestyle="--", linewidth=0.8)
    ax.set(xlabel="round", ylabel="test accuracy", ylim=(0, 1.02), title=title)
    ax.set_xlim(min(rounds) - 0.5, max(rounds) + 0.5 + 0.08 * (max(rounds) - min(rounds) + 1))
    ax.grid(alpha=0.3)
    if num_tasks > 1:
        ax.legend(loc="lower left", fontsize=8)
    out.parent.mkdir(parents=True, exist_ok=True)
    fig.tight_layout()
    fig.savefig(out, dpi=120)
    plt.close(fig)
