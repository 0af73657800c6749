"""The hooks that report a run as it goes and when it ends: progress bar, traffic totals, forgetting plot."""

from __future__ import annotations

from typing import Any

from tqdm import tqdm

from simulator.hooks import Hook, RoundView, RunSetup


class Progress(Hook):
    """A progress bar over rounds, with the last evaluation's task, loss and accuracy."""

    def __init__(self, setup: RunSetup) -> None:
        super().__init__(setup)
        self.bar = tqdm(
            total=setup.rounds, initial=setup.first_round - 1, desc="round", unit="round", dynamic_ncols=True
        )

    def after_log(self, view: RoundView, record: dict[str, Any] | None) -> None:
        if record is not None and "acc_seen" in record:
            self.bar.set_postfix(task=view.task, loss=record["train_loss"], acc=f"{record['acc_seen']:.3f}")
        self.bar.update()

    def close(self) -> None:
        self.bar.close()


class Communication(Hook):
    """The run's totals ``uplink_mb`` and ``downlink_mb`` in the summary (see ``grid.Traffic``)."""

    def at_end(self, view: RoundView) -> dict[str, Any]:
        return self.setup.grid.traffic.megabytes()


class ForgettingPlot(Hook):
    """``plots/forgetting.png``: accuracy per task over rounds (and the probes beside it, where they ran)."""

    def finished(self, view: RoundView) -> None:
        from simulator.plot import plot_forgetting  # matplotlib loads only where a run finishes: not a cycle

        plot_forgetting(
            self.setup.outputs.records,
            self.setup.outputs.path / "plots" / "forgetting.png",
            title=f"{self.setup.config.scenario} / {type(view.strategy).__name__}",
        )
