"""Users' strategies with state between rounds: declared for checkpoints or not, of several kinds."""

import threading
from typing import Any

import numpy as np
import torch
from flwr.serverapp.strategy import FedAvg


class CountsRoundsSilently(FedAvg):
    """FedAvg that counts its aggregations and scales the learning rate by them, without declaring the count."""

    def __init__(self, **kwargs: Any) -> None:
        super().__init__(**kwargs)
        self.aggregations = 0

    def configure_train(self, server_round, arrays, config, grid):
        config["lr"] = 0.1 / (1 + self.aggregations)
        return super().configure_train(server_round, arrays, config, grid)

    def aggregate_train(self, server_round, replies):
        self.aggregations += 1
        return super().aggregate_train(server_round, replies)


class CountsRounds(CountsRoundsSilently):
    """The same, with its count declared (simulator.protocol.StatefulStrategy)."""

    def checkpoint_state(self) -> dict[str, Any]:
        return {"aggregations": self.aggregations}

    def restore_state(self, state: dict[str, Any], arrays) -> None:
        if not isinstance(state["aggregations"], int) or state["aggregations"] < 0:
            raise ValueError(f"aggregations = {state['aggregations']!r}: expected an integer >= 0")
        self.aggregations = state["aggregations"]


class DrawsFromItsOwnGenerator(FedAvg):
    """FedAvg that draws from its own numpy Generator each round: the Generator's state changes."""

    def __init__(self, **kwargs: Any) -> None:
        super().__init__(**kwargs)
        self.generator = np.random.default_rng(0)

    def aggregate_train(self, server_round, replies):
        self.generator.random()
        return super().aggregate_train(server_round, replies)


class CountsInATensor(FedAvg):
    """FedAvg that counts its aggregations in a torch tensor, in place."""

    def __init__(self, **kwargs: Any) -> None:
        super().__init__(**kwargs)
        self.count = torch.zeros(())

    def aggregate_train(self, server_round, replies):
        self.count += 1
        return super().aggregate_train(server_round, replies)


class KeepsNumpyScalars(FedAvg):
    """FedAvg that keeps numpy scalars of its last aggregate, declared as they are or as Python numbers, and a
    bfloat16 buffer it never changes."""

    def __init__(self, **kwargs: Any) -> None:
        super().__init__(**kwargs)
        self.mean_weight = np.float64(0.0)
        self.largest = np.float64(0.0)
        self.all_finite = np.bool_(True)
        self.buffer = torch.zeros(4, dtype=torch.bfloat16)

    def aggregate_train(self, server_round, replies):
        arrays, metrics = super().aggregate_train(server_round, replies)
        first = arrays.to_numpy_ndarrays()[0].astype(np.float64)  # a float32 scalar would not be a Python float
        self.mean_weight, self.largest, self.all_finite = np.mean(first), np.max(first), np.isfinite(first).all()
        return arrays, metrics

    def checkpoint_state(self) -> dict[str, Any]:
        return {"mean_weight": self.mean_weight, "largest": float(self.largest), "all_finite": self.all_finite}

    def restore_state(self, state: dict[str, Any], arrays) -> None:
        self.mean_weight, self.largest, self.all_finite = state["mean_weight"], state["largest"], state["all_finite"]


class HoldsALock(FedAvg):
    """FedAvg holding what cannot be copied."""

    def __init__(self, **kwargs: Any) -> None:
        super().__init__(**kwargs)
        self.lock = threading.Lock()
