"""FOT's bases against the clients' exact layer inputs (the energy share they keep), and the task ends it
asks clients nothing at."""

from __future__ import annotations

from types import SimpleNamespace

import numpy as np
import pytest
import torch
from flwr.app import ArrayRecord
from helpers import run_experiment

from clients.queries import QUERIES
from simulator.protocol import LAYER_INPUT_ENERGIES, LAYER_INPUT_SKETCHES, NUM_TASKS, Query
from strategies import fot as fot_module
from strategies.fot import FOT

FEATURES, HIDDEN, CLASSES = 24, 16, 4
CLIENT_SIZES = (3, 10, 40, 120, 7)  # the clients' samples per task: some have fewer than a layer's inputs
THRESHOLD = 0.96
SPECTRA = {  # the singular values of each task's inputs: energy in a few directions, or spread over all
    "steep": 0.75 ** np.arange(FEATURES),
    "flat": np.ones(FEATURES),
}


def small_model() -> torch.nn.Sequential:
    torch.manual_seed(0)
    return torch.nn.Sequential(
        torch.nn.Linear(FEATURES, HIDDEN), torch.nn.ReLU(), torch.nn.Linear(HIDDEN, CLASSES)
    ).double()


def task_data(spectrum: str, task: int) -> list[torch.Tensor]:
    """Each client's inputs on ``task``: Gaussian samples with the ``spectrum``'s scales along directions
    of the task's own (random) orientation."""
    rng = np.random.default_rng(task)
    orientation = np.linalg.qr(rng.normal(size=(FEATURES, FEATURES)))[0]
    samples = rng.normal(size=(sum(CLIENT_SIZES), FEATURES)) * SPECTRA[spectrum] @ orientation.T
    return [torch.from_numpy(block) for block in np.split(samples, np.cumsum(CLIENT_SIZES)[:-1])]


def exact_inputs(model: torch.nn.Sequential, x: torch.Tensor) -> dict[str, np.ndarray]:
    """Each weight's inputs on all clients' samples together (features x samples), built by hand."""
    with torch.no_grad():
        return {"0.weight": x.T.numpy(), "2.weight": torch.relu(model[0](x)).T.numpy()}


class Federation:
    """Clients answering FOT's queries in this process with the shipped handlers, each on its own inputs;
    what FOT asks them, recorded. It is the Grid FOT sees: its run config may name the task count."""

    def __init__(self, model: torch.nn.Module, inputs: list[torch.Tensor], num_tasks: int | None = None) -> None:
        self.model, self.inputs, self.asked = model, inputs, []
        self.run = SimpleNamespace(override_config={} if num_tasks is None else {NUM_TASKS: num_tasks})

    def ask_clients(self, grid, arrays, query, query_arrays=None, max_samples=None):
        self.asked.append(query)
        handler = QUERIES.resolve(query)
        labels = [torch.zeros(len(x), dtype=torch.long) for x in self.inputs]
        seeds = [torch.Generator().manual_seed(client) for client in range(len(self.inputs))]
        return [
            handler(self.model, Query(query, dict(query_arrays or {}), x, y, seed))
            for x, y, seed in zip(self.inputs, labels, seeds)
        ]


def task_end(strategy, task: int, model, inputs, monkeypatch, num_tasks: int | None = None) -> Federation:
    federation = Federation(model, inputs, num_tasks)
    monkeypatch.setattr(fot_module, "ask_clients", federation.ask_clients)
    strategy.on_task_end(task, ArrayRecord(model.state_dict()), federation)
    return federation


def kept_share(basis: np.ndarray, inputs: np.ndarray) -> float:
    """``|U U^T R|^2 / |R|^2``: the share of the inputs' energy inside the basis."""
    return float(np.square(basis.T @ inputs).sum() / np.square(inputs).sum())


def gpm_count(basis: np.ndarray, inputs: np.ndarray, threshold: float) -> int:
    """GPM's count on the exact inputs: the fewest directions to add to ``basis`` to keep ``threshold``."""
    total = np.square(inputs).sum()
    need = threshold * total - np.square(basis.T @ inputs).sum()
    energies = np.linalg.svd(inputs - basis @ (basis.T @ inputs), compute_uv=False) ** 2
    return 0 if need <= 0 else int(np.searchsorted(np.cumsum(energies), need)) + 1


