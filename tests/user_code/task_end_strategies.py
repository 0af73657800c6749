"""Users' FedAvg subclasses whose task-end step goes wrong: it raises, or returns what is no model."""

from __future__ import annotations

from flwr.serverapp.strategy import FedAvg


class RaisesAtTaskEnd(FedAvg):
    def on_task_end(self, task, arrays, grid):
        raise ValueError(f"no basis for task {task}")


class ReturnsADict(FedAvg):
    def on_task_end(self, task, arrays, grid):
        return {"head.weight": 0}
