"""Plots of run directories: forgetting curves, runs compared over seeds, accuracy matrices.

The engine calls :func:`plot_forgetting` after every run (``plots/forgetting.png``):
the head's accuracy on each task over rounds, task boundaries marked. Where the
records carry representation probes (``probe_acc_per_task``, ``ncm_acc_per_task``,
written at task ends and maybe every few rounds), a second panel to its right
shows, at those rounds only, each task's head accuracy (solid), linear probe
accuracy (dashed) and nearest-class-mean accuracy (dotted) on the frozen global
encoder's features, in the task's colour from the left panel and on the same
axes: where the probes stay above the head, the encoder kept what the head lost.
Where the run measured representation diagnostics (``eval.diagnostics``), it
also saves ``plots/cka.png`` (:func:`plot_cka`): ``cka_matrix.csv``, how alike
the encoder's features were at each pair of task ends, as a heatmap.

To compare runs afterwards::

    python -m simulator.plot RUN_DIR [RUN_DIR ...] --out FILE.png
                             [--metric NAME | --task J | --heatmap] [--band minmax|std]
                             [--title TEXT] [--label TEXT ...]

Each RUN_DIR is a run directory (it has ``metrics.jsonl``) or a Hydra multirun
directory (its subdirectories with ``metrics.jsonl`` are its runs).

Runs are grouped and named as :mod:`simulator.runs` says: runs whose overrides
differ only by ``seed=`` (or a resumed run's ``resume=true``) form one group,
labelled by its strategy class where the groups' strategies differ, then by its
overrides that not every group shares (``--label TEXT``, once per group in order,
names them instead). The title names
what is shown and what tells the groups apart ("accuracy on seen tasks by
strategy, client method"), over a line of the overrides every group shares
(``--title TEXT`` replaces it). Axes name metrics in words ("training loss" for
``train_loss``; a key without a label in :data:`METRIC_LABELS` as it is).

- Overlay (the default): one line per group over rounds, the mean over its
  seeds, aligned on the rounds all of them evaluated, shaded from the lowest to
  the highest seed (``--band minmax``, the default: every seed's value lies
  inside the band) or mean ± one sample standard deviation (``--band std``,
  ddof=1). The y value is ``--metric NAME``, any numeric key of ``metrics.jsonl``
  (default ``acc_seen``; also ``train_loss``, ``wall_s``, ...), or with
  ``--task J`` the accuracy on task J, ``acc_per_task[J]``. Dashed lines mark the
  task boundaries of the first run of the first group.
- ``--heatmap``: each group's accuracy matrix (``accuracy_matrix.csv``; a
  group's is the mean over its seeds), one annotated subplot per group: row i is
  the end of task i, column j the accuracy on task j (above the diagonal: tasks
  not trained yet, the basis of forward transfer); NaN cells are left blank.

A path with no runs (a file, a folder without them, a name the system refuses),
a ``metrics.jsonl`` that is not one JSON object with a whole-number ``round`` and
``task`` a line, an unknown metric or task, runs that cannot be compared, a
``--label`` count other than the groups', or an ``--out`` it cannot write (empty,
a folder, a name without an image format's suffix, in a folder that is a file, a
name too long; checked before any run is read; a full disk when writing it) exit
with status 2 and one ``error:`` line naming the path or the option.
"""

from __future__ import annotations

import argparse
import errno
import json
import math
import os
from collections.abc import Mapping, Sequence
from dataclasses import replace
from functools import reduce
from pathlib import Path
from typing import Any, NamedTuple

import matplotlib
import numpy as np

from simulator.disk_writes import DISK_FULL, naming
from simulator.runs import (
    SEED_STD_DDOF,
    Group,
    Records,
    Run,
    RunError,
    differing_keys,
    group_runs,
    path_problem,
    read_hydra,
    run_paths,
    shared_overrides,
    whole_number,
)

