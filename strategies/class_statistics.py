"""Per-class feature statistics pooled from the clients, and the frozen-encoder heads built on them.

CCVR, FSA and FeTrIL each keep, per class, the count, mean and covariance of the
global encoder's features, pooled exactly from the clients' answers to the
``class_feature_statistics`` query (:func:`pooled_statistics`). FSA and FeTrIL
share the rest of this module (:class:`FrozenEncoderHead`): the encoder trains
on the first task only and is frozen from its end on (every non-head array is
put back after each round's aggregation, and train messages tell clients to
train the head only, ``simulator.protocol.TRAIN_ONLY``), and the linear head is
rebuilt from the statistics at every task end, classes never seen being never
predicted (:func:`head_record`). With the encoder frozen, a class's statistics
stay valid: a class measured again in a later task is pooled with what was kept.
"""

from __future__ import annotations

from collections.abc import Iterable
from typing import Any

import numpy as np
from flwr.app import ArrayRecord, Message
from flwr.serverapp import Grid
from flwr.serverapp.strategy import FedAvg

from simulator.config import ConfigError
from simulator.held_array import held_array_record
from simulator.protocol import CLASSES, COUNTS, COVARIANCES, HEAD_BIAS, HEAD_WEIGHT, MEANS, TRAIN_ONLY
from strategies.state import StrategyStateError, expect_keys, float_array

# class -> (count, mean, unbiased covariance; None where a strategy keeps no covariances)
ClassStatistics = dict[int, tuple[int, np.ndarray, np.ndarray | None]]

HEAD_PREFIX = "head."  # the linear head's parameters (protocol.HEAD_WEIGHT, HEAD_BIAS): all a frozen encoder trains
# An unseen class's logit lies below every seen class's for any feature up to this many times as far from the origin
# as the seen classes' features reach (FSA: a class's mean norm plus its features' RMS distance from it, at most;
# FeTrIL: the largest norm of the features it trains on). Measured: under FSA's frozen MLP on digits (seed 7) every
# test image's features, unseen classes' included, lie within 1.06 times that reach.
UNSEEN_REACH = 10.0


def pooled_statistics(answers: list[dict[str, np.ndarray]]) -> ClassStatistics:
    """Per class, the count, mean and unbiased covariance of all clients' features together (exact)."""
    by_class: dict[int, list[tuple[int, np.ndarray, np.ndarray | None]]] = {}
    for answer in answers:
        for label, count, mean, covariance in zip(answer[CLASSES], answer[COUNTS], answer[MEANS], answer[COVARIANCES]):
            by_class.setdefault(int(label), []).append((int(count), mean, covariance))
    return {label: pooled(parts) for label, parts in by_class.items()}


def pooled(parts: list[tuple[int, np.ndarray, np.ndarray | None]]) -> tuple[int, np.ndarray, np.ndarray | None]:
    """The count, mean and unbiased covariance of several groups of one class's features together (exact);
    the covariance None where a part has none."""
    total = sum(n for n, _, _ in parts)
    mean = sum(n * m for n, m, _ in parts) / total
    if any(c is None for _, _, c in parts):
        return total, mean, None
    scatter = sum((n - 1) * c + n * np.outer(m, m) for n, m, c in parts) - total * np.outer(mean, mean)
    return total, mean, scatter / max(total - 1, 1)


def merged(kept: ClassStatistics, measured: ClassStatistics) -> ClassStatistics:
    """``kept`` with each class of ``measured`` added: pooled with the kept statistics of a class measured
    before (valid under a frozen encoder), as measured for a class new here."""
    both = dict(kept)
    for label, statistics in measured.items():
        both[label] = pooled([kept[label], statistics]) if label in kept else statistics
    return both


def head_record(
    arrays: ArrayRecord, rows: dict[int, tuple[np.ndarray, float]], reach: float, encoder: dict[str, np.ndarray]
) -> ArrayRecord:
    """The global ``arrays`` with the frozen ``encoder``'s arrays and a linear head whose row ``c`` is ``rows[c]``
    (weight, bias); a class without a row gets weight 0 and a bias below every seen class's logit for any feature
    of norm up to ``UNSEEN_REACH * reach``: never predicted, and finite (the engine refuses non-finite arrays)."""
    weight, bias = np.zeros(arrays[HEAD_WEIGHT].shape), np.zeros(arrays[HEAD_BIAS].shape)
    for label, (w, b) in rows.items():
        weight[label], bias[label] = w, b
    seen = sorted(rows)
    lowest = min(bias[seen]) - max(np.linalg.norm(weight[seen], axis=1)) * UNSEEN_REACH * reach
    bias[np.setdiff1d(np.arange(len(bias)), seen)] = lowest - 1.0
    updated = {name: encoder.get(name, array) for name, array in zip(arrays.keys(), arrays.to_numpy_ndarrays())}
    updated[HEAD_WEIGHT] = weight.astype(updated[HEAD_WEIGHT].dtype)
    updated[HEAD_BIAS] = bias.astype(updated[HEAD_BIAS].dtype)
    return held_array_record(list(updated), list(updated.values()))


