"""What happens around rounds, as hooks the round loop calls (after pfl-research's ``TrainingProcessCallback``).

Each hook is a small object built once per run with what it needs, and the
loop calls it at a few coarse points, each returning values rather than
reaching into the engine:

- :meth:`Hook.after_round`: metrics for this round's ``metrics.jsonl`` record
  (``{}``: nothing to report this round);
- :meth:`Hook.at_task_end`: the same, at the last round of a task;
- :meth:`Hook.after_log`: once the round's record, if any, is written (checkpoints, progress);
- :meth:`Hook.at_end`: entries for ``summary.json`` (and files of its own);
- :meth:`Hook.finished`: once ``summary.json`` is written (plots);
- :meth:`Hook.close`: always, last, whether the run finished or failed.

:class:`Hooks` calls them by the same names, in order, merging what they
return into one record per round. This module holds only that protocol; the
hooks live with what they measure (``evaluation``, ``probes``, ``checkpoint``,
``reporting_hooks``) and the engine assembles them. A user's hook is a
:class:`Hook` subclass built as ``Hook(setup)``, named by dotted path in
``eval.hooks`` (``eval.hooks=[my_pkg.MyHook]``): its metrics join the records
after the shipped measurements, before checkpoints save them.
"""

from __future__ import annotations

import contextlib
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from typing import Any

import numpy as np
import torch
from flwr.app import ArrayRecord, MetricRecord
from flwr.serverapp.strategy import Strategy

from clients.base import ClientMethod
from simulator.client_state import ClientStateStore
from simulator.config import ExperimentConfig
from simulator.grid import SimulationGrid
from simulator.protocol import NUM_EXAMPLES, TRAIN_LOSS
from simulator.registry import Registry
from simulator.run_dir import MB, RunDirectory
from simulator.streams import Stream


@dataclass
class RunSetup:
    """What stays the same across a run's rounds."""

    config: ExperimentConfig
    stream: Stream
    rounds: int
    first_round: int  # 1, or the round a resumed run continues with
    model: torch.nn.Module  # the server's copy: hooks load the global weights into it (RoundView.global_model)
    method: ClientMethod  # the server's instance of the client method (it personalises models for evaluation)
    states: ClientStateStore
    grid: SimulationGrid
    outputs: RunDirectory
    elapsed: Callable[[], float]  # seconds of the run so far (a resumed run's included)
    strategy_as_built: Strategy | None  # a copy of the strategy before any round, where checkpoints are on: each
    # restores its state into a copy of it


@dataclass
class RoundView:
    """One finished round, as hooks see it: after training and, at a task end, the strategy's own step."""

    setup: RunSetup
    server_round: int
    task: int
    task_ended: bool
    arrays: ArrayRecord  # the global arrays now
    strategy: Strategy
    train_metrics: MetricRecord | None
    interrupted: bool = False  # the run stops after this round (Ctrl-C, SIGTERM): checkpoint it
    _loaded: bool = field(default=False, repr=False)

    def record(self, measured: dict[str, Any]) -> dict[str, Any]:
        """The round's metrics.jsonl record: what the hooks measured, with the round's own facts.

        ``uplink_mb``/``downlink_mb`` are the run's totals so far, through this round (its federated
        evaluation included): records come only at evaluations, so per-round values would skip rounds.
        """
        setup = self.setup
        return {
            "round": self.server_round,
            "task": self.task,
            "train_loss": metric_value(self.train_metrics, TRAIN_LOSS),
            **measured,
            **client_method_metrics(self.train_metrics),
            "nonfinite_dropped": setup.grid.nonfinite_dropped,
            "client_state_mb": round(setup.states.total_bytes / MB, 6),
            "client_state_spilled_mb": round(setup.states.spilled_bytes / MB, 6),
            **setup.grid.traffic.megabytes(),
            "wall_s": round(setup.elapsed(), 3),
        }

    def global_model(self) -> torch.nn.Module:
        """The server's model holding the global weights (its personal layers: the initial ones)."""
        if not self._loaded:
            self.setup.model.load_state_dict(
                self.arrays.to_torch_state_dict(), strict=not self.setup.method.personal_prefixes
            )
            self._loaded = True
        return self.setup.model


