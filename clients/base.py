"""The interface every client-side training method implements, and its plain SGD loop.

One method object serves every client its worker trains, one client at a time,
and a client may train on a different actor each round. So nothing that must
outlive one :meth:`ClientMethod.train` call lives on ``self``: a client's
memory (a replay buffer, a Fisher diagonal, a teacher) goes in
``context.state``, which the driver keeps by client id, sends in with the
client's job and stores again when the job returns (DESIGN.md, "Client state").
Values a method sets on ``self`` in :meth:`ClientMethod.begin` are scratch for
the client in training now.

Per-round facts arrive in a frozen :class:`TrainContext`; randomness only from
the generator in it, so a client's result does not depend on which actor ran it.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any, ClassVar

import numpy as np
import torch
from torch import nn
from torch.nn import functional as F

from clients.queries import QUERIES, Query
from simulator.config import ClientConfig

ClientState = dict[str, Any]  # numpy arrays, Python scalars and strings, by name


@dataclass(frozen=True)
class NoSettings:
    """The settings of a method that has none of its own."""


@dataclass(frozen=True)
class Batch:
    """A minibatch: inputs, labels and the mask its logits are restricted to.

    ``mask`` is None, one mask over the labels for the whole batch, or one
    row per sample (replayed samples of other task-incremental tasks).
    """

    x: torch.Tensor
    y: torch.Tensor
    mask: torch.Tensor | None = None


@dataclass(frozen=True)
class PreviousTask:
    """The task a client trained on before its live one, as it left it."""

    task: int
    indices: np.ndarray  # into the stream's training arrays: the client's data in its last round there


@dataclass(frozen=True)
class TrainContext:
    """What a client knows about this round."""

    server_round: int
    client_id: int
    config: dict[str, Any]  # the strategy's ConfigRecord for this client
    generator: torch.Generator  # seeded from (run seed, round, client id)
    lr: float  # this round's learning rate: the strategy's "lr" where it sends one, else client.lr
    task: int = 0  # the client's live task (its own schedule where it has one)
    state: ClientState = field(default_factory=dict)  # what the method leaves here is kept for the client
    samples: Callable[[np.ndarray, np.ndarray | int], Batch] | None = None  # stored samples by index
    new_task: bool = False  # the client's first round on ``task``: begin_task runs first
    previous: PreviousTask | None = None  # with new_task: the task it left (None: its first task)
    class_mask: torch.Tensor | None = None  # task-incremental: the labels logits may take


@dataclass(frozen=True)
class LocalResult:
    """What local training reports besides the weights left in the model."""

    num_examples: int
    train_loss: float
    metrics: dict[str, float]  # the method's own, sent to the strategy with the reply


def masked(logits: torch.Tensor, class_mask: torch.Tensor | None) -> torch.Tensor:
    """``logits`` with labels outside ``class_mask`` ruled out (task-incremental heads)."""
    if class_mask is None:
        return logits
    return logits.masked_fill(~class_mask, float("-inf"))


@torch.no_grad()
def sgd_step(params: list[torch.Tensor], velocity: dict[int, torch.Tensor], cfg: ClientConfig, lr: float) -> None:
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
        param.add_(step, alpha=-lr)


class ClientMethod:
    """Minibatch SGD over ``client.epochs`` passes, with hooks for what a method adds.

    A subclass overrides only the hooks it needs, in the order they run:

    - :meth:`begin_task`: the client's first round on a new task, with the task
      it left in ``context.previous`` and the global weights in the model;
    - :meth:`begin`: once per round, before the first step;
    - :meth:`prepare_batch`: each minibatch, before the forward pass (add samples);
    - :meth:`loss`: the loss of a batch (add terms);
    - :meth:`adjust_gradients`: after each backward pass (add gradient terms);
    - :meth:`end`: after the last step; returns the method's own metrics.

    :meth:`fit` is the optimisation between ``begin`` and ``end`` (all
    parameters, ``client.epochs`` passes); a method that trains parts of the
    model in turn overrides it, calling :meth:`run_epochs` per part.

    Its hyperparameters are ``Settings``, a frozen dataclass read from the
    config section ``client.<section>`` (``section``: its short name, or for
    a user's method the class's ``section`` attribute, by default the class
    name). A ``problems()`` method on the dataclass may name impossible values.
    """

    Settings: ClassVar[type] = NoSettings
    section: ClassVar[str | None] = None  # None: the class name
    # Prefixes of state_dict names each client keeps for itself (a personal head: "head."):
    # they are never sent to the server, so the strategy aggregates only the rest.
    personal_prefixes: ClassVar[tuple[str, ...]] = ()

    def __init__(self, cfg: ClientConfig) -> None:
        self.cfg = cfg
        self.settings = self.Settings() if cfg.settings is None else cfg.settings

    def begin_task(self, model: nn.Module, context: TrainContext) -> None:
        """The client starts a new task; the model holds the global weights it now trains from."""

    def begin(self, model: nn.Module, context: TrainContext) -> None:
        """Prepare for this round's training; the model holds the global weights."""

    def prepare_batch(self, batch: Batch, context: TrainContext) -> Batch:
        """The batch to train on in place of ``batch`` (e.g. with replayed samples added)."""
        return batch

    def loss(self, model: nn.Module, batch: Batch, context: TrainContext) -> torch.Tensor:
        """The loss to minimise on ``batch``: cross-entropy over the allowed labels."""
        return F.cross_entropy(masked(model(batch.x), batch.mask), batch.y)

    def adjust_gradients(self, model: nn.Module, context: TrainContext) -> None:
        """Change the gradients after backward, before the step."""

    def end(self, model: nn.Module, context: TrainContext) -> dict[str, float]:
        """Finish the round (update ``context.state``); return metrics to send to the strategy."""
        return {}

    def answer(self, model: nn.Module, query: Query) -> dict[str, np.ndarray]:
        """Named arrays answering the server's ``query`` (``clients/queries.py``), the global weights in ``model``."""
        if query.name not in QUERIES:
            raise ValueError(f"query {query.name!r}: {type(self).__name__} answers {', '.join(sorted(QUERIES))}")
        return QUERIES[query.name](model, query)

    def personalize(self, model: nn.Module, state: ClientState) -> None:
        """Make ``model``, holding the global weights, the client's own (its personal layers from
        ``state``); evaluation of a client's model calls this, on the client and at the server."""

    def train(
        self, model: nn.Module, x: torch.Tensor, y: torch.Tensor, context: TrainContext
    ) -> LocalResult:
        """Train ``model`` in place on ``(x, y)``; return the example count, mean loss and metrics."""
        if context.new_task:
            self.begin_task(model, context)
        self.begin(model, context)
        mean_loss = self.fit(model, x, y, context)
        metrics = self.end(model, context)
        return LocalResult(len(y), mean_loss, metrics)

    def fit(self, model: nn.Module, x: torch.Tensor, y: torch.Tensor, context: TrainContext) -> float:
        """The round's optimisation: every parameter for ``client.epochs``; returns the mean loss."""
        return self.run_epochs(model, list(model.parameters()), x, y, context, self.cfg.epochs)

    def run_epochs(
        self, model: nn.Module, params: list[torch.Tensor], x: torch.Tensor, y: torch.Tensor,
        context: TrainContext, epochs: int,
    ) -> float:
        """``epochs`` passes of minibatch SGD on ``params`` (the others stay as they are); the mean loss."""
        velocity: dict[int, torch.Tensor] = {}
        model.train()
        total_loss, steps = torch.zeros((), device=x.device), 0
        for _ in range(epochs):
            order = torch.randperm(len(y), generator=context.generator)
            for positions in order.split(self.cfg.batch_size):
                batch = self.prepare_batch(Batch(x[positions], y[positions], context.class_mask), context)
                for param in model.parameters():
                    param.grad = None
                loss = self.loss(model, batch, context)
                loss.backward()
                self.adjust_gradients(model, context)
                sgd_step(params, velocity, self.cfg, context.lr)
                total_loss += loss.detach()
                steps += 1
        return float(total_loss) / max(steps, 1)


def shared_keys(model: nn.Module, method: type[ClientMethod]) -> list[str]:
    """The names of ``model``'s state that travel to the server: all but ``method``'s personal ones."""
    return [k for k in model.state_dict() if not k.startswith(method.personal_prefixes)]


def flat_parameters(model: nn.Module) -> np.ndarray:
    """The model's parameters as one float32 vector (for client state)."""
    return torch.nn.utils.parameters_to_vector(model.parameters()).detach().cpu().numpy()


def parameter_views(vector: np.ndarray, model: nn.Module) -> list[torch.Tensor]:
    """``vector`` (as :func:`flat_parameters` gives it) cut into tensors shaped like each parameter."""
    flat = torch.tensor(np.asarray(vector))  # a copy: state arrays arrive read-only
    views, start = [], 0
    for param in model.parameters():
        views.append(flat[start : start + param.numel()].view_as(param).to(param.device))
        start += param.numel()
    return views
