"""The wire protocol: everything that crosses between the driver (server side) and the clients.

Both sides import this module and it imports nothing of the project, so a
strategy never needs the Grid, the backends or the worker, and a client never
needs server code (as Flower keeps its message types in ``flwr.common.constant``).
It holds:

- the record keys Flower's strategies and our clients share (``num-examples``, ...);
- the names of a message's records, and of a query's records and answers;
- a client's job and its outcome, as the driver hands them to a backend;
- a client's state (its type and the check on what it may hold) and the task it left;
- :class:`Query`, what a client's query handler sees;
- :class:`TaskEndStrategy`, the API a server-side continual strategy implements;
- :class:`StatefulStrategy`, what a strategy with state between rounds adds for checkpoints;
- :class:`PairedStrategy` and :class:`ServerModelStrategy`: a method in two halves, and one that runs the
  global model on the driver;
- ``PAYLOAD_ARRAYS`` and :class:`Payload`: what a strategy adds to train messages beside the model
  (``strategies.payload.add_payload``), which a client method reads as ``context.payload``.

Server-side queries, end to end: a strategy's ``on_task_end(task, arrays, grid)``
calls ``strategies.queries.ask_clients(grid, arrays, query, query_arrays)``; each
client present in the round gets one ``MessageType.QUERY`` message holding the
global arrays (record ``GLOBAL_ARRAYS``), a ConfigRecord with ``QUERY_NAME`` set
to the query's name and, where given, the strategy's own arrays (record
``QUERY_ARRAYS``). The client's method answers with the handler registered
under that name (``clients.queries.QUERIES``: a short name, or the dotted path
of a user's function ``(model, query) -> dict[str, np.ndarray]``), computed on
the client's training data of the round (at a task end: the task just ended)
and its state. The reply's ``REPLY_ARRAYS`` record holds the answer's arrays by
name. ``ask_clients`` returns one answer dict per present client, in ascending
client id. The shipped queries answer:

- ``LAYER_INPUT_SKETCHES`` (FOT, its query arrays: the bases by weight name):
  per linear/conv weight name ``W``, the sketch ``W`` (float32, features x
  (features - the basis's width)), ``W/energy`` and ``W/residual_energy``
  (float64 scalars), and ``NUM_SAMPLES``;
- ``LAYER_INPUT_ENERGIES`` (FOT, its query arrays: orthonormal directions in
  a weight ``W``'s input space, by weight name): per such ``W``, the inputs'
  Gram matrix in those directions (``W``, float64, directions x directions;
  its diagonal: the energy along each), and ``NUM_SAMPLES``;
- ``CLASS_FEATURE_STATISTICS`` (CCVR): ``CLASSES``, ``COUNTS``, ``MEANS``,
  ``COVARIANCES`` (per class held) and ``NUM_SAMPLES``.
"""

from __future__ import annotations

from collections.abc import Callable, Mapping
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any, Protocol

import numpy as np

if TYPE_CHECKING:  # the protocol's types; importing it loads neither torch nor Flower
    import torch
    from flwr.app import ArrayRecord
    from flwr.serverapp import Grid

# Record keys shared by Flower's strategies and our clients.
NUM_EXAMPLES = "num-examples"  # weight of a reply in FedAvg-family aggregation
SERVER_ROUND = "server-round"  # Flower injects it into every train config
PROXIMAL_MU = "proximal-mu"  # FedProx's proximal term weight, sent by the strategy
CLIPPING_NORM = "clipping_norm"  # client-side DP: clip the update to this L2 norm
NORM_BIT = "norm_bit"  # client-side adaptive DP: was the update within the norm
TRAIN_LOSS = "train_loss"  # mean local training loss (QFedAvg reads it)
ACCURACY = "accuracy"
EVAL_LOSS = "eval_loss"
LEARNING_RATE = "lr"  # a strategy's per-round client learning rate (Flower's convention)
# A train config's prefixes (comma-separated) of the parameters clients train this round; the others stay as
# sent, and modules with none of their parameters trained keep batch norm's statistics too (a frozen encoder).
TRAIN_ONLY = "train-only"

