"""A user's strategies that keep a count between rounds: one declares it for checkpoints, one does not."""

from typing import Any

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
