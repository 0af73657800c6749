"""Results tables: ``summary.json`` metrics per configuration, mean ± std over seeds.

::

    python -m simulator.report DIR [DIR ...] [--metrics final_accuracy,forgetting,...]
                               [--by strategy,client.method] [--format markdown|csv|latex]
                               [--digits 3]

Each DIR is a run directory (it has ``summary.json``) or a Hydra multirun
directory (its subdirectories with ``summary.json`` are its runs; one with
``.hydra/`` but no ``summary.json``, a job that failed or has not finished, is
named on stderr and left out). Runs are grouped and named as the plots do
(:mod:`simulator.runs`): one row per group of runs that differ only by ``seed=``,
named by its strategy class where the rows' strategies differ, then by its
overrides that not every row shares (``resume=`` and ``seed=`` set no row apart);
the overrides every row shares are said under the table. Rows come in the order
their first runs were given.

A cell is ``mean ± std (n)`` over the row's runs whose summary has the metric:
std is the **sample** standard deviation (ddof=1, what papers and pandas report
over seeds), n the number of runs it was taken over. One run shows ``mean (1)``
(no spread); a row where no run has the metric, or every one has it null (``fwt``
when not measured), shows ``–``: a missing value is never averaged as 0. Where
every cell has the same n, cells are ``mean ± std`` and the line under the table
says ``n = 3 runs each``. CSV has
columns ``<metric>_mean``, ``<metric>_std`` (sample, ddof=1) and ``<metric>_n``
at full precision, empty where missing; LaTeX is a booktabs ``tabular``.

``--by KEY,...`` adds a column per key, leaves the key out of the configuration
names (the column is dropped where that leaves every name empty) and sorts the
rows by them (numbers as numbers; rows with equal keys stay in the order found).
A key is a config group (``strategy``, ``scenario``: the name chosen, ``fot``, or
the class the run used where it replaced the group's ``_target_``) or any key of
the run's config (``client.method``, ``strategy.min_train_nodes``), read from the
run's ``config_resolved.yaml`` (every interpolation resolved); a run older than
that file is read from ``.hydra/config.yaml``, an interpolation there resolved
within that config or else taken from the run's overrides.

A path without runs (a file, a folder without them, a name the system refuses),
a Hydra or config file that is not YAML, a ``summary.json`` that is not JSON, a
metric in no run's summary, a ``--by`` key in no run's config, a metric that is
not a number, or an option's value it cannot take (``--metrics ,``,
``--digits`` other than 0 to 17) exit with status 2 and one ``error:`` line naming it.
"""

from __future__ import annotations

import argparse
import csv
import io
import json
import math
import sys
from collections import Counter
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass, replace
from pathlib import Path
from typing import Any, NamedTuple

import numpy as np
from omegaconf import OmegaConf
from omegaconf.errors import OmegaConfBaseException

from simulator.runs import (
    SEED_STD_DDOF,
    Group,
    Run,
    RunError,
    group_runs,
    normal_override,
    override_key,
    path_problem,
    read_hydra,
    run_paths,
    shared_overrides,
    whole_number,
)

SUMMARY = "summary.json"
DEFAULT_METRICS = ("final_accuracy", "average_accuracy", "forgetting", "bwt")
MISSING = "–"  # a cell no run has a value for
SPREAD = "mean ± sample standard deviation (ddof=1) over seeds"
COUNTED = "(n) runs with the metric"  # said after SPREAD where cells have different n
_ABSENT = object()  # a config key a run does not have (unlike one set to null)


class Cell(NamedTuple):
    """A metric over a row's runs: mean, sample std (None under two runs), runs that had it."""

    mean: float | None
    std: float | None
    n: int


@dataclass(frozen=True)
class Row:
    """One configuration: its name, its ``--by`` values (None where its config lacks the
    key) and a cell per metric."""

    label: str
    keys: tuple[str | None, ...]
    cells: tuple[Cell, ...]


@dataclass(frozen=True)
class Table:
    """Rows in order, the ``--by`` keys and metrics that are their columns, and the
    overrides every row shares."""

    by: tuple[str, ...]
    metrics: tuple[str, ...]
    rows: tuple[Row, ...]
    shared: tuple[str, ...]


# --- Reading --------------------------------------------------------------------------------


