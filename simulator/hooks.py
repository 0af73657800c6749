"""What happens around rounds, as hooks the round loop calls (after pfl-research's ``TrainingProcessCallback``).

Each hook is a small object built once per run with what it needs, and the
loop calls it at a few coarse points, each returning values rather than
reaching into the engine:

- :meth:`Hook.after_round`: metrics for this round's ``metrics.jsonl`` record
  (``{}``: nothing to report this round);
- :meth:`Hook.at_task_end`: the same, at the last round of a task;
- :meth:`Hook.after_log`: once the round's record, if any, is written (checkpoints, progress);
- :meth:`Hook.at_end`: entries for ``summary.json`` (and files of its own);
- :meth:`Hook.finished`: once ``summary.json`` is written (plots).

The loop merges what the hooks return, in their order, into one record per
round. A new measurement (a metric at every task end, say) is one new hook in
:func:`default_hooks`; the engine does not change.
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
from tqdm import tqdm

from clients.base import ClientMethod
from simulator.client_state import ClientStates
from simulator.config import RunConfig
from simulator.grid import MB, SimulationGrid
from simulator.keys import NUM_EXAMPLES, TRAIN_LOSS
from simulator.run_dir import RunDirectory
from simulator.streams import Stream


@dataclass
class RunContext:
    """What stays the same across a run's rounds."""

    cfg: RunConfig
    stream: Stream
    rounds: int
    first_round: int  # 1, or the round a resumed run continues with
    model: torch.nn.Module  # the server's copy: hooks load the global weights into it (RoundView.global_model)
    method: ClientMethod  # the server's instance of the client method (it personalises models for evaluation)
    states: ClientStates
    grid: SimulationGrid
    outputs: RunDirectory
    elapsed: Callable[[], float]  # seconds of the run so far (a resumed run's included)


@dataclass
class RoundView:
    """One finished round, as hooks see it: after training and, at a task end, the strategy's own step."""

    run: RunContext
    server_round: int
    task: int
    task_ended: bool
    arrays: ArrayRecord  # the global arrays now
    strategy: Strategy
    train_metrics: MetricRecord | None
    _loaded: bool = field(default=False, repr=False)

    def record(self, measured: dict[str, Any]) -> dict[str, Any]:
        """The round's metrics.jsonl record: what the hooks measured, with the round's own facts.

        ``uplink_mb``/``downlink_mb`` are the run's totals so far, through this round (its federated
        evaluation included): records come only at evaluations, so per-round values would skip rounds.
        """
        run = self.run
        return {
            "round": self.server_round,
            "task": self.task,
            "train_loss": metric_value(self.train_metrics, TRAIN_LOSS),
            **measured,
            **client_method_metrics(self.train_metrics),
            "nonfinite_dropped": run.grid.nonfinite_dropped,
            "client_state_mb": round(run.states.total_bytes / MB, 6),
            "client_state_spilled_mb": round(run.states.spilled_bytes / MB, 6),
            **run.grid.traffic.megabytes(),
            "wall_s": round(run.elapsed(), 3),
        }

    def global_model(self) -> torch.nn.Module:
        """The server's model holding the global weights (its personal layers: the initial ones)."""
        if not self._loaded:
            self.run.model.load_state_dict(self.arrays.to_torch_state_dict(), strict=not self.run.method.personal_prefixes)
            self._loaded = True
        return self.run.model


class Hook:
    """A part of what happens around rounds; override the points it needs."""

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

    def measure(self, view: RoundView) -> dict[str, Any]:
        """Every hook's metrics for this round (and, at a task end, for the task's end)."""
        measured: dict[str, Any] = {}
        for hook in self.hooks:
            measured.update(hook.after_round(view))
            if view.task_ended:
                measured.update(hook.at_task_end(view))
        return measured

    def logged(self, view: RoundView, record: dict[str, Any] | None) -> None:
        """Tell every hook the round's record (None: none) was written."""
        for hook in self.hooks:
            hook.after_log(view, record)

    def summary(self, view: RoundView) -> dict[str, Any]:
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


class Progress(Hook):
    """A progress bar over rounds, with the last evaluation's task, loss and accuracy."""

    def __init__(self, run: RunContext) -> None:
        self.bar = tqdm(total=run.rounds, initial=run.first_round - 1, desc="round", unit="round",
                        dynamic_ncols=True)

    def after_log(self, view: RoundView, record: dict[str, Any] | None) -> None:
        if record is not None and "acc_seen" in record:
            self.bar.set_postfix(task=view.task, loss=record["train_loss"], acc=f"{record['acc_seen']:.3f}")
        self.bar.update()

    def close(self) -> None:
        self.bar.close()


class Communication(Hook):
    """The run's totals ``uplink_mb`` and ``downlink_mb`` in the summary (see ``grid.Traffic``)."""

    def __init__(self, run: RunContext) -> None:
        self.run = run

    def at_end(self, view: RoundView) -> dict[str, Any]:
        return self.run.grid.traffic.megabytes()


class ForgettingPlot(Hook):
    """``plots/forgetting.png``: accuracy per task over rounds (and the probes beside it, where they ran)."""

    def __init__(self, run: RunContext) -> None:
        self.run = run

    def finished(self, view: RoundView) -> None:
        from simulator.plot import plot_forgetting  # matplotlib: only where a run finishes

        plot_forgetting(self.run.outputs.records, self.run.outputs.path / "plots" / "forgetting.png",
                        title=f"{self.run.cfg.scenario} / {type(view.strategy).__name__}")


def default_hooks(run: RunContext) -> Hooks:
    """The hooks of a run, in the order they measure and then act on the round's record."""
    from simulator.checkpoint import Checkpoints
    from simulator.evaluation import FederatedEvaluation, HeadEvaluation
    from simulator.probes import Probes

    hooks: list[Hook] = [HeadEvaluation(run)]
    if run.cfg.eval.probes:
        hooks.append(Probes(run))
    if run.cfg.eval.federated:
        hooks.append(FederatedEvaluation(run))
    hooks += [Communication(run), Checkpoints(run), Progress(run), ForgettingPlot(run)]
    return Hooks(hooks)


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
        f"train/{key}": float(value) for key, value in record.items()
        if key not in (NUM_EXAMPLES, TRAIN_LOSS) and isinstance(value, (int, float))
    }


def evaluation_due(cfg: RunConfig, view: RoundView) -> bool:
    """Whether the global model is scored this round: every ``eval.every`` rounds, at every task end,
    and wherever the probes run, so that every record has the head's accuracy."""
    every_probe = cfg.eval.probe_every if cfg.eval.probes else None
    return (view.server_round % cfg.eval.every == 0 or view.task_ended
            or bool(every_probe and view.server_round % every_probe == 0))
