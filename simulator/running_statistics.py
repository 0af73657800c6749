"""Batch norm's running statistics travel beside the strategy, averaged by the engine.

A model's buffers (batch norm's ``running_mean``, ``running_var`` and its integer
``num_batches_tracked``) are statistics of the data, not parameters: a strategy
that treats them as parameters breaks them. FedAvgM's momentum overshoots a
variance below zero (NaN logits in evaluation), a DP wrapper's noise and
clipping norm fall on them, FedAdam's steps of about ``eta`` barely move them,
and integer arithmetic on the counter fails outright (QFedAvg, client-side
clipping). So a strategy sees and returns the parameters only; the Grid adds
the global buffers to every message it runs and keeps the trained clients'
buffers out of their replies, and after the strategy aggregates, the engine
sets the global buffers to those clients' mean weighted by their examples
(FedAvg's rule, whatever the strategy), counters rounded back to integers. A
model without buffers (the MLP, the CNN) takes none of these paths.
"""

from __future__ import annotations

from collections.abc import Iterable

import numpy as np
from flwr.app import ArrayRecord

from simulator.held_array import held_array_record


class RunningStatistics:
    """The shared buffers of a model, in its order: the global ones, and this round's trained ones."""

    def __init__(self, shared: list[str], buffers: Iterable[str]) -> None:
        names = set(buffers)
        self.shared = shared  # every key the server sends and gets, in the model's order
        self.names = [name for name in shared if name in names]  # those that are buffers
        self.parameters = [name for name in shared if name not in names]
        self.current: dict[str, np.ndarray] = {}  # the global buffers the next messages carry
        self._trained: list[tuple[float, list[np.ndarray]]] = []  # (examples, buffers) of this round's clients

    def __bool__(self) -> bool:
        return bool(self.names)

    def parameters_of(self, arrays: ArrayRecord) -> ArrayRecord:
        """``arrays`` without the buffers: what a strategy sees, holds in its state and returns."""
        return arrays if not self.names else ArrayRecord({name: arrays[name] for name in self.parameters})

    def for_strategy(self, arrays: ArrayRecord) -> ArrayRecord:
        """The global ``arrays``' parameters for a strategy's call; their buffers kept for its messages, and
        trained buffers a call before left unused (its strategy kept the model) forgotten."""
        self.current = {name: arrays[name].numpy() for name in self.names}
        self._trained = []
        return self.parameters_of(arrays)

    def full_weights(self, record: ArrayRecord) -> list[np.ndarray]:
        """A message's arrays as a client loads them: the model's every shared array, its buffers the global
        ones where the message carries the parameters only."""
        arrays = record.to_numpy_ndarrays()
        if not self.names or len(arrays) == len(self.shared):
            return arrays
        given = dict(zip(record.keys(), arrays))
        return [given[name] if name in given else self.current[name] for name in self.shared]

    def reply_arrays(self, arrays: list[np.ndarray], examples: float | None) -> tuple[list[str], list[np.ndarray]]:
        """A trained client's reply as the strategy gets it, its parameters' names and arrays; its buffers
        kept, with its example count, for :meth:`averaged` (``examples`` None: not a training reply)."""
        if not self.names:
            return self.shared, arrays
        by_name = dict(zip(self.shared, arrays))
        if examples is not None:
            self._trained.append((examples, [by_name[name] for name in self.names]))
        return self.parameters, [by_name[name] for name in self.parameters]

    def with_averaged(self, parameters: ArrayRecord) -> ArrayRecord:
        """The global model: the strategy's ``parameters`` and the buffers of this round's trained clients,
        their mean weighted by examples (the global ones where no client trained on an example)."""
        if not self.names:
            return parameters
        trained, self._trained = self._trained, []
        total = sum(examples for examples, _ in trained)
        buffers = self.current
        if total > 0:
            buffers = {
                name: _weighted_mean([(examples, arrays[i]) for examples, arrays in trained], total, self.current[name])
                for i, name in enumerate(self.names)
            }
        names, arrays = zip(*[(n, buffers[n] if n in buffers else parameters[n].numpy()) for n in self.shared])
        return held_array_record(list(names), list(arrays))


def _weighted_mean(weighted: list[tuple[float, np.ndarray]], total: float, like: np.ndarray) -> np.ndarray:
    """The mean of the arrays weighted by ``weight / total``, summed in float64 in order, in ``like``'s type;
    an integer type rounded to the nearest (a truncation would turn 6.9999 into 6)."""
    mean = sum(np.asarray(array, dtype=np.float64) * (weight / total) for weight, array in weighted)
    if np.dtype(like.dtype).kind in "iu":
        mean = np.rint(mean)
    return np.asarray(mean, dtype=like.dtype)