matplotlib.use("Agg")
import matplotlib.pyplot as plt
from matplotlib.backend_bases import FigureCanvasBase
from matplotlib.image import AxesImage
from matplotlib.lines import Line2D

PlotError = RunError  # input the plots cannot use; the message names the path at fault
MARKERS_UP_TO = 40  # evaluations; more than this and markers clutter the line
LEGEND_CHARS = 110  # characters of legend text that fit across the overlay figure
HEAD_KEY = "acc_per_task"  # the model's own head: accuracy per task, null where unseen
PROBE_KEY = "probe_acc_per_task"  # a linear probe on the frozen global encoder, same layout
NCM_KEY = "ncm_acc_per_task"  # a nearest-class-mean classifier on those features, same layout
PROBE_KEYS = (PROBE_KEY, NCM_KEY)  # a record with either carries representation probes
BANDS = ("minmax", "std")  # --band: lowest..highest seed, or mean ± one standard deviation

# What a reader sees for a metrics.jsonl key; a key not here is shown as it is.
METRIC_LABELS = {
    "acc_seen": "accuracy on seen tasks",
    "train_loss": "training loss",
    "eval_loss": "evaluation loss",
    "wall_s": "wall time (s)",
    "client_acc_mean": "mean client accuracy",
    "client_acc_std": "std of client accuracy",
    "client_acc_worst10": "accuracy of the worst 10% of clients",
    "client_acc_personal_mean": "mean client accuracy (personal models)",
    "client_acc_personal_std": "std of client accuracy (personal models)",
    "client_acc_personal_worst10": "accuracy of the worst 10% of clients (personal models)",
    "federated_acc": "federated evaluation accuracy",
    "federated_acc_personal": "federated evaluation accuracy (personal models)",
    "client_state_mb": "client state held (MiB)",
    "uplink_mb": "sent by clients so far (MiB)",
    "downlink_mb": "sent to clients so far (MiB)",
    "nc1": "within-class variability (NC1)",
    "nc2_equinorm": "class means' norms, std/mean (NC2)",
    "nc2_equiangular": "class means' cosines, std (NC2)",
    "nc2_max_angle": "class means' cosines, mean |cos + 1/(C-1)| (NC2)",
}
PROBE_NAMES = {"probe": "linear probe", "ncm": "nearest class mean"}  # probe_acc_seen, ncm_...
# What a reader sees for a config key that tells groups apart in a title.
KEY_LABELS = {"client.method": "client method", "model.head": "head", "stream.kind": "stream"}


class Curve(NamedTuple):
    """A metric over rounds, rounds ascending."""

    rounds: np.ndarray
    values: np.ndarray


class LineStyle(NamedTuple):
    """How one accuracy-per-task key is drawn in the forgetting plot's representation panel."""

    metric: str
    label: str
    linestyle: str
    marker: str


REPRESENTATION_LINES = (
    LineStyle(HEAD_KEY, "head", "-", "o"),
    LineStyle(PROBE_KEY, "linear probe", "--", "^"),
    LineStyle(NCM_KEY, "nearest class mean", ":", "s"),
)


class Band(NamedTuple):
    """A group's mean over seeds and the band around it, on common rounds: the lowest and
    highest seed, or mean ∓ one standard deviation."""

    rounds: np.ndarray
    mean: np.ndarray
    low: np.ndarray
    high: np.ndarray


# --- Reading run directories ------------------------------------------------------------


def read_run(path: Path) -> Run:
    """Read a run directory's metrics and, where Hydra wrote them, its overrides and strategy."""
    file = path / "metrics.jsonl"
    try:
        lines = file.read_text().splitlines()
    except UnicodeDecodeError as error:
        raise PlotError(f"{file}: not one JSON object a line ({error})") from None
    records = []
    for number, line in enumerate(lines, 1):
        if not line.strip():
            continue
        try:
            record = json.loads(line)
        except json.JSONDecodeError as error:
            raise PlotError(f"{file}: not one JSON object a line (line {number}: {error})") from None
        if not isinstance(record, dict):
            raise PlotError(f"{file}: line {number} is not a JSON object")
        for key in ("round", "task"):
            if not isinstance(record.get(key), int) or isinstance(record[key], bool):
                raise PlotError(f"{file}: line {number} has no whole-number {key!r}")
        records.append(record)
    if not records:
        raise PlotError(f"{path}: metrics.jsonl has no evaluations")
    return replace(read_hydra(path), records=records)