def read_run(path: Path) -> Run:
    """A run directory's ``summary.json`` and, where Hydra wrote them, its settings."""
    file = path / SUMMARY
    try:
        summary = json.loads(file.read_text())
    except (json.JSONDecodeError, UnicodeDecodeError) as error:
        raise RunError(f"{file}: not JSON ({error})") from None
    if not isinstance(summary, dict):
        raise RunError(f"{file}: not a JSON object")
    return replace(read_hydra(path), summary=summary)


def unfinished(dirs: Sequence[Path]) -> list[Path]:
    """Subdirectories of the multirun directories given that Hydra started but that have no
    ``summary.json``: jobs that failed or have not finished."""
    sweeps = [d for d in dirs if d.is_dir() and not (d / SUMMARY).is_file()]
    return [
        job
        for d in sweeps
        for job in sorted(d.iterdir())
        if (job / ".hydra").is_dir() and not (job / SUMMARY).is_file()
    ]


def config_value(run: Run, key: str) -> str | None:
    """``key``'s value for ``run`` as text: a config group's choice (``strategy`` → ``fot``,
    or the class the run used instead), else the config's value (a section by its override
    or its ``_target_`` class); an interpolation left in an old run's config resolved within
    it, else its override, else as written; None where the run has no such key."""
    if key in run.choices:
        return run.choices[key]
    given = {override_key(o): normal_override(o).split("=", 1)[1] for o in run.overrides or () if "=" in o}
    value: Any = run.config or {}
    for part in key.split("."):
        value = value.get(part, _ABSENT) if isinstance(value, Mapping) else _ABSENT
    if isinstance(value, Mapping):
        target = value.get("_target_")
        return given.get(key) or (target.rsplit(".", 1)[-1] if isinstance(target, str) else None)
    if value is _ABSENT:
        return given.get(key)
    if isinstance(value, str) and "${" in value:
        try:
            resolved = OmegaConf.select(
                OmegaConf.create(dict(run.config or {})), key, default=None, throw_on_resolution_failure=False
            )
        except OmegaConfBaseException:  # not an interpolation OmegaConf can read
            resolved = None
        if resolved is None:  # e.g. a resolver only the run's process had
            return given.get(key, value)
        value = OmegaConf.to_container(resolved) if OmegaConf.is_config(resolved) else resolved
    return value if isinstance(value, str) else json.dumps(value)


# --- The table (pure) -----------------------------------------------------------------------


def cell(values: Sequence[float]) -> Cell:
    """Mean, sample standard deviation (ddof=1; None for one value) and count of ``values``."""
    if not values:
        return Cell(None, None, 0)
    std = float(np.std(values, ddof=SEED_STD_DDOF)) if len(values) > 1 else None
    return Cell(float(np.mean(values)), std, len(values))


def metric_values(group: Group, metric: str) -> list[float]:
    """The metric of each of the group's runs that has it non-null; other values are errors."""
    values = []
    for run in group.runs:
        value = (run.summary or {}).get(metric)
        if value is None:
            continue
        if isinstance(value, bool) or not isinstance(value, (int, float)):
            raise RunError(f"{run.path / SUMMARY}: {metric} is {value!r}, not a number")
        values.append(float(value))
    return values


def _check_metrics(runs: Sequence[Run], metrics: Sequence[str]) -> None:
    """Every metric is a key of some run's summary; else an error listing those there are."""
    for metric in metrics:
        if not any(metric in (run.summary or {}) for run in runs):
            numeric = sorted(
                {
                    k
                    for run in runs
                    for k, v in (run.summary or {}).items()
                    if isinstance(v, (int, float)) and not isinstance(v, bool)
                }
            )
            where = ", ".join(str(run.path) for run in runs[:3])
            where += ", ..." if len(runs) > 3 else ""
            raise RunError(f"unknown metric {metric!r}: in no {SUMMARY} of {where}; they have {', '.join(numeric)}")


def _order(value: str | None) -> tuple[int, float, str]:
    """Sort key of a ``--by`` value: numbers as numbers, then text, then missing."""
    if value is None:
        return (2, 0.0, "")
    try:
        number = float(value)
    except ValueError:
        return (1, 0.0, value)
    return (1, 0.0, value) if math.isnan(number) else (0, number, "")


