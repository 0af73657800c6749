"""Online EWC: Kirkpatrick et al. 2017, "Overcoming catastrophic forgetting in neural networks",
in the online form of Schwarz et al. 2018, "Progress & Compress".

When a client moves to a new task, it estimates the diagonal of the Fisher
information of the task it left (the empirical Fisher: squared gradients of
each sample's log-likelihood, at the global weights it now holds), adds it to
its running Fisher decayed by ``gamma``, and anchors at those weights. Its
training then minimises the loss plus ``strength / 2 * sum F (w - anchor)^2``.

The anchor and the Fisher are taken at the global model of the client's first
round on the new task (the weights it then holds), not at the last round of
the old one: a client that skipped rounds comes back to a model that has
already moved on.

The penalty is stiff: its explicit gradient step diverges once
``lr * strength * F > 2`` for some weight (at lr 0.05 and the Fisher of a few
digits tasks, from strength 10). So each gradient becomes
``(g + strength * F * (w - anchor)) / (1 + lr * strength * F)``: for plain SGD
exactly the step that takes the task gradient explicitly and the penalty
implicitly (its proximal step), stable for any strength, and the usual
gradient where ``lr * strength * F`` is small. The Fisher and the anchor are
the client's state: two copies of the model's parameters.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np
import torch
from torch import nn
from torch.nn import functional as F

from clients.base import ClientMethod, TrainContext, flat_parameters, masked, parameter_views
from simulator.protocol import ClientState


@dataclass(frozen=True)
class EWCSettings:
    strength: float = 1000.0  # lambda: the weight of the quadratic penalty
    gamma: float = 1.0  # the old Fisher's decay at each new task (online EWC)
    fisher_samples: int = 200  # samples of the task just left used to estimate its Fisher

    def problems(self) -> list[tuple[str, str]]:
        checks = [
            ("strength", self.strength >= 0, "must be >= 0"),
            ("gamma", 0 <= self.gamma <= 1, "must be in [0, 1]"),
            ("fisher_samples", self.fisher_samples >= 1, "must be at least 1"),
        ]
        return [(key, reason) for key, ok, reason in checks if not ok]


class EWCClient(ClientMethod):
    """Local SGD held near the weights that mattered for the client's earlier tasks."""

    Settings = EWCSettings
    section = "ewc"

    def begin_task(self, model: nn.Module, context: TrainContext) -> ClientState | None:
        if context.previous is None:
            return None
        indices = context.previous.indices
        order = torch.randperm(len(indices), generator=context.generator)[: self.settings.fisher_samples]
        batch = context.samples(indices[order.numpy()], context.previous.task)
        fisher = [torch.zeros_like(p) for p in model.parameters()]  # frozen parameters keep 0
        trained = [(p, f) for p, f in zip(model.parameters(), fisher) if p.requires_grad]
        model.eval()
        for i in range(len(batch.y)):  # one sample at a time: the Fisher squares per-sample gradients
            log_likelihood = -F.cross_entropy(masked(model(batch.x[i : i + 1]), batch.mask), batch.y[i : i + 1])
            grads = torch.autograd.grad(log_likelihood, [p for p, _ in trained], allow_unused=True)
            for (_, total), grad in zip(trained, grads):
                if grad is not None:
                    total += grad**2
        new = torch.cat([f.flatten() for f in fisher]).cpu().numpy() / max(len(batch.y), 1)
        old = context.state.get("fisher")
        fisher = new if old is None else (self.settings.gamma * old + new).astype(np.float32)
        return {**context.state, "fisher": fisher, "anchor": flat_parameters(model)}

    def begin(self, model: nn.Module, context: TrainContext) -> None:
        self.penalty = None
        if "fisher" in context.state:
            self.penalty = list(
                zip(parameter_views(context.state["fisher"], model), parameter_views(context.state["anchor"], model))
            )

    def adjust_gradients(self, model: nn.Module, context: TrainContext) -> None:
        if self.penalty is None:
            return
        with torch.no_grad():
            for param, (fisher, anchor) in zip(model.parameters(), self.penalty):
                if param.grad is not None:
                    param.grad.addcmul_(fisher, param - anchor, value=self.settings.strength)
                    param.grad.div_(1 + context.lr * self.settings.strength * fisher)

    def end(self, model: nn.Module, context: TrainContext) -> dict[str, float]:
        if self.penalty is None:
            return {"ewc_penalty": 0.0}
        with torch.no_grad():
            total = sum(float((f * (p - a) ** 2).sum()) for p, (f, a) in zip(model.parameters(), self.penalty))
        return {"ewc_penalty": 0.5 * self.settings.strength * total}