def encoder_arrays(arrays: ArrayRecord) -> dict[str, np.ndarray]:
    """Every array of ``arrays`` but the head's, by name: what a frozen encoder keeps."""
    return {k: v for k, v in zip(arrays.keys(), arrays.to_numpy_ndarrays()) if not k.startswith(HEAD_PREFIX)}


class FrozenEncoderHead(FedAvg):
    """FedAvg until the first task ends; from then on the encoder stays as it was there and the linear head is
    rebuilt from the class statistics at every task end (:meth:`rebuilt_rows`, the subclass's)."""

    name = ""  # the strategy's short name, for messages (strategy=NAME)
    keeps_covariances = True  # whether the head needs each class's covariance, kept in the state

    def __init__(self, *args: Any, **kwargs: Any) -> None:
        super().__init__(*args, **kwargs)
        self.class_statistics: ClassStatistics = {}
        self.encoder: dict[str, np.ndarray] | None = None  # the non-head arrays at the first task's end

    def check_arrays(self, arrays: ArrayRecord) -> None:
        """Refuse, before any work, global arrays without a linear head to rebuild, or with nothing but it."""
        if HEAD_WEIGHT not in arrays or HEAD_BIAS not in arrays or arrays[HEAD_WEIGHT].numpy().ndim != 2:
            raise ConfigError(
                f"strategy={self.name} rebuilds the global model's linear head (head.weight and head.bias) "
                "from class statistics, which the global arrays do not hold: use model.head=linear and a "
                "client method that shares the head"
            )
        if not encoder_arrays(arrays):
            raise ConfigError(f"strategy={self.name} freezes the global model's encoder, which it does not send")

    def configure_train(self, server_round: int, arrays: ArrayRecord, config: Any, grid: Grid) -> Iterable[Message]:
        """FedAvg's messages; once the encoder is frozen, each tells its client to train the head only."""
        messages = list(super().configure_train(server_round, arrays, config, grid))
        if self.encoder is not None:
            for message in messages:
                message.content[self.configrecord_key][TRAIN_ONLY] = HEAD_PREFIX
        return messages

    def aggregate_train(self, server_round: int, replies: Iterable[Message]) -> tuple[ArrayRecord | None, Any]:
        """FedAvg's aggregate, its encoder arrays put back to the frozen ones once the first task has ended."""
        arrays, metrics = super().aggregate_train(server_round, replies)
        if arrays is None or self.encoder is None:
            return arrays, metrics
        kept = {k: self.encoder.get(k, v) for k, v in zip(arrays.keys(), arrays.to_numpy_ndarrays())}
        return held_array_record(list(kept), list(kept.values())), metrics

    def on_task_end(self, task: int, arrays: ArrayRecord, grid: Grid) -> ArrayRecord:
        """The global arrays with the head rebuilt from every class seen so far; at the first task end, the
        encoder freezes as it is."""
        if self.encoder is None:
            self.encoder = encoder_arrays(arrays)
        rows, reach = self.rebuilt_rows(arrays, grid)
        return head_record(arrays, rows, reach, self.encoder)

    def rebuilt_rows(self, arrays: ArrayRecord, grid: Grid) -> tuple[dict[int, tuple[np.ndarray, float]], float]:
        """The head's (weight, bias) per class seen so far, and how far from the origin features reach."""
        raise NotImplementedError

    def checkpoint_state(self) -> dict[str, Any]:
        """Whether the encoder is frozen (its arrays are then the checkpoint's own) and the class statistics
        (simulator.protocol.StatefulStrategy)."""
        labels = sorted(self.class_statistics)
        state = {
            "frozen": self.encoder is not None,
            "classes": labels,
            "counts": [self.class_statistics[c][0] for c in labels],
            "means": [self.class_statistics[c][1] for c in labels],
        }
        if self.keeps_covariances:
            state["covariances"] = [self.class_statistics[c][2] for c in labels]
        return state

    def restore_state(self, state: dict[str, Any], arrays: ArrayRecord) -> None:
        parts = ["classes", "counts", "means", *(["covariances"] if self.keeps_covariances else [])]
        where = f"{type(self).__name__}'s state"
        expect_keys(state, {"frozen", *parts}, where)
        if not isinstance(state["frozen"], bool):
            raise StrategyStateError(f"{where}: frozen = {state['frozen']!r}, expected true or false")
        classes, dim = arrays[HEAD_WEIGHT].shape
        if len({len(state[part]) for part in parts}) != 1:
            raise StrategyStateError(f"{where}: {', '.join(parts)} differ in length")
        covariances = state["covariances"] if self.keeps_covariances else [None] * len(state["classes"])
        for label, count, mean, covariance in zip(state["classes"], state["counts"], state["means"], covariances):
            if not (isinstance(label, int) and 0 <= label < classes and isinstance(count, int) and count >= 1):
                raise StrategyStateError(
                    f"{where}: class {label!r} with count {count!r}: expected a class < {classes} and a count >= 1"
                )
            mean = float_array(mean, (dim,), f"{where}: the mean of class {label}")
            if covariance is not None:
                covariance = float_array(covariance, (dim, dim), f"{where}: the covariance of class {label}")
            self.class_statistics[label] = (count, mean, covariance)
        # Every round after the first task's end puts the frozen arrays back: the checkpoint's are they.
        self.encoder = encoder_arrays(arrays) if state["frozen"] else None
