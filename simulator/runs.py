"""Run directories as the tools read them back: finding runs, their Hydra settings, seed groups.

:mod:`simulator.plot` (curves over rounds) and :mod:`simulator.report` (tables of
``summary.json``) both take run directories and Hydra multirun directories, group
the runs that differ only by ``seed=`` and name each group by what sets it apart;
this module is that shared part, so a plot's legend and a table's rows name the
same configuration the same way.

A group is labelled by its strategy class where the groups' strategies differ,
then by its overrides that not every group shares; the overrides every group
shares describe all of them (a plot's title, a table's caption).
"""

from __future__ import annotations

import re
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from omegaconf import OmegaConf

Records = list[dict[str, Any]]
STRATEGY_KEYS = ("strategy", "strategy._target_")  # overrides that choose the strategy class
SEED_STD_DDOF = 1  # spread over seeds: the sample standard deviation, as papers and pandas report


class RunError(ValueError):
    """Input the tools cannot use; the message names the path or key at fault."""


@dataclass(frozen=True)
class Run:
    """One run directory as read back; each tool fills in the files it reads.

    ``overrides`` is None when the run has no ``.hydra/overrides.yaml``;
    ``strategy`` is the class name of ``strategy._target_`` in ``.hydra/config.yaml``;
    ``choices`` are Hydra's config-group choices (``strategy: fot``, ``scenario: digits``)
    from ``.hydra/hydra.yaml``; ``config`` is ``.hydra/config.yaml``, interpolations
    left as strings; ``records`` (``metrics.jsonl``) and ``summary`` (``summary.json``)
    are read by the tool that needs them.
    """

    path: Path
    records: Records = field(default_factory=list)
    overrides: tuple[str, ...] | None = None
    strategy: str | None = None
    choices: Mapping[str, str] = field(default_factory=dict)
    config: Mapping[str, Any] | None = None
    summary: Mapping[str, Any] | None = None

    @property
    def setting(self) -> tuple[str, ...] | None:
        """The overrides other than the seed, sorted: equal settings differ only by seed."""
        if self.overrides is None:
            return None
        return tuple(sorted(o for o in self.overrides if override_key(o) != "seed"))


@dataclass(frozen=True)
class Group:
    """Runs that differ only by seed, and what tells them from the other groups."""

    label: str
    runs: tuple[Run, ...]


# --- Reading ------------------------------------------------------------------------------


def find_runs(path: Path, marker: str = "metrics.jsonl") -> list[Path]:
    """``path`` itself if it holds ``marker``, else its subdirectories that do.

    Subdirectories come in natural order (``2_seed=2`` before ``10_seed=10``).
    """
    if (path / marker).is_file():
        return [path]
    runs = [p for p in path.iterdir() if (p / marker).is_file()] if path.is_dir() else []
    if not runs:
        raise RunError(f"{path}: no {marker} there nor in any subdirectory")
    return sorted(runs, key=_natural_key)


def run_paths(dirs: Sequence[Path], marker: str = "metrics.jsonl") -> list[Path]:
    """The runs of every directory given (see :func:`find_runs`), each once, in order."""
    return list(dict.fromkeys(run.resolve() for path in dirs for run in find_runs(path, marker)))


def _natural_key(path: Path) -> list[int | str]:
    """``2_seed=2`` before ``10_seed=10``: digit runs compare as numbers."""
    return [int(t) if t.isdigit() else t for t in re.split(r"(\d+)", path.name)]


def read_hydra(path: Path) -> Run:
    """A run directory's overrides, strategy class, config-group choices and config, where
    Hydra wrote them; the run's own files are left to the tool that reads them."""
    hydra = path / ".hydra"
    overrides = None
    if (hydra / "overrides.yaml").is_file():
        overrides = tuple(read_yaml(hydra / "overrides.yaml") or ())
    config = strategy = None
    if (hydra / "config.yaml").is_file():
        config = read_yaml(hydra / "config.yaml")
        target = (config.get("strategy") or {}).get("_target_")
        strategy = target.rsplit(".", 1)[-1] if target else None
    choices = {}
    if (hydra / "hydra.yaml").is_file():
        runtime = (read_yaml(hydra / "hydra.yaml").get("hydra") or {}).get("runtime") or {}
        choices = {k: v for k, v in (runtime.get("choices") or {}).items() if isinstance(v, str)}
    return Run(path, overrides=overrides, strategy=strategy, choices=choices, config=config)


def read_yaml(file: Path) -> Any:
    """A YAML file as plain Python, ``${...}`` interpolations left as strings."""
    return OmegaConf.to_container(OmegaConf.load(file), resolve=False)


# --- Grouping and labelling (pure) ---------------------------------------------------------


def override_key(override: str) -> str:
    """``seed`` for ``seed=1``, ``+seed=1`` or ``++seed=1``."""
    return override.split("=", 1)[0].lstrip("+~")


def shared_overrides(runs: Sequence[Run]) -> list[str]:
    """The non-seed overrides every run has (none if a run has no overrides file)."""
    settings = [set(run.setting or ()) for run in runs]
    shared = set.intersection(*settings)
    return [o for o in runs[0].setting or () if o in shared]


def group_runs(runs: Sequence[Run]) -> list[Group]:
    """Group runs that differ only by seed, in order of first appearance, and label the groups."""
    members: dict[Any, list[Run]] = {}
    for run in runs:
        members.setdefault(run.setting if run.setting is not None else run.path, []).append(run)
    firsts = [group[0] for group in members.values()]
    shared = set(shared_overrides(firsts))
    name_strategy = _strategies_differ(firsts)
    return [Group(_label(group[0], shared, name_strategy), tuple(group))
            for group in members.values()]


def _strategies_differ(runs: Sequence[Run]) -> bool:
    return len({run.strategy for run in runs}) > 1


def _label(run: Run, shared: set[str], name_strategy: bool) -> str:
    """What sets ``run``'s group apart; its strategy, or its directory, when nothing does."""
    if run.overrides is None:
        return run.path.name
    parts = [
        o for o in run.setting or ()
        if o not in shared and not (name_strategy and override_key(o) in STRATEGY_KEYS)
    ]
    if name_strategy and run.strategy:
        parts.insert(0, run.strategy)
    return " ".join(parts) or run.strategy or run.path.name


def differing_keys(groups: Sequence[Group]) -> list[str]:
    """The keys whose values tell the groups apart, as their labels show them: ``strategy``
    where the strategy classes differ, then each override key not every group shares."""
    firsts = [group.runs[0] for group in groups]
    shared = set(shared_overrides(firsts))
    keys = ["strategy"] if _strategies_differ(firsts) else []
    for run in firsts:
        for override in run.setting or ():
            key = override_key(override)
            named = "strategy" if key in STRATEGY_KEYS else key
            if override not in shared and named not in keys:
                keys.append(named)
    return keys
