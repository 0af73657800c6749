"""The interface every client-side training method implements, and its plain SGD loop.

One method object serves every client its worker trains, one client at a time,
and a client may train on a different actor each round. So nothing that must
outlive one :meth:`ClientMethod.train` call lives on ``self``: a client's
memory (a replay buffer, a Fisher diagonal, a teacher) is its state, a value:
it arrives read-only in ``context.state`` (the driver keeps it by client id
and sends it in with the client's job), and a method returns the new one from
:meth:`ClientMethod.begin_task` (at a task change) or
:meth:`ClientMethod.new_state` (after the round); :meth:`ClientMethod.train`
hands it back in its :class:`LocalResult`, and the driver stores it again
(docs/architecture.md, "Client state"). Writing into ``context.state`` (the
way methods were written before) raises a ``TypeError`` that says so. Values a method sets on
``self`` in :meth:`ClientMethod.begin` are scratch for the client in
training now.

Per-round facts arrive in a frozen :class:`TrainContext`; randomness only from
the generator in it, so a client's result does not depend on which actor ran it.
"""

from __future__ import annotations

import contextlib
import copy
import dataclasses
from collections.abc import Callable, Iterable, Iterator, Mapping
from dataclasses import dataclass, field
from typing import Any, ClassVar, NoReturn

import numpy as np
import torch
from torch import nn
from torch.nn import functional as F

from clients.queries import QUERIES
from simulator.config import ClientConfig
from simulator.protocol import TRAIN_ONLY, PreviousTask, Query
from simulator.registry import NoSettings


class ReadOnlyState(dict):
    """A client's state as a method reads it: a dict that refuses writes, naming the way that works."""

    def _refuse(self, *args: Any, **kwargs: Any) -> NoReturn:
        raise TypeError(
            "a client's state in context.state is read-only: return the new state from begin_task "
            "(at a task change) or new_state (after the round), e.g. return {**context.state, 'key': value}"
        )

    __setitem__ = __delitem__ = __ior__ = update = pop = popitem = clear = setdefault = _refuse

    def __reduce__(self) -> tuple:  # a copy, a deep copy or a pickle is a plain (writable) dict
        return dict, (dict(self),)

    def __copy__(self) -> dict[str, Any]:
        return dict(self)

    def __deepcopy__(self, memo: dict[int, Any]) -> dict[str, Any]:
        return copy.deepcopy(dict(self), memo)


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
class TrainContext:
    """What a client knows about this round."""

    server_round: int
    client_id: int
    config: dict[str, Any]  # the strategy's ConfigRecord for this client
    generator: torch.Generator  # seeded from (run seed, round, client id)
    lr: float  # this round's learning rate: the strategy's "lr" where it sends one, else client.lr
    task: int = 0  # the client's live task (its own schedule where it has one)
    state: Mapping[str, Any] = field(default_factory=ReadOnlyState)  # the client's state (read-only)
    samples: Callable[[np.ndarray, np.ndarray | int], Batch] | None = None  # stored samples by index
    new_task: bool = False  # the client's first round on ``task``: begin_task runs first
    previous: PreviousTask | None = None  # with new_task: the task it left (None: its first task)
    class_mask: torch.Tensor | None = None  # task-incremental: the labels logits may take
    augment: Callable[[torch.Tensor], torch.Tensor] | None = None  # data.augment, drawing from this client's seed
    autocast: torch.dtype | None = None  # engine.amp: forward pass and loss under autocast to this type
    # The strategy's payload for the round (simulator.protocol.PAYLOAD_ARRAYS: a control variate, a teacher,
    # synthetic samples), by name, on the model's device, shared by the clients of a worker's call: never change
    # them in place (the worker fails the client that does).
    payload: Mapping[str, torch.Tensor] = field(default_factory=dict)

    def __post_init__(self) -> None:
        if not isinstance(self.state, ReadOnlyState):  # however the context was built, its state is read-only
            object.__setattr__(self, "state", ReadOnlyState(self.state))


@dataclass(frozen=True)
class LocalResult:
    """What local training reports besides the weights left in the model."""

    num_examples: int
    train_loss: float
    metrics: dict[str, float]  # the method's own, sent to the strategy with the reply
    state: Mapping[str, Any] | None = None  # the client's new state, kept for its next round (None: unchanged)


def masked(logits: torch.Tensor, class_mask: torch.Tensor | None) -> torch.Tensor:
    """``logits`` with labels outside ``class_mask`` ruled out (task-incremental heads)."""
    if class_mask is None:
        return logits
    return logits.masked_fill(~class_mask, float("-inf"))


