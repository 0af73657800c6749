"""Run directories as the tools read them back: finding runs, their Hydra settings, seed groups.

:mod:`simulator.plot` (curves over rounds) and :mod:`simulator.report` (tables of
``summary.json``) both take run directories and Hydra multirun directories, group
the runs that differ only by ``seed=`` and name each group by what sets it apart;
this module is that shared part, so a plot's legend and a table's rows name the
same configuration the same way; both check their paths and whole-number options
with it too.

A group is labelled by its strategy class where the groups' strategies differ,
then by its overrides that not every group shares; the overrides every group
shares describe all of them (a plot's title, a table's caption). ``seed=`` and
``resume=`` (``resume=true`` continues a killed run: the same configuration) do not make a
setting, and override values are compared as Hydra parses them: ``eval.probes=False``
and ``eval.probes=false`` are one setting.
"""

from __future__ import annotations

import argparse
import json
import re
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from functools import cache
from pathlib import Path
from typing import Any

import yaml
from hydra.core.override_parser.overrides_parser import OverridesParser
from hydra.errors import HydraException
from omegaconf import OmegaConf
from omegaconf.errors import OmegaConfBaseException

Records = list[dict[str, Any]]
STRATEGY_KEYS = ("strategy", "strategy._target_")  # overrides that choose the strategy class
NOT_SETTINGS = ("seed", "resume")  # override keys that do not tell configurations apart
RESOLVED_CONFIG = "config_resolved.yaml"  # run.py's: the config, interpolations resolved
SEED_STD_DDOF = 1  # spread over seeds: the sample standard deviation, as papers and pandas report


class RunError(ValueError):
    """Input the tools cannot use; the message names the path or key at fault."""


@dataclass(frozen=True)
class Run:
    """One run directory as read back; each tool fills in the files it reads.

    ``overrides`` is None when the run has no ``.hydra/overrides.yaml``; ``config`` is
    the run's ``config_resolved.yaml`` (the values it used), or for a run older than that
    file ``.hydra/config.yaml`` (interpolations left as strings); ``strategy`` is the
    class name of the config's ``strategy._target_``; ``choices`` are Hydra's
    config-group choices (``strategy: fot``, ``scenario: digits``) from
    ``.hydra/hydra.yaml``, except that a group whose ``_target_`` the run replaced
    names the class it used (``strategy=fedavg strategy._target_=...FedMedian``:
    ``strategy: FedMedian``); ``records`` (``metrics.jsonl``) and ``summary``
    (``summary.json``) are read by the tool that needs them.
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
        """The overrides other than ``seed`` and ``resume``, values in Hydra's sense
        (:func:`normal_override`), sorted: equal settings differ only by seed."""
        if self.overrides is None:
            return None
        return tuple(sorted(normal_override(o) for o in self.overrides if override_key(o) not in NOT_SETTINGS))


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
    """A run directory's overrides, config, strategy class and config-group choices, where
    Hydra and run.py wrote them; the run's own files are left to the tool that reads them."""
    hydra = path / ".hydra"
    overrides = read_yaml(hydra / "overrides.yaml", list)
    if overrides is not None:
        if not all(isinstance(o, str) for o in overrides):
            raise RunError(f"{hydra / 'overrides.yaml'}: not a list of overrides")
        overrides = tuple(overrides)
    config = read_yaml(path / RESOLVED_CONFIG, dict)
    if config is None:
        config = read_yaml(hydra / "config.yaml", dict)
    strategy = _class_name(_section(config, "strategy").get("_target_"))
    hydra_yaml = read_yaml(hydra / "hydra.yaml", dict) or {}
    runtime = _section(_section(hydra_yaml, "hydra"), "runtime")
    choices = {
        group: _chosen(group, choice, config or {}, overrides or (), runtime)
        for group, choice in _section(runtime, "choices").items()
        if isinstance(choice, str)
    }
    return Run(path, overrides=overrides, strategy=strategy, choices=choices, config=config)


def read_yaml(file: Path, kind: type) -> Any:
    """A YAML file of ``kind`` (``dict``, ``list``) as plain Python, ``${...}``
    interpolations left as strings; None where there is no such file, an empty file as an
    empty ``kind``; a file that is not YAML of that kind is a :class:`RunError` naming it."""
    if not file.is_file():
        return None
    try:
        content = OmegaConf.to_container(OmegaConf.load(file), resolve=False)
    except (yaml.YAMLError, OmegaConfBaseException, UnicodeDecodeError) as error:
        raise RunError(f"{file}: not YAML ({' '.join(str(error).split())})") from None
    if not content:  # an empty file
        return kind()
    if not isinstance(content, kind):
        raise RunError(f"{file}: not a YAML {'mapping' if kind is dict else 'list'}")
    return content


def _section(mapping: Mapping[str, Any] | None, key: str) -> Mapping[str, Any]:
    """``mapping[key]`` where that is a mapping, else empty."""
    value = (mapping or {}).get(key)
    return value if isinstance(value, Mapping) else {}


