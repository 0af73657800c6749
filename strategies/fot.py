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

Basis growth follows GPM (Saha et al. 2021): with ``r`` the share of the
inputs' energy outside the basis (clients send their energies, summed like
the sketches), nothing is added where the basis keeps ``threshold`` of it;
otherwise the sketch's top residual directions are added until it does, and
re-orthonormalised. ``threshold`` grows by ``threshold_step`` after each task.
(The authors' code uses a sample-weighted mean of unsquared norm ratios and
adds at least one direction; GPM's energy rule is the paper's.)
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

from simulator.config import ConfigError
from simulator.held_array import held_array_record
from simulator.protocol import LAYER_INPUT_SKETCHES, NUM_SAMPLES
from strategies.queries import ask_clients


class FOT(FedAvg):
    """FedAvg whose aggregated updates stay orthogonal to the old tasks' layer-input subspaces."""

    def __init__(self, *args: Any, threshold: float = 0.96, threshold_step: float = 0.0, **kwargs: Any) -> None:
        super().__init__(*args, **kwargs)
        if not 0.0 < threshold <= 1.0:
            raise ConfigError(f"strategy.threshold = {threshold!r}: expected an energy share in (0, 1]")
        if threshold_step < 0:
            raise ConfigError(f"strategy.threshold_step = {threshold_step!r}: expected a number >= 0")
        self.threshold = threshold  # the paper's epsilon: the energy share a basis keeps (0.96 on PMNIST)
        self.threshold_step = threshold_step
        self.bases: dict[str, np.ndarray] = {}  # weight name -> orthonormal columns in its input space
        self.tasks_done = 0  # task ends whose inputs the bases hold; the threshold grows with them
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
        start, self._round_start = self._round_start, None  # not kept in checkpoints
        if arrays is None or not self.bases or start is None:
            return arrays, metrics
        return project_updates(arrays, start, self.bases), metrics

    def on_task_end(self, task: int, arrays: ArrayRecord, grid: Grid) -> None:
        """Grow each layer's basis with the inputs it saw on the task just ended."""
        answers = ask_clients(grid, arrays, LAYER_INPUT_SKETCHES, self.bases)
        for name in (k for k in answers[0] if k != NUM_SAMPLES and "/" not in k):
            sketch = sum(a[name] for a in answers)
            energy = sum(float(a[f"{name}/energy"]) for a in answers)
            residual = sum(float(a[f"{name}/residual_energy"]) for a in answers)
            self.bases[name] = grown_basis(
                self.bases.get(name), sketch, residual / energy if energy else 0.0, self.task_threshold
            )
        self.tasks_done += 1

    @property
    def task_threshold(self) -> float:
        """The energy share the bases keep of the next task's inputs: ``threshold``, grown by ``threshold_step``
        per task already held."""
        return min(1.0, self.threshold + self.threshold_step * self.tasks_done)

    def checkpoint_state(self) -> dict[str, Any]:
        """The bases and how many tasks they hold (simulator.protocol.StatefulStrategy)."""
        return {"bases": dict(self.bases), "tasks_done": self.tasks_done}

    def restore_state(self, state: dict[str, Any], arrays: ArrayRecord) -> None:
        tasks_done, bases = state["tasks_done"], state["bases"]
        if isinstance(tasks_done, bool) or not isinstance(tasks_done, int) or tasks_done < 0:
            raise ValueError(f"tasks_done = {tasks_done!r}: expected an integer >= 0")
        for name, basis in bases.items():
            inputs = int(np.prod(arrays[name].shape[1:])) if name in arrays else None
            if inputs is None or basis.ndim != 2 or basis.shape[0] != inputs or basis.shape[1] > inputs:
                raise ValueError(
                    f"bases[{name!r}] has shape {basis.shape}: expected (inputs, k) with k <= inputs for a weight "
                    f"of the global arrays ({name!r} with {inputs} inputs)"
                )
        self.bases, self.tasks_done = dict(bases), tasks_done


def grown_basis(basis: np.ndarray | None, sketch: np.ndarray, residual: float, threshold: float) -> np.ndarray:
    """``basis`` grown by GPM's criterion (Saha et al. 2021) from the sketch of the task's inputs.

    ``residual``: the share of the inputs' energy the basis leaves out. Where the
    basis already keeps ``threshold`` of it, nothing is added; otherwise the top
    singular vectors of the sketch's residual are added until the kept share
    reaches ``threshold``.
    """
    width = 0 if basis is None else basis.shape[1]
    if basis is not None:
        sketch = sketch - basis @ (basis.T @ sketch)  # what the old tasks' subspace leaves
    left, singular, _ = np.linalg.svd(sketch, full_matrices=False)
    energy = singular**2
    if 1.0 - residual >= threshold or energy.sum() == 0:
        return basis if basis is not None else np.zeros((sketch.shape[0], 0))
    target = (threshold - (1.0 - residual)) / residual  # the share of the residual to keep
    keep = min(int(np.searchsorted(np.cumsum(energy) / energy.sum(), target - 1e-12, side="left")) + 1, len(energy))
    new = left[:, :keep]
    if basis is None:
        return new
    merged, _ = np.linalg.qr(np.concatenate([basis, new], axis=1))
    return merged[:, : min(merged.shape[0], width + keep)]


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
    return held_array_record(list(projected), [np.require(v, requirements="C") for v in projected.values()])
