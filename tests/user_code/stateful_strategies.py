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


class KeepsANumpyScalar(FedAvg):
    """FedAvg that keeps the mean of its last aggregated weights, a numpy scalar, declared as its state."""

    def __init__(self, **kwargs: Any) -> None:
        super().__init__(**kwargs)
        self.mean_weight = np.float64(0.0)

    def aggregate_train(self, server_round, replies):
        arrays, metrics = super().aggregate_train(server_round, replies)
        self.mean_weight = np.mean(arrays.to_numpy_ndarrays()[0])
        return arrays, metrics

    def checkpoint_state(self) -> dict[str, Any]:
        return {"mean_weight": self.mean_weight}

    def restore_state(self, state: dict[str, Any], arrays) -> None:
        self.mean_weight = state["mean_weight"]


class HoldsALock(FedAvg):
    """FedAvg holding what cannot be copied."""

    def __init__(self, **kwargs: Any) -> None:
        super().__init__(**kwargs)
        self.lock = threading.Lock()
