"""SCAFFOLD's client: Karimireddy et al. 2020, "SCAFFOLD: Stochastic Controlled Averaging for Federated
Learning" (ICML), option II of its Algorithm 1.

Each local step follows ``g - c_i + c`` instead of the gradient ``g``: ``c`` is the
server's control variate (the round's payload, ``strategies/scaffold.py``) and
``c_i`` the client's own, kept as its state. After ``K`` steps of size ``lr``
from the global weights ``x`` to ``y_i`` the client's control variate becomes
``c_i+ = c_i - c + (x - y_i) / (K lr)``. The server needs ``c_i+ - c_i`` for its
own update; it is a function of what it already has (``x``, ``y_i``, ``c``) and
``K lr``, which the client reports as the metric ``scaffold_step_sum``, so the
uplink carries the weights only.

The paper's steps are plain SGD. With heavy-ball momentum ``beta`` (``client.momentum``)
a constant gradient moves the weights ``lr (1 - beta^k) / (1 - beta)`` at step ``k``,
not ``lr``; ``K lr`` is that sum here, so ``(x - y_i) / (K lr)`` stays the mean
corrected gradient (counted as ``K lr`` it overstates it up to ``1 / (1 - beta)``
times, and the control variates diverge: 10x at the default momentum 0.9). Weight
decay is left out of the sum, as of the paper.
"""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any, ClassVar

import numpy as np
import torch
from torch import nn

from clients.base import ClientMethod, TrainContext, flat_parameters, parameter_views

STEP_SUM = "scaffold_step_sum"  # the metric: K * lr, the sum of the client's local step sizes this round


class ScaffoldClient(ClientMethod):
    """Local SGD with each gradient corrected by ``c - c_i``; the client's ``c_i`` is its state."""

    server_half: ClassVar[str] = "scaffold"

    def begin(self, model: nn.Module, context: TrainContext) -> None:
        names = [name for name, _ in model.named_parameters()]
        missing = [name for name in names if name not in context.payload]
        if missing:
            raise ValueError(
                f"SCAFFOLD's client got no server control variate for {missing[:3]}: run it with strategy=scaffold"
            )
        own = (
            parameter_views(context.state["control"], model)
            if "control" in context.state
            else [torch.zeros_like(p) for p in model.parameters()]
        )
        self.correction = [context.payload[name] - mine for name, mine in zip(names, own)]
        self.start, self.steps, self.step_sum = flat_parameters(model), 0, 0.0  # the global weights x

    def adjust_gradients(self, model: nn.Module, context: TrainContext) -> None:
        for param, correction in zip(model.parameters(), self.correction):
            if param.grad is not None:
                param.grad.add_(correction)
        self.steps += 1
        momentum = self.config.momentum  # the step's reach on a constant gradient, velocity restarted this round
        self.step_sum += context.lr * ((1 - momentum**self.steps) / (1 - momentum) if momentum else 1.0)

    def end(self, model: nn.Module, context: TrainContext) -> dict[str, float]:
        return {STEP_SUM: self.step_sum}

    def new_state(self, model: nn.Module, context: TrainContext) -> Mapping[str, Any] | None:
        """``c_i+ = c_i - c + (x - y_i) / (K lr)``, i.e. ``(x - y_i) / (K lr) - correction``; unchanged
        where the client moved nothing (no samples, or a learning rate of 0)."""
        if self.step_sum == 0:
            return context.state
        drift = (self.start - flat_parameters(model)) / self.step_sum
        correction = torch.cat([c.reshape(-1) for c in self.correction]).cpu().numpy()
        return {**context.state, "control": (drift - correction).astype(np.float32)}
