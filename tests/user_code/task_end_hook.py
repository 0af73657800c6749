"""A user's end-of-task metric hook, named by dotted path in ``eval.hooks``: the global weights' norm."""

from __future__ import annotations

from typing import Any

from simulator.hooks import Hook, RoundView, RunSetup

BUILT: list[TaskEndMetric] = []  # every instance the engine built, for the test to inspect


class TaskEndMetric(Hook):
    """The global weights' norm at every task end, and every record it was told of."""

    def __init__(self, setup: RunSetup) -> None:
        super().__init__(setup)
        self.logged: list[tuple[int, dict[str, Any] | None]] = []
        self.closed = False
        BUILT.append(self)

    def at_task_end(self, view: RoundView) -> dict[str, Any]:
        return {"weight_norm": float(sum((a**2).sum() for a in view.arrays.to_numpy_ndarrays())) ** 0.5}

    def after_log(self, view: RoundView, record: dict[str, Any] | None) -> None:
        self.logged.append((view.server_round, record))

    def at_end(self, view: RoundView) -> dict[str, Any]:
        return {"tasks_seen_by_hook": sum(1 for _, r in self.logged if r and "weight_norm" in r)}

    def close(self) -> None:
        self.closed = True


class RoundsSeen(Hook):
    """The least a hook can be: one point, no constructor of its own."""

    def at_end(self, view: RoundView) -> dict[str, Any]:
        return {"rounds_seen_by_hook": view.server_round - self.setup.first_round + 1}