def read_accuracy_matrix(path: Path) -> np.ndarray:
    """R[i][j] from a run directory's ``accuracy_matrix.csv`` (``nan`` cells kept as NaN)."""
    file = path / "accuracy_matrix.csv"
    if not file.is_file():
        raise PlotError(f"{path}: no accuracy_matrix.csv (it is written when the run finishes)")
    return np.loadtxt(file, delimiter=",", skiprows=1, ndmin=2)


# --- Grouping and averaging (pure) -------------------------------------------------------


def metric_curve(records: Records, metric: str = "acc_seen", task: int | None = None) -> Curve:
    """The metric over rounds, skipping evaluations where it is null (maybe all of them).

    Parameters
    ----------
    records
        The records of one ``metrics.jsonl``.
    metric
        A numeric key of the records, or with ``task`` a list-valued one.
    task
        Index into a list-valued metric: ``metric="acc_per_task", task=2`` is the
        accuracy on task 2 (null before the task is seen).
    """
    if not any(metric in r for r in records):
        numeric = sorted({k for r in records for k, v in r.items() if isinstance(v, (int, float))})
        raise PlotError(
            f"unknown metric {metric!r}; metrics.jsonl has {', '.join(numeric)} (and --task J for acc_per_task[J])"
        )
    if task is None:
        points = [(r["round"], r.get(metric)) for r in records]
    else:
        points = [(r["round"], r[metric][task] if 0 <= task < len(r.get(metric) or ()) else None) for r in records]
    points = [(x, y) for x, y in points if y is not None]
    if any(isinstance(y, list) for _, y in points):
        raise PlotError(f"{metric} is a list per task; choose one with --task J")
    rounds, values = np.array(points, dtype=float).reshape(-1, 2).T
    order = np.argsort(rounds, kind="stable")
    return Curve(rounds[order].astype(int), values[order])


def seed_band(curves: Sequence[Curve], band: str = "minmax") -> Band:
    """The mean over curves, on the rounds that every curve has, and around it the lowest
    and highest curve (``band="minmax"``) or mean ∓ the sample standard deviation (``"std"``;
    zero for a single curve)."""
    common = reduce(np.intersect1d, [c.rounds for c in curves])
    if common.size == 0:
        raise PlotError("the runs have no evaluated round in common")
    values = np.array([c.values[np.searchsorted(c.rounds, common)] for c in curves])
    mean = values.mean(axis=0)
    if band == "minmax":
        return Band(common, mean, values.min(axis=0), values.max(axis=0))
    std = values.std(axis=0, ddof=SEED_STD_DDOF) if len(curves) > 1 else np.zeros_like(mean)
    return Band(common, mean, mean - std, mean + std)


def group_band(group: Group, metric: str = "acc_seen", task: int | None = None, band: str = "minmax") -> Band:
    """The band of a group's curves (see :func:`seed_band`); errors name the runs at fault."""
    curves = []
    for run in group.runs:
        try:
            curves.append(metric_curve(run.records, metric, task))
        except PlotError as error:
            raise PlotError(f"{run.path}: {error}") from None
        if curves[-1].rounds.size == 0:
            name = metric if task is None else f"{metric}[{task}]"
            raise PlotError(f"{run.path}: no evaluation has a value for {name}")
    try:
        return seed_band(curves, band)
    except PlotError as error:
        raise PlotError(f"{_paths(group)}: {error}") from None


def _paths(group: Group) -> str:
    return ", ".join(str(run.path) for run in group.runs)