def build_table(runs: Sequence[Run], metrics: Sequence[str], by: Sequence[str] = ()) -> Table:
    """One row per group of seeds in order of first appearance, a cell per metric, sorted
    stably by the ``by`` keys' values; the ``by`` keys are left out of the rows' labels."""
    _check_metrics(runs, metrics)
    groups = group_runs(runs, hide=by)
    for key in by:
        if all(config_value(run, key) is None for run in runs):
            raise RunError(
                f"unknown --by key {key!r}: in no run's config, Hydra choices or overrides (e.g. {runs[0].path})"
            )
    keys = [tuple(config_value(group.runs[0], key) for key in by) for group in groups]
    # Groups that differ only by how a --by key was given (left at its default, or set to it) would
    # read as two equal rows: those keep the overrides that tell them apart.
    seen = Counter(zip(keys, (group.label for group in groups)))
    full = group_runs(runs) if any(count > 1 for count in seen.values()) else groups
    rows = [
        Row(
            group.label if seen[key, group.label] == 1 else whole.label,
            key,
            tuple(cell(metric_values(group, metric)) for metric in metrics),
        )
        for group, whole, key in zip(groups, full, keys)
    ]
    rows.sort(key=lambda row: [_order(value) for value in row.keys])
    shared = shared_overrides([group.runs[0] for group in groups])
    return Table(tuple(by), tuple(metrics), tuple(rows), tuple(shared))


# --- Formats --------------------------------------------------------------------------------


def _same_n(table: Table) -> int | None:
    """The n every cell with a value has, or None where they differ (or no cell has one)."""
    counts = {c.n for row in table.rows for c in row.cells if c.mean is not None}
    return counts.pop() if len(counts) == 1 else None


def _cell_text(c: Cell, digits: int, pattern: str, missing: str, counted: bool) -> str:
    """``c`` as ``pattern`` (``{mean} ± {std}``), and ``(n)`` where ``counted``; the mean
    alone under two runs."""
    if c.mean is None:
        return missing
    mean = f"{c.mean:.{digits}f}"
    value = mean if c.std is None else pattern.format(mean=mean, std=f"{c.std:.{digits}f}")
    return f"{value} ({c.n})" if counted else value


def _text_headers(table: Table) -> list[str]:
    """The ``--by`` keys and ``configuration``, unless the keys leave every label empty."""
    return [*table.by, "configuration"] if _labelled(table) else list(table.by)


def _labelled(table: Table) -> bool:
    return any(row.label for row in table.rows) or not table.by


def _text_columns(table: Table, row: Row, missing: str = MISSING) -> list[str]:
    """The row's ``--by`` values (``missing`` where its config lacks the key) and label."""
    keys = [missing if v is None else v for v in row.keys]
    return [*keys, row.label] if _labelled(table) else keys


def _footer(table: Table) -> str:
    n = _same_n(table)
    counts = COUNTED if n is None else f"n = {n} run{'s' * (n != 1)} each"
    shared = f"; every row: {' '.join(table.shared)}" if table.shared else ""
    return f"{SPREAD}, {counts}{shared}"


def _cells(table: Table, row: Row, digits: int, pattern: str, missing: str) -> list[str]:
    counted = _same_n(table) is None
    return [_cell_text(c, digits, pattern, missing, counted) for c in row.cells]


def to_markdown(table: Table, digits: int = 3) -> str:
    """A Markdown table, metrics right-aligned, with a line on what the cells are."""

    def line(cells: Sequence[str]) -> str:
        return "| " + " | ".join(c.replace("|", "\\|") for c in cells) + " |\n"

    headers = _text_headers(table)
    out = line([*headers, *table.metrics])
    out += line(["---"] * len(headers) + ["---:"] * len(table.metrics))
    for row in table.rows:
        cells = _cells(table, row, digits, "{mean} ± {std}", MISSING)
        out += line(_text_columns(table, row) + cells)
    return out + f"\n{_footer(table)}.\n"


def to_csv(table: Table, digits: int = 3) -> str:
    """CSV at full precision (``digits`` is not used): ``<metric>_mean``, ``_std`` (sample,
    ddof=1) and ``_n`` per metric, empty where missing."""
    buffer = io.StringIO()
    writer = csv.writer(buffer, lineterminator="\n")
    stats = ("mean", "std", "n")
    writer.writerow([*_text_headers(table), *(f"{m}_{s}" for m in table.metrics for s in stats)])
    for row in table.rows:
        numbers = ["" if v is None else v for c in row.cells for v in c]
        writer.writerow([*_text_columns(table, row, ""), *numbers])
    return buffer.getvalue()


