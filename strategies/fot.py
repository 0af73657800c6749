"""FOT: Bakman et al. 2024, "Federated Orthogonal Training: Mitigating Global Catastrophic
Forgetting in Continual Federated Learning" (ICLR).

At each task end the server extracts, per layer, the subspace of the inputs
that layer saw on the task's data, and from then on projects every round's
aggregated update of the layer's weight away from the old tasks' subspaces:
``dW <- dW - dW U U^T`` (``U``: the layer's basis, in its input space). Clients
train plain local SGD and never see a basis.

What clients send (the paper's Global Principal Subspace Extraction, as its
code does it): each client's layer inputs ``R`` (features x samples; a conv
layer's unfolded patches) times a private random matrix ``G`` (uniform in
[-1, 1]), the share of ``R``'s norm outside the current basis, and its sample
count (``clients/queries.py``). The server uses only the sum of the sketches,
which is what secure aggregation would reveal: here the sum is taken in the
clear (the arithmetic, not the cryptography, is simulated). Its left singular
vectors span the clients' inputs side by side.

Basis growth follows GPM (Saha et al. 2021) as the authors' code applies it:
with ``r`` the clients' mean residual share (weighted by samples), new
directions are the sketch's top singular vectors until their energy share
exceeds ``(r - (1 - threshold)) / r`` (at least one), appended to the basis and
re-orthonormalised; ``threshold`` grows by ``threshold_step`` after each task.
Biases are not projected, as in the authors' code. Here the sketches are taken
on the new global model at the task end (the code uses each client's local
model after its last round), from every present client.
"""

from __future__ import annotations

from typing import Any

import numpy as np
from flwr.app import ArrayRecord, ConfigRecord, Message, MetricRecord
from flwr.serverapp import Grid
from flwr.serverapp.strategy import FedAvg

from clients.queries import NUM_SAMPLES
from simulator.held_array import held_array_record
from strategies.queries import ask_clients

SKETCHES = "layer_input_sketches"


class FOT(FedAvg):
    """FedAvg whose aggregated updates stay orthogonal to the old tasks' layer-input subspaces."""

    def __init__(self, *args: Any, threshold: float = 0.96, threshold_step: float = 0.0, **kwargs: Any) -> None:
        super().__init__(*args, **kwargs)
        if not 0.0 < threshold <= 1.0 or threshold_step < 0:
            raise ValueError(f"threshold = {threshold}, threshold_step = {threshold_step}: expected a threshold "
                             "in (0, 1] and a step >= 0")
        self.threshold = threshold  # the paper's epsilon: the energy share a basis keeps (0.96 on PMNIST)
        self.threshold_step = threshold_step
        self.bases: dict[str, np.ndarray] = {}  # weight name -> orthonormal columns in its input space
        self._round_start: ArrayRecord | None = None

    def configure_train(
        self, server_round: int, arrays: ArrayRecord, config: ConfigRecord, grid: Grid
    ) -> list[Message]:
        self._round_start = arrays
        return list(super().configure_train(server_round, arrays, config, grid))

    def aggregate_train(
        self, server_round: int, replies: list[Message]
    ) -> tuple[ArrayRecord | None, MetricRecord | None]:
        arrays, metrics = super().aggregate_train(server_round, replies)
        if arrays is None or not self.bases or self._round_start is None:
            return arrays, metrics
        return project_updates(arrays, self._round_start, self.bases), metrics

    def on_task_end(self, task: int, arrays: ArrayRecord, grid: Grid) -> None:
        """Grow each layer's basis with the inputs it saw on the task just ended."""
        answers = ask_clients(grid, arrays, SKETCHES, self.bases)
        samples = np.array([float(a[NUM_SAMPLES]) for a in answers])
        for name in (k for k in answers[0] if k != NUM_SAMPLES and not k.endswith("/residual")):
            sketch = sum(a[name] for a in answers)
            residual = float(np.dot(samples, [float(a[f"{name}/residual"]) for a in answers]) / samples.sum())
            self.bases[name] = grown_basis(self.bases.get(name), sketch, residual, self.threshold)
        self.threshold = min(1.0, self.threshold + self.threshold_step)


def grown_basis(basis: np.ndarray | None, sketch: np.ndarray, residual: float, threshold: float) -> np.ndarray:
    """``basis`` extended by the top left singular vectors of ``sketch`` (GPM's criterion, as FOT's code uses it)."""
    if basis is not None:
        sketch = sketch - basis @ (basis.T @ sketch)  # what the old tasks' subspace leaves
    left, singular, _ = np.linalg.svd(sketch, full_matrices=False)
    energy = singular**2
    if energy.sum() == 0:
        return basis if basis is not None else np.zeros((sketch.shape[0], 0))
    target = (residual - (1.0 - threshold)) / residual if residual > 0 else 0.0
    keep = max(1, int(np.searchsorted(np.cumsum(energy) / energy.sum(), target, side="right")) + 1)
    new = left[:, : min(keep, len(energy))]
    if basis is None:
        return new
    merged, _ = np.linalg.qr(np.concatenate([basis, new], axis=1))
    return merged[:, : min(merged.shape[0], basis.shape[1] + new.shape[1])]


def project_updates(arrays: ArrayRecord, start: ArrayRecord, bases: dict[str, np.ndarray]) -> ArrayRecord:
    """``arrays`` with each based weight's update since ``start`` made orthogonal to its basis."""
    projected = {}
    for name, array in zip(arrays.keys(), arrays.to_numpy_ndarrays()):
        if name in bases:
            old = start[name].numpy()
            update = (array - old).reshape(len(array), -1)  # conv: (out, in * kh * kw)
            update = update - (update @ bases[name]) @ bases[name].T
            array = (old + update.reshape(array.shape)).astype(array.dtype)
        projected[name] = array
    return held_array_record(list(projected), [np.ascontiguousarray(v) for v in projected.values()])