def mean_matrix(matrices: Sequence[np.ndarray]) -> np.ndarray:
    """Cell-wise mean over matrices of one shape, ignoring NaN; NaN where every one is NaN."""
    if len({m.shape for m in matrices}) > 1:
        raise PlotError(f"accuracy matrices of different shapes: {[m.shape for m in matrices]}")
    stack = np.stack(matrices)
    seen = ~np.isnan(stack)
    counts = seen.sum(axis=0)
    totals = np.where(seen, stack, 0.0).sum(axis=0)
    return np.where(counts > 0, totals / np.maximum(counts, 1), np.nan)


def group_matrix(group: Group) -> np.ndarray:
    """A group's accuracy matrix: the mean over its seeds."""
    matrices = [read_accuracy_matrix(run.path) for run in group.runs]
    try:
        return mean_matrix(matrices)
    except PlotError as error:
        raise PlotError(f"{_paths(group)}: {error}") from None


def task_segments(records: Records) -> list[tuple[int, float, float]]:
    """``(task, start, end)`` for each stretch of one task; a boundary lies half a round
    after the last evaluation of a task."""
    segments = []
    start = records[0]["round"] - 0.5
    for record, following in zip(records, [*records[1:], None]):
        if following is None or following["task"] != record["task"]:
            segments.append((record["task"], start, record["round"] + 0.5))
            start = record["round"] + 0.5
    return segments


def spread_labels(ys: Sequence[float], gap: float, low: float, high: float) -> list[float]:
    """Label heights near ``ys``, at least ``gap`` apart and within [low, high] where they fit.

    Pushes labels up from the lowest, then back down from ``high``; returned in
    the order of ``ys``.
    """
    if not ys:
        return []
    order = sorted(range(len(ys)), key=lambda i: ys[i])
    placed = [max(ys[i], low) for i in order]
    for k in range(1, len(placed)):
        placed[k] = max(placed[k], placed[k - 1] + gap)
    placed[-1] = min(placed[-1], high)
    for k in range(len(placed) - 2, -1, -1):
        placed[k] = min(placed[k], placed[k + 1] - gap)
    result = [0.0] * len(ys)
    for i, y in zip(order, placed):
        result[i] = y
    return result


# --- Words for readers -------------------------------------------------------------------


def metric_label(metric: str, task: int | None = None) -> str:
    """What a reader sees for a metrics.jsonl key: ``accuracy on seen tasks`` for ``acc_seen``,
    ``accuracy on task 2 (linear probe)`` for ``probe_acc_per_task`` with ``task=2``; a key
    without a label is shown as it is (``key[2]`` with a task)."""
    probe, _, base = metric.partition("_")
    if probe not in PROBE_NAMES:
        probe, base = "", metric
    if task is None:
        label = METRIC_LABELS.get(base)
    else:
        label = f"accuracy on task {task}" if base in (HEAD_KEY, "acc_all_tasks") else None
    if label is None:
        return metric if task is None else f"{metric}[{task}]"
    return f"{label} ({PROBE_NAMES[probe]})" if probe else label


def describe(groups: Sequence[Group], shown: str) -> str:
    """A title: what is ``shown``, by what tells the groups apart (``accuracy on seen tasks by
    strategy, client method``), then a line of the overrides every group shares."""
    keys = [KEY_LABELS.get(key, key) for key in differing_keys(groups)]
    shared = " ".join(shared_overrides([g.runs[0] for g in groups]))
    return shown + (" by " + ", ".join(keys) if keys else "") + (f"\n{shared}" if shared else "")


# --- Drawing ------------------------------------------------------------------------------