class Hook:
    """A part of what happens around rounds; override the points it needs."""

    def __init__(self, setup: RunSetup) -> None:
        """Built once per run, before the first round, with what stays the same across its rounds."""
        self.setup = setup

    def after_round(self, view: RoundView) -> dict[str, Any]:
        """Metrics for this round's record; ``{}`` when there is nothing to report."""
        return {}

    def at_task_end(self, view: RoundView) -> dict[str, Any]:
        """Metrics for the record of a task's last round."""
        return {}

    def after_log(self, view: RoundView, record: dict[str, Any] | None) -> None:
        """The round's record was written (None: none this round)."""

    def at_end(self, view: RoundView) -> dict[str, Any]:
        """Entries for ``summary.json``, after the last round."""
        return {}

    def finished(self, view: RoundView) -> None:
        """``summary.json`` is written (plots come here: a failing plot cannot lose the summary)."""

    def close(self) -> None:
        """Release what the hook holds, whether the run finished or failed."""


class Hooks:
    """The run's hooks, called in order; what they return is merged."""

    def __init__(self, hooks: Sequence[Hook]) -> None:
        self.hooks = list(hooks)

    def after_round(self, view: RoundView) -> dict[str, Any]:
        """Every hook's metrics for this round (and, at a task end, its ``at_task_end``'s after its own)."""
        measured: dict[str, Any] = {}
        for hook in self.hooks:
            measured.update(hook.after_round(view))
            if view.task_ended:
                measured.update(hook.at_task_end(view))
        return measured

    def after_log(self, view: RoundView, record: dict[str, Any] | None) -> None:
        """Tell every hook the round's record (None: none) was written."""
        for hook in self.hooks:
            hook.after_log(view, record)

    def at_end(self, view: RoundView) -> dict[str, Any]:
        """Every hook's entries for ``summary.json``."""
        entries: dict[str, Any] = {}
        for hook in self.hooks:
            entries.update(hook.at_end(view))
        return entries

    def finished(self, view: RoundView) -> None:
        """Tell every hook the summary is written."""
        for hook in self.hooks:
            hook.finished(view)

    def close(self) -> None:
        """Close every hook, even where one fails to."""
        with contextlib.ExitStack() as stack:
            for hook in self.hooks:
                stack.callback(hook.close)


HOOKS: Registry[type[Hook]] = Registry(
    "hook",
    "eval.hooks",
    {},
    "a simulator.hooks.Hook subclass",
    lambda plugin: isinstance(plugin, type) and issubclass(plugin, Hook),
)


def metric_value(record: MetricRecord | None, key: str) -> float | None:
    """A float from an aggregated MetricRecord, or None where the strategy gave none."""
    if record is None or key not in record:
        return None
    return float(np.asarray(record[key]))


def client_method_metrics(record: MetricRecord | None) -> dict[str, float]:
    """The strategy's aggregate of what the clients' method reported, as ``train/<name>``."""
    if record is None:
        return {}
    return {
        f"train/{key}": float(value)
        for key, value in record.items()
        if key not in (NUM_EXAMPLES, TRAIN_LOSS) and isinstance(value, (int, float))
    }


def evaluation_due(config: ExperimentConfig, view: RoundView) -> bool:
    """Whether the global model is scored this round: every ``eval.every`` rounds, at every task end,
    and wherever the probes run, so that every record has the head's accuracy."""
    every_probe = config.eval.probe_every if config.eval.probes else None
    return (
        view.server_round % config.eval.every == 0
        or view.task_ended
        or bool(every_probe and view.server_round % every_probe == 0)
    )
