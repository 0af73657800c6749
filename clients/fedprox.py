"""FedProx's client (Li et al., "Federated Optimization in Heterogeneous Networks", 2020).

Local SGD on ``loss + mu/2 * ||w - w_global||^2``. The gradient of the
proximal term, ``mu * (w - w_global)``, is added after backward instead of
building the term into the graph: same update, no extra autograd work.
``mu`` comes from the ``proximal-mu`` value Flower's FedProx strategy sends;
with a strategy that sends none, ``client.fedprox.proximal_mu`` applies.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
from torch import nn

from clients.base import ClientMethod, TrainContext
from simulator.protocol import PROXIMAL_MU


@dataclass(frozen=True)
class FedProxSettings:
    proximal_mu: float = 0.0  # mu when the strategy sends none

    def problems(self) -> list[tuple[str, str]]:
        return [("proximal_mu", "must be >= 0")] if self.proximal_mu < 0 else []


class FedProxClient(ClientMethod):
    """Local SGD pulled towards the round's global weights."""

    Settings = FedProxSettings
    section = "fedprox"

    def begin(self, model: nn.Module, context: TrainContext) -> None:
        self.mu = float(context.config.get(PROXIMAL_MU, self.settings.proximal_mu))
        self.anchor = [p.detach().clone() for p in model.parameters()]

    def adjust_gradients(self, model: nn.Module, context: TrainContext) -> None:
        if self.mu == 0.0:
            return
        with torch.no_grad():
            for param, anchor in zip(model.parameters(), self.anchor):
                param.grad.add_(param - anchor, alpha=self.mu)