LATEX_SPECIAL = {c: "\\" + c for c in "&%$#_{}"} | {
    "\\": r"\textbackslash{}",
    "~": r"\textasciitilde{}",
    "^": r"\textasciicircum{}",
}


def _latex(text: str) -> str:
    return "".join(LATEX_SPECIAL.get(c, c) for c in text)


def to_latex(table: Table, digits: int = 3) -> str:
    """A booktabs ``tabular`` (``\\usepackage{booktabs}``), what the cells are in a comment."""
    headers = _text_headers(table)
    lines = [
        f"% {_footer(table)}; -- where no run has it",
        "\\begin{tabular}{" + "l" * len(headers) + "r" * len(table.metrics) + "}",
        "\\toprule",
        " & ".join(_latex(c) for c in [*headers, *table.metrics]) + " \\\\",
        "\\midrule",
    ]
    for row in table.rows:
        cells = _cells(table, row, digits, "${mean} \\pm {std}$", "--")
        lines.append(" & ".join([*map(_latex, _text_columns(table, row)), *cells]) + " \\\\")
    return "\n".join([*lines, "\\bottomrule", "\\end{tabular}"]) + "\n"


FORMATS: dict[str, Callable[[Table, int], str]] = {"markdown": to_markdown, "csv": to_csv, "latex": to_latex}


# --- Command line ---------------------------------------------------------------------------


MAX_DIGITS = 17  # --digits: decimals past a float64's 17 significant digits would show only noise


def _names(text: str) -> tuple[str, ...]:
    """``a,b`` → ``("a", "b")``; none is an error naming the option, as argparse reports it."""
    names = tuple(n.strip() for n in text.split(",") if n.strip())
    if not names:
        raise argparse.ArgumentTypeError(f"{text!r}: expected comma-separated names, e.g. final_accuracy,forgetting")
    return names


def _digits(text: str) -> int:
    """``--digits``: a whole number of decimals from 0 to :data:`MAX_DIGITS`."""
    return whole_number(text, 0, MAX_DIGITS, f"a whole number of decimals from 0 to {MAX_DIGITS}")


def _parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="python -m simulator.report",
        description="A results table from run directories: one row per configuration, each "
        f"metric of summary.json as {SPREAD}.",
        epilog="Runs whose .hydra/overrides.yaml differ only by seed= or resume= (values compared as "
        "Hydra parses them) are one row.",
    )
    parser.add_argument(
        "run_dirs",
        nargs="+",
        type=Path,
        metavar="DIR",
        help="a run directory (has summary.json) or a multirun directory of them",
    )
    parser.add_argument(
        "--metrics",
        type=_names,
        default=DEFAULT_METRICS,
        metavar="A,B,...",
        help=f"summary.json keys (default {','.join(DEFAULT_METRICS)})",
    )
    parser.add_argument(
        "--by",
        type=_names,
        default=(),
        metavar="KEY,...",
        help="a column per config key, rows sorted by them: strategy (the name "
        "chosen, or the class put in its place), scenario, client.method, "
        "model.head, strategy.eta, ...",
    )
    parser.add_argument("--format", choices=FORMATS, default="markdown")
    parser.add_argument(
        "--digits",
        type=_digits,
        default=3,
        help=f"decimals in Markdown and LaTeX, 0 to {MAX_DIGITS} (default 3; CSV keeps them all)",
    )
    return parser


def main(argv: Sequence[str] | None = None) -> int:
    """Print the table; errors exit with status 2 through argparse."""
    parser = _parser()
    args = parser.parse_args(argv)
    for path in args.run_dirs:
        if problem := path_problem(path, SUMMARY):
            parser.error(problem)
    try:
        runs = [read_run(path) for path in run_paths(args.run_dirs, SUMMARY)]
        table = build_table(runs, args.metrics, args.by)
    except RunError as error:
        parser.error(str(error))
    except OSError as error:  # a file or folder the system will not read
        parser.error(f"{error.filename}: {error.strerror}" if error.filename else str(error))
    for job in unfinished(args.run_dirs):
        print(f"left out {job}: no {SUMMARY} (the job failed or has not finished)", file=sys.stderr)
    print(FORMATS[args.format](table, args.digits), end="")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
