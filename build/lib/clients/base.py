"""The interface every client-side training method implements, and plain local SGD.

A method trains the actor's one reused model in place on one client's data.
Per-round facts arrive in a frozen :class:`TrainContext`; randomness only from
the generator in it, so a client's result does not depend on which actor ran it.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

import torch
from torch import nn

from simulator.config import ClientConfig


@dataclass(frozen=True)
class TrainContext:
    """What a client knows about this round."""

    server_round: int
    client_id: int
    config: dict[str, Any]  # the strategy's ConfigRecord for this client
    generator: torch.Generator  # seeded from (run seed, round, client id)
    class_mask: torch.Tensor | None = None  # task-incremental: the labels logits may take


@dataclass(frozen=True)
class LocalResult:
    """What local training reports besides the weights left in the model."""

    num_examples: int
    train_loss: float


def masked(logits: torch.Tensor, class_mask: torch.Tensor | None) -> torch.Tensor:
    """``logits`` with labels outside ``class_mask`` ruled out (task-incremental heads)."""
    if class_mask is None:
        return logits
    return logits.masked_fill(~class_mask, float("-inf"))


@torch.no_grad()
def sgd_step(params: list[torch.Tensor], velocity: dict[int, torch.Tensor], cfg: ClientConfig) -> None:
    """One step of SGD with momentum and weight decay, as ``torch.optim.SGD`` takes it.

    Written out because constructing a ``torch.optim`` optimizer imports
    ``torch._dynamo`` on first use: seconds in every fresh actor process.
    ``velocity`` maps a parameter's position to its momentum buffer; parameters
    without a gradient (frozen) are skipped.
    """
    for i, param in enumerate(params):
        if param.grad is None:
            continue
        step = param.grad if cfg.weight_decay == 0 else param.grad.add(param, alpha=cfg.weight_decay)
        if cfg.momentum:
            if i in velocity:
                step = velocity[i].mul_(cfg.momentum).add_(step)
            else:
                velocity[i] = step.clone()
        param.add_(step, alpha=-cfg.lr)


class ClientMethod:
    """Minibatch SGD over ``epochs`` passes; subclasses add to the gradient.

    Subclasses override :meth:`begin` (called once before the first step, with
    the global weights still in the model) and :meth:`adjust_gradients` (called
    after each backward pass), and nothing else.
    """

    def __init__(self, cfg: ClientConfig) -> None:
        self.cfg = cfg
        self.loss_fn = nn.CrossEntropyLoss()

    def begin(self, model: nn.Module, context: TrainContext) -> None:
        """Prepare for one client's training; the model holds the global weights."""

    def adjust_gradients(self, model: nn.Module) -> None:
        """Change the gradients after backward, before the optimizer step."""

    def train(
        self, model: nn.Module, x: torch.Tensor, y: torch.Tensor, context: TrainContext
    ) -> LocalResult:
        """Train ``model`` in place on ``(x, y)``; return the example count and mean loss."""
        self.begin(model, context)
        params = list(model.parameters())
        velocity: dict[int, torch.Tensor] = {}
        model.train()
        total_loss, steps = torch.zeros((), device=x.device), 0
        for _ in range(self.cfg.epochs):
            order = torch.randperm(len(y), generator=context.generator)
            for batch in order.split(self.cfg.batch_size):
                for param in params:
                    param.grad = None
                loss = self.loss_fn(masked(model(x[batch]), context.class_mask), y[batch])
                loss.backward()
                self.adjust_gradients(model)
                sgd_step(params, velocity, self.cfg)
                total_loss += loss.detach()
                steps += 1
        return LocalResult(num_examples=len(y), train_loss=float(total_loss) / max(steps, 1))