def _mark_tasks(ax: plt.Axes, records: Records) -> None:
    """Dashed lines at task boundaries, and each stretch's task named above the axes."""
    segments = task_segments(records)
    if len(segments) < 2:
        return
    for _, _, end in segments[:-1]:
        ax.axvline(end, color="grey", linestyle="--", linewidth=0.8)
    top = ax.secondary_xaxis("top")
    compact = len(segments) > 8  # "task 11" would not fit above a narrow stretch
    names = [str(t) if compact else f"task {t}" for t, _, _ in segments]
    centres = [(start + end) / 2 for _, start, end in segments]
    top.set_xticks(centres, names, fontsize=8, color="dimgrey")
    top.tick_params(length=0)
    if compact:
        top.set_xlabel("task", fontsize=8, color="dimgrey")


def _save(fig: plt.Figure, out: Path) -> None:
    """Write ``fig`` to ``out``; an error that does not name the file (a full disk's) is raised naming it."""
    try:
        with naming(out):
            out.parent.mkdir(parents=True, exist_ok=True)
            fig.savefig(out, dpi=120)
    finally:
        plt.close(fig)


def _num_tasks(records: Records, metric: str) -> int:
    """The length of the longest list under ``metric`` (0 where no record has it)."""
    return max((len(r.get(metric) or ()) for r in records), default=0)


def _draw_per_task(
    ax: plt.Axes, records: Records, metric: str, colors: Mapping[int, str] | None = None, name: str = "", **style: Any
) -> dict[int, Line2D]:
    """One line per task of a list-valued metric, skipping tasks it never has a value for.

    Parameters
    ----------
    ax
        The axes to draw on.
    records
        The records to take the metric from; rounds without it are skipped.
    metric
        A list-valued key, ``acc_per_task`` or one of its kin.
    colors
        A colour per task; tasks without one take the axes' next colour.
    name
        Appended to each line's label, ``task J``.
    style
        Passed on to :meth:`matplotlib.axes.Axes.plot`.

    Returns
    -------
    dict[int, Line2D]
        Each drawn task's line.
    """
    colors = colors or {}
    lines = {}
    for task in range(_num_tasks(records, metric)):
        curve = metric_curve(records, metric, task)
        if curve.rounds.size:
            (lines[task],) = ax.plot(
                curve.rounds, curve.values, color=colors.get(task), label=f"task {task} {name}".rstrip(), **style
            )
    return lines


def _name_line_ends(ax: plt.Axes, lines: Mapping[int, Line2D]) -> None:
    """Write ``task J`` after each line's last point, in its colour, labels kept apart."""
    ends = [(task, line.get_xdata()[-1], line.get_ydata()[-1], line.get_color()) for task, line in lines.items()]
    heights = spread_labels([y for _, _, y, _ in ends], gap=0.045, low=0.02, high=1.0)
    for (task, x, _, color), y in zip(ends, heights):
        ax.annotate(
            f"task {task}", (x, y), color=color, xytext=(4, 0), textcoords="offset points", va="center", fontsize=8
        )


def _frame_accuracy(ax: plt.Axes, records: Records, title: str) -> None:
    """Accuracy over all the run's rounds: task boundaries, axis labels, room for end labels."""
    rounds = [r["round"] for r in records]
    _mark_tasks(ax, records)
    ax.set(xlabel="round", ylabel="test accuracy", ylim=(0, 1.02), title=title)
    ax.set_xlim(min(rounds) - 0.5, max(rounds) + 0.5 + 0.1 * (max(rounds) - min(rounds) + 1))
    ax.grid(alpha=0.3)


def probe_records(records: Records) -> Records:
    """The records that carry representation probes (a probe or NCM accuracy per task)."""
    return [r for r in records if any(key in r for key in PROBE_KEYS)]


def _draw_representation(ax: plt.Axes, probed: Records, colors: Mapping[int, str]) -> None:
    """At the probed rounds, per task: the head's, the linear probe's and the NCM's accuracy.

    Each task keeps its colour from ``colors``; a legend tells the line styles apart.
    """
    markers = len(probed) <= MARKERS_UP_TO
    legend = []
    for style in REPRESENTATION_LINES:
        if not any(style.metric in r for r in probed):
            continue
        marker = style.marker if markers else None
        _draw_per_task(
            ax, probed, style.metric, colors, style.label, linestyle=style.linestyle, marker=marker, markersize=4
        )
        legend.append(
            Line2D([], [], color="dimgrey", linestyle=style.linestyle, marker=marker, markersize=4, label=style.label)
        )
    ax.legend(handles=legend, loc="best", fontsize=7)