@pytest.mark.parametrize("spectrum", SPECTRA)
def test_the_bases_keep_the_threshold_of_each_tasks_exact_input_energy(monkeypatch, spectrum):
    model, strategy = small_model(), FOT(threshold=THRESHOLD)
    for task in range(3):
        inputs = task_data(spectrum, task)
        before = {name: basis.copy() for name, basis in strategy.bases.items()}
        federation = task_end(strategy, task, model, inputs, monkeypatch)
        assert federation.asked[0] == LAYER_INPUT_SKETCHES and set(federation.asked[1:]) <= {LAYER_INPUT_ENERGIES}
        for name, exact in exact_inputs(model, torch.cat(inputs)).items():
            basis = strategy.bases[name]
            assert basis.dtype == np.float64 and np.allclose(basis.T @ basis, np.eye(basis.shape[1]), atol=1e-9)
            kept = kept_share(basis, exact)
            assert kept >= THRESHOLD - 0.005, f"task {task}, {name}: the basis keeps {kept:.4f}"
            # No more directions than GPM takes on the exact inputs, give or take one.
            previous = before.get(name, np.zeros((len(exact), 0)))
            assert basis.shape[1] - previous.shape[1] <= gpm_count(previous, exact, THRESHOLD) + 1, (task, name)
    assert strategy.tasks_done == 3


def test_the_threshold_grows_by_its_step_per_task_the_bases_hold(monkeypatch):
    model, strategy = small_model(), FOT(threshold=0.8, threshold_step=0.15)
    for task, threshold in enumerate([0.8, 0.95, 1.0]):
        assert strategy.task_threshold == pytest.approx(threshold)
        inputs = task_data("steep", task)
        task_end(strategy, task, model, inputs, monkeypatch)
        exact = exact_inputs(model, torch.cat(inputs))["0.weight"]
        assert kept_share(strategy.bases["0.weight"], exact) >= threshold - 0.005
    assert strategy.threshold == 0.8  # the configured value stays: the step counts tasks_done


def test_at_the_streams_last_task_fot_asks_clients_nothing(monkeypatch):
    model, strategy = small_model(), FOT()
    assert task_end(strategy, 0, model, task_data("steep", 0), monkeypatch, num_tasks=2).asked
    held = {name: basis.copy() for name, basis in strategy.bases.items()}
    assert task_end(strategy, 1, model, task_data("steep", 1), monkeypatch, num_tasks=2).asked == []
    assert strategy.tasks_done == 1 and all(np.array_equal(strategy.bases[k], v) for k, v in held.items())


def test_a_fot_run_queries_clients_at_every_task_end_but_the_last(tmp_path, monkeypatch):
    asked, ask = [], fot_module.ask_clients

    def counted(grid, arrays, query, query_arrays=None, max_samples=None):
        asked.append((grid.server_round, query))
        return ask(grid, arrays, query, query_arrays, max_samples)

    monkeypatch.setattr(fot_module, "ask_clients", counted)
    overrides = ["scenario=permuted_digits", "strategy=fot", "engine.backend=local", "eval.probes=false"]
    run_experiment(
        tmp_path,
        [*overrides, "stream.permuted.num_tasks=3", "stream.rounds_per_task=2", "client.epochs=1"],
    )
    assert [r for r, _ in asked] == [2, 2, 4, 4]  # tasks 0 and 1 end at rounds 2 and 4; task 2 at 6: nothing


def test_where_the_first_candidates_measured_hold_too_little_the_server_measures_twice_as_many(monkeypatch):
    monkeypatch.setattr(fot_module, "gram_width", lambda sketched, share: 1)  # one candidate first: too few
    model, strategy = small_model(), FOT(threshold=THRESHOLD)
    inputs = task_data("steep", 0)
    federation = task_end(strategy, 0, model, inputs, monkeypatch)
    asked_again = federation.asked[2:]
    assert federation.asked[:2] == [LAYER_INPUT_SKETCHES, LAYER_INPUT_ENERGIES] and asked_again  # 1, 2, 4, ...
    assert set(asked_again) == {LAYER_INPUT_ENERGIES}
    for name, exact in exact_inputs(model, torch.cat(inputs)).items():
        assert kept_share(strategy.bases[name], exact) >= THRESHOLD - 0.005