@torch.no_grad()
def sgd_step(params: list[torch.Tensor], velocity: dict[int, torch.Tensor], config: ClientConfig, lr: float) -> None:
    """One step of SGD with momentum and weight decay, as ``torch.optim.SGD`` takes it.

    Written out because constructing a ``torch.optim`` optimizer imports
    ``torch._dynamo`` on first use: seconds in every fresh actor process.
    ``velocity`` maps a parameter's position to its momentum buffer; parameters
    without a gradient (frozen) are skipped.
    """
    for i, param in enumerate(params):
        if param.grad is None:
            continue
        step = param.grad if config.weight_decay == 0 else param.grad.add(param, alpha=config.weight_decay)
        if config.momentum:
            if i in velocity:
                step = velocity[i].mul_(config.momentum).add_(step)
            else:
                velocity[i] = step.clone()
        param.add_(step, alpha=-lr)


def autocast(dtype: torch.dtype | None, device: torch.device) -> contextlib.AbstractContextManager:
    """Autocast to ``dtype`` on ``device``'s type; None: nothing (a disabled ``torch.autocast`` still costs
    microseconds a step, which a small model's step would notice). The weights, their gradients and the
    optimiser step stay float32, so what is sent and aggregated is float32."""
    return contextlib.nullcontext() if dtype is None else torch.autocast(device.type, dtype=dtype)


class ClientMethod:
    """Minibatch SGD over ``client.epochs`` passes, with hooks for what a method adds.

    A subclass overrides only the hooks it needs, in the order they run:

    - :meth:`begin_task`: the client's first round on a new task, with the task
      it left in ``context.previous`` and the global weights in the model;
      returns the client's state from now on (None: unchanged);
    - :meth:`begin`: once per round, before the first step;
    - :meth:`prepare_batch`: each minibatch, before the forward pass (add samples); the batch it returns
      is then augmented where ``data.augment`` asks (``context.augment``);
    - :meth:`loss`: the loss of a batch (add terms);
    - :meth:`adjust_gradients`: after each backward pass (add gradient terms);
    - :meth:`end`: after the last step; returns the method's own metrics;
    - :meth:`new_state`: the state to keep for the client (default: as it came).

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

    def __init__(self, config: ClientConfig) -> None:
        self.config = config
        self.settings = self.Settings() if config.settings is None else config.settings

    def begin_task(self, model: nn.Module, context: TrainContext) -> Mapping[str, Any] | None:
        """The client starts a new task, the model holding the global weights it now trains from;
        the client's state from now on (None: unchanged), which the round then trains with."""
        return None

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
        """Finish the round; return metrics to send to the strategy."""
        return {}

    def new_state(self, model: nn.Module, context: TrainContext) -> Mapping[str, Any] | None:
        """The client's state to keep after this round, its training done (default: as it came; None too)."""
        return context.state

    def answer(self, model: nn.Module, query: Query) -> dict[str, np.ndarray]:
        """Named arrays answering the server's ``query`` (``clients/queries.py``), the global weights in
        ``model`` and the client's state in ``query.state``: the handler its name (or dotted path) names."""
        return QUERIES.resolve(query.name)(model, query)

    def personalize(self, model: nn.Module, state: Mapping[str, Any]) -> None:
        """Make ``model``, holding the global weights, the client's own (its personal layers from
        ``state``); evaluation of a client's model calls this, on the client and at the server."""

    def train(self, model: nn.Module, x: torch.Tensor, y: torch.Tensor, context: TrainContext) -> LocalResult:
        """Train ``model`` in place on ``(x, y)``; return the example count, mean loss, metrics and new state.

        A client with no samples this round trains nothing: :meth:`fit` is skipped, the model keeps
        the global weights, and it reports 0 examples and a loss of 0.0 (a weighting strategy gives
        it weight 0). Every other hook still runs, so its reply carries the same metrics as the others'.
        """
        if context.new_task and (state := self.begin_task(model, context)) is not None:
            context = dataclasses.replace(context, state=ReadOnlyState(state))
        self.begin(model, context)
        mean_loss = self.fit(model, x, y, context) if len(y) else 0.0
        metrics = self.end(model, context)
        state = self.new_state(model, context)
        return LocalResult(len(y), mean_loss, metrics, context.state if state is None else state)

    def fit(self, model: nn.Module, x: torch.Tensor, y: torch.Tensor, context: TrainContext) -> float:
        """The round's optimisation: every parameter for ``client.epochs``; returns the mean loss."""
        return self.run_epochs(model, list(model.parameters()), x, y, context, self.config.epochs)

    def run_epochs(
        self,
        model: nn.Module,
        params: list[torch.Tensor],
        x: torch.Tensor,
        y: torch.Tensor,
        context: TrainContext,
        epochs: int,
    ) -> float:
        """``epochs`` passes of minibatch SGD on ``params`` (the others stay as they are: no gradient is
        computed for them); the mean loss (0.0 where there are no samples: no step is taken).

        Where the strategy's train config names ``TRAIN_ONLY`` prefixes, only the parameters of ``params``
        under them train, and the modules outside them run in eval mode (a frozen encoder's batch norm
        keeps the global statistics).
        """
        if len(y) == 0:  # a batch of nothing has a NaN loss
            return 0.0
        prefixes = train_only(context.config)
        if prefixes:
            names = {id(param): name for name, param in model.named_parameters()}
            params = [param for param in params if names[id(param)].startswith(prefixes)]
        velocity: dict[int, torch.Tensor] = {}
        total_loss, steps = torch.zeros((), device=x.device), 0
        with only_these_trained(model, params):
            train_mode(model, prefixes)
            for _ in range(epochs):
                order = torch.randperm(len(y), generator=context.generator)
                for positions in order.split(self.config.batch_size):
                    batch = self.prepare_batch(Batch(x[positions], y[positions], context.class_mask), context)
                    if context.augment is not None:
                        batch = dataclasses.replace(batch, x=context.augment(batch.x))
                    for param in model.parameters():
                        param.grad = None
                    with autocast(context.autocast, x.device):
                        loss = self.loss(model, batch, context)
                    loss.backward()
                    self.adjust_gradients(model, context)
                    sgd_step(params, velocity, self.config, context.lr)
                    total_loss += loss.detach()
                    steps += 1
        return float(total_loss) / max(steps, 1)