# The records of messages and replies.
GLOBAL_ARRAYS = "arrays"  # a message's model weights (where it carries several ArrayRecords)
QUERY_ARRAYS = "query"  # a query message's own arrays (FOT's bases)
PAYLOAD_ARRAYS = "payload"  # a train message's extra arrays from the strategy (SCAFFOLD's control variate)
REPLY_ARRAYS = "arrays"  # a reply's weights (train) or answer (query)
REPLY_METRICS = "metrics"  # a reply's MetricRecord

# Queries: the ConfigRecord key naming one, the shipped names and their answer keys.
QUERY_NAME = "query"
QUERY_SAMPLES = "query-samples"  # the ConfigRecord key capping the samples a client answers on (a seeded subset)
NUM_SAMPLES = "num_samples"  # every answer says on how many samples it was computed
LAYER_INPUT_SKETCHES = "layer_input_sketches"
CLASS_FEATURE_STATISTICS = "class_feature_statistics"
LAYER_INPUT_ENERGIES = "layer_input_energies"  # FOT's second step: exact energies in candidate directions
CLASSES, COUNTS, MEANS, COVARIANCES = "classes", "counts", "means", "covariances"
# FeTrIL: the encoder's features (float32, samples x features) of the client's samples and their LABELS (int64),
# at most QUERY_SAMPLES of them where the query caps them, and NUM_SAMPLES.
CLASS_FEATURES = "class_features"
FEATURES, LABELS = "features", "labels"

# Where a Grid's run config (``grid.run.override_config``) names the stream's number of tasks, under
# this key, a strategy can tell the last task's end (FOT asks clients nothing there).
NUM_TASKS = "num-tasks"

# The linear head's weights, by their names in the model's state (CCVR recalibrates them).
HEAD_WEIGHT, HEAD_BIAS = "head.weight", "head.bias"

# What a client job does.
TRAIN, EVALUATE, QUERY = "train", "evaluate", "query"

ClientState = dict[str, Any]  # numpy arrays, Python scalars and strings, by name
STATE_SCALARS = (bool, int, float, str, type(None))
RESERVED_STATE_KEY = "__scalars__"  # a state file keeps the state's scalars under it


class ClientStateError(TypeError):
    """A client method left a value in its state that the store cannot keep."""


def check_state(state: Mapping[str, Any]) -> ClientState:
    """``state`` as a plain dict if every value is a numpy array (not of objects) or a scalar; else a clear error."""
    for key, value in state.items():
        if not isinstance(key, str) or key == RESERVED_STATE_KEY:
            raise ClientStateError(f"client state key {key!r}: keys must be strings other than {RESERVED_STATE_KEY!r}")
        if isinstance(value, np.ndarray) and value.dtype != object or isinstance(value, STATE_SCALARS):
            continue
        raise ClientStateError(
            f"client state[{key!r}] is a {type(value).__name__}; a state holds numpy arrays and "
            "Python scalars or strings (convert tensors with .cpu().numpy())"
        )
    return dict(state)


@dataclass(frozen=True)
class PreviousTask:
    """The task a client trained on before its live one, as it left it."""

    task: int
    indices: np.ndarray  # into the stream's training arrays: the client's data in its last round there


@dataclass(frozen=True)
class Payload:
    """Where a train job's payload (a strategy's extra arrays, ``PAYLOAD_ARRAYS``) is among the call's array
    sets, and its arrays' names: one set per distinct payload, shipped once per actor like the weights."""

    index: int  # into the list of array sets sent with the call
    names: tuple[str, ...]


@dataclass(frozen=True)
class ClientJob:
    """One client's work in a backend call: train, evaluate or answer a query, on which of the call's weights."""

    client_id: int
    kind: str  # TRAIN | EVALUATE | QUERY
    server_round: int
    weights_index: int  # into the list of weight sets sent with the call
    indices: np.ndarray  # into x_train (TRAIN, QUERY) or x_test (EVALUATE): the stream's choice
    task: int = 0  # the client's live task
    class_mask: np.ndarray | None = None  # labels the logits are restricted to
    config: dict[str, Any] = field(default_factory=dict)  # the message's ConfigRecords, merged
    state: ClientState = field(default_factory=dict)  # the client's state from the driver's store (TRAIN and
    # QUERY; EVALUATE too where the method keeps personal layers)
    new_task: bool = False  # TRAIN: the client's first round on ``task``
    previous: PreviousTask | None = None  # with new_task: the task it left
    query_arrays: dict[str, np.ndarray] = field(default_factory=dict)  # QUERY: the server's arrays for it
    payload: Payload | None = None  # TRAIN: the strategy's extra arrays for the round, where it sent any