def forgetting_figure(records: Records, title: str = "") -> plt.Figure:
    """The figure :func:`plot_forgetting` saves (the caller closes it).

    Left: the head's accuracy on each task over rounds, each line named at its end.
    Right, only where records carry probes: the head, linear probe and NCM accuracy
    per task at the probed rounds, in the left panel's task colours, same axes.
    """
    probed = probe_records(records)
    fig, axes = plt.subplots(
        1, 2 if probed else 1, figsize=(13, 4) if probed else (7, 4), layout="constrained", squeeze=False
    )
    head, representation = axes[0, 0], axes[0, -1]
    marker = "." if len(records) <= MARKERS_UP_TO else None
    lines = _draw_per_task(head, records, HEAD_KEY, marker=marker)
    _name_line_ends(head, lines)
    _frame_accuracy(head, records, title)
    if probed:
        colors = {task: line.get_color() for task, line in lines.items()}
        _draw_representation(representation, probed, colors)
        _frame_accuracy(representation, records, "representation (global encoder)")
    return fig


def plot_forgetting(records: Records, out: Path, title: str = "") -> None:
    """Save :func:`forgetting_figure`: accuracy per task over rounds, and probes if any."""
    _save(forgetting_figure(records, title), out)


def overlay_figure(
    groups: Sequence[Group],
    metric: str = "acc_seen",
    task: int | None = None,
    band: str = "minmax",
    title: str | None = None,
) -> plt.Figure:
    """One line per group over rounds: the mean over its seeds, shaded by ``band`` (see
    :func:`seed_band`); ``title`` replaces :func:`describe`'s (the caller closes the figure)."""
    bands = [group_band(group, metric, task, band) for group in groups]
    fig, ax = plt.subplots(figsize=(8, 4.5), layout="constrained")
    markers = "." if max(len(b.rounds) for b in bands) <= MARKERS_UP_TO else None
    for group, curve in zip(groups, bands):
        seeds = len(group.runs)
        label = group.label + (f"  ({seeds} seeds)" if seeds > 1 else "")
        (line,) = ax.plot(curve.rounds, curve.mean, marker=markers, label=label)
        if seeds > 1:
            ax.fill_between(curve.rounds, curve.low, curve.high, color=line.get_color(), alpha=0.2, linewidth=0)
    _mark_tasks(ax, groups[0].runs[0].records)
    shown = metric_label(metric, task)
    ax.set(xlabel="round", ylabel=shown, title=describe(groups, shown) if title is None else title)
    ax.grid(alpha=0.3)
    several = any(len(g.runs) > 1 for g in groups)
    labels = ax.get_legend_handles_labels()[1]
    columns = max(1, min(len(labels), 3, LEGEND_CHARS // (max(map(len, labels)) + 6)))
    shading = "min..max" if band == "minmax" else "± one standard deviation"
    fig.legend(
        loc="outside lower center",
        ncols=columns,
        fontsize=9,
        title=f"mean over seeds, shaded {shading}" if several else None,
        title_fontsize=8,
    )
    return fig


def plot_overlay(
    groups: Sequence[Group],
    out: Path,
    metric: str = "acc_seen",
    task: int | None = None,
    band: str = "minmax",
    title: str | None = None,
) -> None:
    """Save :func:`overlay_figure`."""
    _save(overlay_figure(groups, metric, task, band, title), out)


def heatmap_figure(groups: Sequence[Group], title: str | None = None) -> plt.Figure:
    """Each group's accuracy matrix as an annotated heatmap, one subplot per group; ``title``
    replaces :func:`describe`'s (the caller closes the figure)."""
    matrices = [group_matrix(group) for group in groups]
    cols = min(len(groups), 3)
    rows = math.ceil(len(groups) / cols)
    side = max(3.0, 0.6 * max(m.shape[1] for m in matrices) + 1.5)
    fig, axes = plt.subplots(
        rows, cols, figsize=(side * cols + 1, side * rows + 0.6), layout="constrained", squeeze=False
    )
    for ax, group, R in zip(axes.flat, groups, matrices):
        image = _draw_matrix(ax, R)
        seeds = len(group.runs)
        ax.set_title(group.label + (f"\nmean of {seeds} seeds" if seeds > 1 else ""), fontsize=9)
        ax.set(xlabel="accuracy on task j", ylabel="after task i")
    for ax in axes.flat[len(groups) :]:
        ax.set_visible(False)
    fig.suptitle(describe(groups, "accuracy matrix") if title is None else title, fontsize=10)
    fig.colorbar(image, ax=axes, label="test accuracy", shrink=0.8)
    return fig


def plot_heatmaps(groups: Sequence[Group], out: Path, title: str | None = None) -> None:
    """Save :func:`heatmap_figure`."""
    _save(heatmap_figure(groups, title), out)


def _draw_matrix(ax: plt.Axes, R: np.ndarray) -> AxesImage:
    """``R`` (values in [0, 1]) as a heatmap, each cell annotated; NaN cells left blank."""
    image = ax.imshow(R, vmin=0, vmax=1, cmap="viridis")
    for (i, j), value in np.ndenumerate(R):
        if not np.isnan(value):
            ax.text(
                j, i, f"{value:.2f}", ha="center", va="center", fontsize=8, color="white" if value < 0.6 else "black"
            )
    ax.set(xticks=range(R.shape[1]), yticks=range(R.shape[0]))
    return image


def cka_figure(R: np.ndarray, title: str = "") -> plt.Figure:
    """A run's ``cka_matrix.csv`` as a heatmap: cell (i, j) the linear CKA between the global encoder's
    features at the ends of tasks i and j (the caller closes the figure)."""
    side = max(3.0, 0.6 * R.shape[1] + 1.5)
    fig, ax = plt.subplots(figsize=(side + 1, side + 0.6), layout="constrained")
    image = _draw_matrix(ax, R)
    ax.set(xlabel="end of task j", ylabel="end of task i")
    ax.set_title(title, fontsize=9)
    fig.colorbar(image, ax=ax, label="linear CKA", shrink=0.8)
    return fig


def plot_cka(R: np.ndarray, out: Path, title: str = "") -> None:
    """Save :func:`cka_figure`."""
    _save(cka_figure(R, title), out)


# --- Command line -------------------------------------------------------------------------


def image_formats() -> list[str]:
    """The file name suffixes an image can be written as (``png``, ``pdf``, ``svg``, ...)."""
    return sorted(FigureCanvasBase.get_supported_filetypes())


def _out(text: str) -> Path:
    """``--out``: an image file whose name says its format, not a folder, in a folder that is one or can be."""
    if not text.strip():
        raise argparse.ArgumentTypeError(f"{text!r}: expected an image file, e.g. runs.png")
    out = Path(text)
    formats = image_formats()
    endings = ", ".join(f".{f}" for f in ["png", "pdf", "svg", *(f for f in formats if f not in ("png", "pdf", "svg"))])
    try:
        if out.is_dir():
            raise argparse.ArgumentTypeError(f"{text}: a folder; give an image file in it, e.g. {out / 'runs.png'}")
        if not out.suffix:
            raise argparse.ArgumentTypeError(f"{text}: no image format; end it in {endings}")
        if out.suffix[1:].lower() not in formats:
            raise argparse.ArgumentTypeError(f"{text}: {out.suffix!r} is no image format; end it in {endings}")
        folder = next(parent for parent in out.parents if parent.exists())  # "." or "/" at the latest
        if not folder.is_dir():
            raise argparse.ArgumentTypeError(f"{text}: {folder} is a file, not a folder")
        name_max = os.pathconf(folder, "PC_NAME_MAX")
    except OSError as error:
        raise argparse.ArgumentTypeError(f"{text}: {error.strerror}") from None
    if any(len(os.fsencode(part)) > name_max for part in out.parts):
        raise argparse.ArgumentTypeError(f"{text}: {os.strerror(errno.ENAMETOOLONG)}")
    return out


def _task(text: str) -> int:
    """``--task``: a task index, 0 or more."""
    return whole_number(text, 0, None, "a task index, 0 or more")


def _os_error(error: OSError, out: Path) -> str:
    """One line for a file or folder the system would not read or write: ``--out``, or the file at fault."""
    file = error.filename or out
    where = "argument --out: " if str(file) == str(out) else ""
    if error.errno in DISK_FULL:
        return f"{where}no space left on device writing {file}"
    return f"{where}{file}: {error.strerror or error}"


def _parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="python -m simulator.plot",
        description="Compare run directories: a metric over rounds per group of seeds "
        "(mean, shaded min..max or ± one standard deviation), or their accuracy "
        "matrices.",
        epilog="Runs whose .hydra/overrides.yaml differ only by seed= are one group.",
    )
    parser.add_argument(
        "run_dirs",
        nargs="+",
        type=Path,
        metavar="RUN_DIR",
        help="a run directory (has metrics.jsonl) or a multirun directory of them",
    )
    parser.add_argument(
        "--out", type=_out, required=True, help="the image to write, e.g. runs.png (or .pdf, .svg, ...)"
    )
    what = parser.add_mutually_exclusive_group()
    what.add_argument(
        "--metric",
        default="acc_seen",
        help="a numeric key of metrics.jsonl: acc_seen (default), train_loss, wall_s, ...",
    )
    what.add_argument("--task", type=_task, metavar="J", help="plot acc_per_task[J], the accuracy on task J")
    what.add_argument(
        "--heatmap", action="store_true", help="draw each group's accuracy matrix instead (mean over seeds)"
    )
    parser.add_argument(
        "--band",
        choices=BANDS,
        default="minmax",
        help="the shading around each group's mean: minmax (default), the "
        "lowest to the highest seed; std, ± one sample standard deviation",
    )
    parser.add_argument(
        "--title", help="the figure's title, in place of the one naming what differs between the groups"
    )
    parser.add_argument(
        "--label",
        action="append",
        metavar="TEXT",
        help="a group's name in place of its overrides; repeat once per group, in the order the groups are drawn",
    )
    return parser


def relabel(groups: Sequence[Group], labels: Sequence[str] | None) -> list[Group]:
    """The groups named by ``labels`` (one per group, in order), or as they are."""
    if labels is None:
        return list(groups)
    if len(labels) != len(groups):
        names = "; ".join(group.label for group in groups)
        raise PlotError(f"{len(labels)} --label for {len(groups)} groups ({names}): give one per group, in that order")
    return [replace(group, label=label) for group, label in zip(groups, labels)]


def main(argv: Sequence[str] | None = None) -> int:
    """Run the command line; errors exit with status 2 through argparse."""
    parser = _parser()
    args = parser.parse_args(argv)
    for path in args.run_dirs:
        if problem := path_problem(path, "metrics.jsonl"):
            parser.error(problem)
    try:
        runs = [read_run(path) for path in run_paths(args.run_dirs)]
        groups = relabel(group_runs(runs), args.label)
        if args.heatmap:
            plot_heatmaps(groups, args.out, args.title)
        elif args.task is not None:
            plot_overlay(groups, args.out, HEAD_KEY, args.task, args.band, args.title)
        else:
            plot_overlay(groups, args.out, args.metric, band=args.band, title=args.title)
    except PlotError as error:
        parser.error(str(error))
    except OSError as error:  # a run's file it cannot read, or --out it cannot write (a full disk)
        parser.error(_os_error(error, args.out))
    print(args.out)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