def train_only(config: Mapping[str, Any]) -> tuple[str, ...]:
    """The parameter-name prefixes a train config's ``TRAIN_ONLY`` names (comma-separated); () for all."""
    value = config.get(TRAIN_ONLY)
    return () if value is None else tuple(prefix.strip() for prefix in str(value).split(",") if prefix.strip())


def train_mode(model: nn.Module, prefixes: tuple[str, ...]) -> None:
    """``model`` in train mode, but for the modules outside ``prefixes`` (none: all in train mode), which run in
    eval mode: a module neither under a prefix nor holding one (a frozen encoder's batch norm)."""
    model.train()
    for name, module in model.named_modules():
        outside = not f"{name}.".startswith(prefixes) and not any(p.startswith(f"{name}.") for p in prefixes)
        if prefixes and name and outside:
            module.eval()


@contextlib.contextmanager
def only_these_trained(model: nn.Module, params: list[torch.Tensor]) -> Iterator[None]:
    """In the block, every parameter of ``model`` not in ``params`` is frozen (no gradient is computed for it);
    a parameter the model froze itself stays frozen. A ValueError where ``params`` leaves nothing to train."""
    trainable = {id(p) for p in params}
    was = [(param, param.requires_grad) for param in model.parameters()]
    if not any(requires_grad and id(param) in trainable for param, requires_grad in was):
        raise ValueError("nothing to train: no trainable parameter is left (a train-only prefix matching none?)")
    for param, requires_grad in was:
        param.requires_grad_(requires_grad and id(param) in trainable)
    try:
        yield
    finally:
        for param, requires_grad in was:
            param.requires_grad_(requires_grad)


def shared_keys(model: nn.Module, method: type[ClientMethod]) -> list[str]:
    """The names of ``model``'s state that travel to the server: all but ``method``'s personal ones."""
    return [k for k in model.state_dict() if not k.startswith(method.personal_prefixes)]


def flat_parameters(model: nn.Module) -> np.ndarray:
    """The model's parameters as one float32 vector (for client state), whatever their memory layout."""
    return _flat(model.parameters())


def flat_statistics(model: nn.Module) -> np.ndarray:
    """The model's floating-point buffers (batch norm's running mean and variance) as one vector."""
    return _flat(b for b in model.buffers() if b.is_floating_point())


def load_statistics(vector: np.ndarray, model: nn.Module) -> None:
    """Copy ``vector`` (as :func:`flat_statistics` gives it) into the model's floating-point buffers."""
    flat, start = torch.tensor(np.asarray(vector)), 0
    with torch.no_grad():
        for buffer in (b for b in model.buffers() if b.is_floating_point()):
            buffer.copy_(flat[start : start + buffer.numel()].view_as(buffer))
            start += buffer.numel()


def _flat(tensors: Iterable[torch.Tensor]) -> np.ndarray:
    # reshape, not parameters_to_vector's view: a channels-last conv weight cannot be viewed flat
    return torch.cat([t.detach().reshape(-1) for t in tensors]).cpu().numpy()


def parameter_views(vector: np.ndarray, model: nn.Module) -> list[torch.Tensor]:
    """``vector`` (as :func:`flat_parameters` gives it) cut into tensors shaped like each parameter."""
    flat = torch.tensor(np.asarray(vector))  # a copy: state arrays arrive read-only
    views, start = [], 0
    for param in model.parameters():
        views.append(flat[start : start + param.numel()].view_as(param).to(param.device))
        start += param.numel()
    return views