@dataclass(frozen=True)
class ClientOutcome:
    """A client's reply: new weights and state (train), an answer (query), metrics, or the traceback of its failure."""

    client_id: int
    arrays: list[np.ndarray] | None
    metrics: dict[str, float]
    error: str | None = None
    state: ClientState | None = None  # TRAIN: the state to keep for the client's next round
    finite: bool = True  # TRAIN: its loss and weights are finite numbers
    array_names: list[str] | None = None  # QUERY: the answer's names (TRAIN: the weights', as sent)


@dataclass(frozen=True)
class Query:
    """A query as the client's handler sees it: its name, the server's arrays, the client's data and state."""

    name: str
    arrays: dict[str, np.ndarray]  # the server's own arrays for the query (e.g. FOT's bases)
    x: torch.Tensor  # the client's training data this round
    y: torch.Tensor
    generator: torch.Generator  # seeded from (run seed, round, client): answers do not depend on the actor
    state: Mapping[str, Any] = field(default_factory=dict)  # the client's state (a replay buffer, ...)


class TaskEndStrategy(Protocol):
    """What a server-side continual strategy adds to a Flower ``Strategy`` (both methods optional).

    The engine finds them on the strategy or on one it wraps (a DP wrapper's
    ``.strategy``): ``check_arrays`` on every layer that has it,
    ``on_task_end`` on the outermost layer that has it.

    - ``check_arrays(arrays)``: once, before any client trains, with the
      initial global arrays; raise to refuse a model it cannot serve.
    - ``on_task_end(task, arrays, grid)``: at the last round of each task,
      after that round's ``aggregate_train``, under global random state seeded
      from (run seed, round). Through ``grid`` it may ask clients
      (``strategies.queries.ask_clients``). What it returns, if not None,
      becomes the global model: it must have the keys and shapes of
      ``arrays``. The round's hooks (evaluation, probes, checkpoints) see the
      returned model; the next round's clients train from it.
    """

    def on_task_end(self, task: int, arrays: ArrayRecord, grid: Grid) -> ArrayRecord | None: ...

    def check_arrays(self, arrays: ArrayRecord) -> None: ...


class StatefulStrategy(Protocol):
    """What a strategy whose attributes change between rounds adds, so that a checkpoint can keep them.

    A checkpoint never keeps the strategy object: on resume the strategy is
    built again from the validated config, and only its state is restored
    (docs/architecture.md, "Checkpoints"). Flower's own strategies are covered
    by ``strategies.state``; a subclass implements only what it adds.

    - ``checkpoint_state()``: the state, as a dict of JSON values (numbers,
      strings, lists, dicts with string keys) and numpy arrays, at any depth.
    - ``restore_state(state, arrays)``: set it on a strategy just built from the
      config; ``arrays`` are the checkpoint's global arrays. Check every shape
      and dtype against them (raise ValueError saying what was expected): the
      file may come from someone else.

    At every checkpoint the engine restores the state into a copy of the
    strategy as built, and fails the run there, naming the attributes, if the
    copy differs from the live strategy: state that would be lost on resume.
    """

    def checkpoint_state(self) -> dict[str, Any]: ...

    def restore_state(self, state: dict[str, Any], arrays: ArrayRecord) -> None: ...


class PairedStrategy(Protocol):
    """A strategy whose method has a client half (SCAFFOLD, TARGET): ``client_half`` names it as ``client.method``
    does, and that method's class names the strategy back as ``server_half``. The pre-flight checks refuse a run
    with one half and not the other, before any work."""

    client_half: str


class ServerModelStrategy(Protocol):
    """A strategy that runs the global model on the driver (TARGET inverts it into synthetic samples).

    ``bind_model(model_for)`` is called once before the first round (again on resume: it is not state);
    ``model_for(arrays)`` returns a new copy of the model holding ``arrays``' parameters and the current
    global buffers (batch norm's statistics), in eval mode, on the driver's CPU.
    """

    def bind_model(self, model_for: Callable[[ArrayRecord], torch.nn.Module]) -> None: ...
