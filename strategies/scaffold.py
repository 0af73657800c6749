"""SCAFFOLD: Karimireddy et al. 2020, "SCAFFOLD: Stochastic Controlled Averaging for Federated Learning"
(ICML); the server half of option II (the client half: ``clients/scaffold.py``).

The server keeps a control variate ``c`` (one array per parameter, zero at the
start) and sends it with every train message as the round's payload
(``strategies.payload``). Clients correct each local step by ``c - c_i``. After
the round, with ``x`` the global weights sent, ``y_i`` a client's trained
weights and ``K lr`` the sum of its step sizes (its ``scaffold_step_sum``
metric), the client's control variate moved by ``c_i+ - c_i = (x - y_i) / (K lr)
- c``, and the server's moves by the sum of those over the cohort divided by
the number of clients present (``c += |S|/N mean_i (c_i+ - c_i)``). The model is
aggregated as FedAvg does (weighted by examples; the paper's global step size
1). A client with no samples took no step and changes no control variate.
"""

from __future__ import annotations

from collections.abc import Iterable
from typing import Any, ClassVar

import numpy as np
from flwr.app import ArrayRecord, ConfigRecord, Message, MetricRecord
from flwr.serverapp import Grid
from flwr.serverapp.strategy import FedAvg

from simulator.protocol import REPLY_ARRAYS, REPLY_METRICS
from strategies.payload import add_payload
from strategies.state import expect_keys, float_array

STEP_SUM = "scaffold_step_sum"  # the client's metric: K * lr


class Scaffold(FedAvg):
    """FedAvg with SCAFFOLD's server control variate, sent to clients as the round's payload."""

    client_half: ClassVar[str] = "scaffold"

    def __init__(self, *args: Any, **kwargs: Any) -> None:
        super().__init__(*args, **kwargs)
        self.control: dict[str, np.ndarray] | None = None  # c, by parameter name (None: zero, not yet sized)
        self._sent: tuple[dict[str, np.ndarray], int] | None = None  # this round's x and clients present

    def configure_train(
        self, server_round: int, arrays: ArrayRecord, config: ConfigRecord, grid: Grid
    ) -> Iterable[Message]:
        weights = dict(zip(arrays.keys(), arrays.to_numpy_ndarrays()))
        if self.control is None:
            self.control = {name: np.zeros_like(array, dtype=np.float32) for name, array in weights.items()}
        self._sent = weights, len(list(grid.get_node_ids()))
        return add_payload(super().configure_train(server_round, arrays, config, grid), self.control)

    def aggregate_train(
        self, server_round: int, replies: Iterable[Message]
    ) -> tuple[ArrayRecord | None, MetricRecord | None]:
        replies = list(replies)
        assert self._sent is not None and self.control is not None, "aggregate_train before configure_train"
        (sent, present), self._sent = self._sent, None
        moved = {name: np.zeros(array.shape, np.float64) for name, array in self.control.items()}
        for reply in replies:
            if reply.has_error() or not reply.content[REPLY_METRICS].get(STEP_SUM):
                continue
            step_sum = float(reply.content[REPLY_METRICS][STEP_SUM])
            record = reply.content[REPLY_ARRAYS]
            for name, trained in zip(record.keys(), record.to_numpy_ndarrays()):
                moved[name] += (sent[name] - trained) / step_sum - self.control[name]
        self.control = {name: (self.control[name] + moved[name] / present).astype(np.float32) for name in moved}
        return super().aggregate_train(server_round, replies)

    def checkpoint_state(self) -> dict[str, Any]:
        """The server's control variate (simulator.protocol.StatefulStrategy)."""
        return {"control": self.control}

    def restore_state(self, state: dict[str, Any], arrays: ArrayRecord) -> None:
        expect_keys(state, {"control"}, "SCAFFOLD's state")
        if state["control"] is None:
            return
        expect_keys(state["control"], set(arrays.keys()), "SCAFFOLD's control variate")
        self.control = {
            name: float_array(value, arrays[name].shape, f"the control variate of {name}").astype(np.float32)
            for name, value in state["control"].items()
        }