def _class_name(target: Any) -> str | None:
    """``FedAvg`` for ``flwr.serverapp.strategy.FedAvg``; None for no target."""
    return target.rsplit(".", 1)[-1] if isinstance(target, str) and target else None


def _chosen(
    group: str, choice: str, config: Mapping[str, Any], overrides: Sequence[str], runtime: Mapping[str, Any]
) -> str:
    """What the run used for a config group: the choice, or the class it ran instead
    where it replaced the group's ``_target_``, by an override or otherwise (the config's
    target is not the one the group's file, as it is now, names)."""
    section: Mapping[str, Any] = config
    for part in group.split("/"):
        section = _section(section, part)
    used = _class_name(section.get("_target_"))
    if used is None:  # not a group that chooses a class
        return choice
    if f"{group.replace('/', '.')}._target_" in map(override_key, overrides):
        return used
    for source in runtime.get("config_sources") or ():
        if isinstance(source, Mapping) and source.get("schema") == "file":
            try:
                listed = read_yaml(Path(source.get("path", "")) / group / f"{choice}.yaml", dict)
            except RunError:  # not the run's own file: not for the run to fail on
                continue
            target = _class_name((listed or {}).get("_target_"))
            if target and target != used:
                return used
    return choice


# --- Grouping and labelling (pure) ---------------------------------------------------------


def override_key(override: str) -> str:
    """``seed`` for ``seed=1``, ``+seed=1`` or ``++seed=1``."""
    return override.split("=", 1)[0].lstrip("+~")


@cache
def normal_override(override: str) -> str:
    """``override`` with a value Hydra reads as a bool, number or null written one way
    (``eval.probes=false`` for ``eval.probes=False``, ``client.lr=0.1`` for ``0.10``);
    other values, and text Hydra cannot parse, as given."""
    if "=" not in override:
        return override
    try:
        value = _OVERRIDES.parse_override(override).value()
    except HydraException:
        return override
    if value is None or isinstance(value, (bool, int, float)):
        return f"{override.split('=', 1)[0]}={json.dumps(value)}"
    return override


_OVERRIDES = OverridesParser.create()


def shared_overrides(runs: Sequence[Run]) -> list[str]:
    """The non-seed overrides every run has (none if a run has no overrides file)."""
    settings = [set(run.setting or ()) for run in runs]
    shared = set.intersection(*settings)
    return [o for o in runs[0].setting or () if o in shared]


def group_runs(runs: Sequence[Run], hide: Sequence[str] = ()) -> list[Group]:
    """Group runs that differ only by seed, in order of first appearance, and label the groups;
    the keys in ``hide`` (shown apart, as a table's ``--by`` columns) are left out of the
    labels, ``strategy`` with its class."""
    members: dict[Any, list[Run]] = {}
    for run in runs:
        members.setdefault(run.setting if run.setting is not None else run.path, []).append(run)
    firsts = [group[0] for group in members.values()]
    shared = set(shared_overrides(firsts))
    name_strategy = _strategies_differ(firsts)
    return [Group(_label(group[0], shared, name_strategy, set(hide)), tuple(group)) for group in members.values()]


def _strategies_differ(runs: Sequence[Run]) -> bool:
    return len({run.strategy for run in runs}) > 1


def _label(run: Run, shared: set[str], name_strategy: bool, hide: set[str]) -> str:
    """What sets ``run``'s group apart; its strategy, or its directory, when nothing does;
    empty where only the ``hide`` keys do."""
    if run.overrides is None:
        return run.path.name
    strategy_apart = name_strategy or "strategy" in hide
    parts = [
        o
        for o in run.setting or ()
        if o not in shared and override_key(o) not in hide and not (strategy_apart and override_key(o) in STRATEGY_KEYS)
    ]
    if "strategy" in hide:
        return " ".join(parts)
    if name_strategy and run.strategy:
        parts.insert(0, run.strategy)
    return " ".join(parts) or ("" if hide else run.strategy or run.path.name)


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


def path_problem(path: Path, marker: str) -> str | None:
    """What makes ``path`` no run directory before any is read: a file (``marker``, a run's ``summary.json``
    or ``metrics.jsonl``, itself: give its folder), or a name the system refuses (too long, a loop of links);
    None where it may hold runs."""
    try:
        if path.is_dir() or not path.exists():
            return None  # find_runs names a folder without runs, and one that does not exist
    except OSError as error:
        return f"{path}: {error.strerror}"
    folder = f"; give its folder {path.parent}" if path.name == marker else ""
    return f"{path}: a file, not a run directory{folder}"


def whole_number(text: str, low: int, high: int | None, expected: str) -> int:
    """A command-line option's ``text`` as an integer from ``low`` to ``high`` (None: no bound); else argparse's
    error, ``'TEXT': expected EXPECTED``."""
    try:
        number = int(text)
    except ValueError:
        number = None
    if number is None or number < low or high is not None and number > high:
        raise argparse.ArgumentTypeError(f"{text!r}: expected {expected}")
    return number
