"""FedProx's client (Li et al., "Federated Optimization in Heterogeneous Networks", 2020).

Local SGD on ``loss + mu/2 * ||w - w_global||^2``. The gradient of the
proximal term, ``mu * (w - w_global)``, is added after backward instead of
building the term into the graph: same update, no extra autograd work.
``mu`` comes from the ``proximal-mu`` value Flower's FedProx strategy sends;
with a strategy that sends none, ``client.proximal_mu`` applies.
"""

from __future__ import annotations

import torch
from torch import nn

from clients.base import ClientMethod, TrainContext
from simulator.keys import PROXIMAL_MU


class FedProxClient(ClientMethod):
    """Local SGD pulled towards the round's global weights."""

    def begin(self, model: nn.Module, context: TrainContext) -> None:
        self.mu = float(context.config.get(PROXIMAL_MU, self.cfg.proximal_mu))
        self.anchor = [p.detach().clone() for p in model.parameters()]

    def adjust_gradients(self, model: nn.Module) -> None:
        if self.mu == 0.0:
            return
        with torch.no_grad():
            for param, anchor in zip(model.parameters(), self.anchor):
                param.grad.add_(param - anchor, alpha=self.mu)
