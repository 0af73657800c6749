"""The round loop: the one place that owns it.

An :class:`Experiment` drives a Flower strategy's ``configure_*`` / ``aggregate_*``
methods itself, through our :class:`~simulator.grid.SimulationGrid`, so that it
can act between them: at a task end it calls the strategy's own ``on_task_end``
where it has one (FedStream's protocol for server-side continual methods), and
after every round the hooks (``simulator/hooks.py``) measure, log and
checkpoint. Every strategy call runs under global random state seeded from
(run seed, round): Flower samples clients with ``random.sample``, and that
makes the cohort a function of the seed.
"""

from __future__ import annotations

import contextlib
import logging
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch
from flwr.app import ArrayRecord, ConfigRecord, MetricRecord
from flwr.serverapp.strategy import Strategy
from flwr.supercore.task_identity import TaskIdentity

from clients import resolve_method
from clients.base import ClientMethod, shared_keys
from clients.fedprox import warn_if_proximal_term_unused
from clients.models import build_model
from simulator import checkpoint
from simulator.backends import ClientFailure, make_backend
from simulator.client_state import ClientStates, StoreSnapshot
from simulator.config import ConfigError, RunConfig, to_dict
from simulator.data import load_dataset
from simulator.evaluation import task_accuracies
from simulator.grid import MB, SimulationGrid, Traffic
from simulator.hooks import RoundView, RunContext, default_hooks
from simulator.run_dir import RunDirectory
from simulator.seeding import Draw, Purpose, derive_seed, seeded_global_state, torch_generator
from simulator.streams import Stream, build_stream
from simulator.worker import WorkerData, all_finite
from strategies import check_sampling, strategy_layers

SERVER_NODE_ID = 1  # Flower's SuperLink node id: the source of every instruction
log = logging.getLogger("fedstream")


@dataclass
class Start:
    """Where the rounds start: round 1 from the initial arrays, or after a checkpoint's round."""

    arrays: ArrayRecord
    round: int = 1
    wall_s: float = 0.0
    records: list[dict[str, Any]] = field(default_factory=list)
    client_states: StoreSnapshot | None = None
    nonfinite_dropped: int = 0
    traffic: Traffic = Traffic()


class Experiment:
    """One scenario, one strategy, one seed: runs and writes its run directory."""

    def __init__(
        self, run: RunConfig, strategy: Strategy, run_dir: Path, resume: bool = False, keep_warm: bool = False
    ) -> None:
        """``keep_warm``: leave Ray and the actors up for the next run of a sweep in this process."""
        self.run_cfg = run
        self.strategy = strategy
        self.run_dir = run_dir
        self.resume = resume
        self.keep_warm = keep_warm

    def run(self) -> dict[str, Any]:
        """Run every round; return the summary written to ``summary.json``."""
        cfg = self.run_cfg
        started = time.perf_counter()
        logging.getLogger("flwr").setLevel(logging.WARNING)

        # 1. Data, stream and model. Values only the data can refute fail here, before Ray starts.
        stream, rounds = self._stream()
        model, method = self._model(stream)
        # 2. Resume from the last finished round, if asked (read before Ray starts; the strategy
        #    only through an allow-list), else start from the model's weights, less its personal layers.
        initial = ArrayRecord({k: v for k, v in model.state_dict().items() if k in shared_keys(model, method)})
        start = self._resumed(stream, rounds, initial) if self.resume else Start(initial)
        states = ClientStates(self.run_dir / checkpoint.CLIENT_STATE_DIR,
                              int(cfg.engine.client_state_memory_mb * MB), start.client_states)
        warn_if_proximal_term_unused(self.strategy, method, cfg.client.method)
        self._check_strategy_serves(start.arrays)
        # 3. Clients: a backend (Ray actors or in-process) behind Flower's Grid interface, started as
        #    soon as every check has passed; the run directory only then (a refused run writes
        #    nothing); the hooks. What needs no client runs while new actors import torch.
        with contextlib.ExitStack() as cleanup:  # closes the hooks, then the backend, however the run ends
            backend = make_backend(cfg, WorkerData.of(stream), self.keep_warm)
            cleanup.push(lambda kind, error, trace: backend.close(failed=kind is not None))
            baseline = task_accuracies(model, stream, cfg.eval.batch_size)  # the untrained model's: fwt's baseline
            data = backend.data  # with Ray, the object store's copy: reading it lets the driver's own go
            stream.use_arrays(data.x_train, data.y_train, data.x_test, data.y_test)
            grid = SimulationGrid(backend, stream, states, cfg.eval.client_test_size, run_id=cfg.seed,
                                  on_nonfinite=cfg.engine.on_nonfinite, nonfinite_dropped=start.nonfinite_dropped,
                                  traffic=start.traffic, personal=bool(method.personal_prefixes))
            TaskIdentity.run_id, TaskIdentity.node_id, TaskIdentity.task_id = cfg.seed, SERVER_NODE_ID, 0
            run = RunContext(cfg, stream, rounds, start.round, model, method(cfg.client), states, grid,
                             RunDirectory(self.run_dir, start.records),
                             elapsed=lambda: start.wall_s + time.perf_counter() - started)
            hooks, arrays = default_hooks(run), start.arrays
            cleanup.callback(hooks.close)
            for server_round in range(start.round, rounds + 1):
                # 4. Train: the strategy samples and configures, clients train, it aggregates.
                arrays, train_metrics = self._train(server_round, arrays, grid)
                # 5. At a task's last round, the strategy's own step, where it has one.
                task = stream.task_of_round(server_round)
                task_ended = server_round == rounds or stream.task_of_round(server_round + 1) != task
                if task_ended:
                    arrays = self._end_task(task, server_round, arrays, grid)
                # 6. The hooks: evaluations and probes measure, the record is logged, checkpoints save.
                view = RoundView(run, server_round, task, task_ended, arrays, self.strategy, train_metrics)
                measured = hooks.measure(view)
                hooks.logged(view, run.outputs.log(view.record(measured)) if measured else None)
            # 7. The end: the accuracy matrix and summary with what every hook adds, then the plots.
            end = RoundView(run, rounds, stream.task_of_round(rounds), True, arrays, self.strategy, None)
            summary = run.outputs.finish(run.elapsed(), rounds, baseline, hooks.summary(end), to_dict(cfg))
            hooks.finished(end)
            return summary

    def _stream(self) -> tuple[Stream, int]:
        """The data as it changes over rounds, and the rounds; sampling the stream cannot satisfy fails."""
        cfg = self.run_cfg
        resolve_method(cfg.client.method)  # a bad name fails before the data loads
        stream = build_stream(cfg, load_dataset(cfg.data, cfg.federation.num_clients, cfg.seed))
        rounds = cfg.rounds or stream.default_rounds
        if rounds is None:
            raise ConfigError(f"rounds = None: stream.kind = {cfg.stream.kind!r} needs rounds set")
        check_sampling(self.strategy, self._fewest(stream, rounds),
                       f"the fewest in any round of stream.kind = {cfg.stream.kind!r}", cfg.eval.federated)
        return stream, rounds

    def _fewest(self, stream: Stream, rounds: int) -> int:
        """The fewest clients present in any round: more is what a strategy would wait for forever."""
        return min(len(stream.available_clients(r)) for r in range(1, rounds + 1))

    def _model(self, stream: Stream) -> tuple[torch.nn.Module, type[ClientMethod]]:
        """The server's copy of the model, seeded (its weights: the initial global ones), and the client method."""
        cfg = self.run_cfg
        model = build_model(stream.x_train.shape[1:], stream.num_classes, cfg.model,
                            torch_generator(cfg.seed, Purpose.MODEL_INIT))
        method = resolve_method(cfg.client.method)
        _check_model_serves(model, method, cfg)
        return model, method

    def _resumed(self, stream: Stream, rounds: int, initial: ArrayRecord) -> Start:
        """Where the newest checkpoint left the run, checked against this config."""
        saved = checkpoint.load(self.run_dir / "checkpoints",
                                {type(layer).__module__ for _, layer in strategy_layers(self.strategy)})
        self._check_same_run(saved.config)
        if rounds < saved.round:
            raise ConfigError(
                f"rounds = {rounds}: the checkpoint in {self.run_dir / 'checkpoints'} has finished "
                f"round {saved.round}; resume with rounds >= {saved.round}"
            )
        if saved.num_tasks != stream.num_tasks:
            raise ConfigError(
                f"rounds = {rounds}: resuming would change the stream from {saved.num_tasks} to "
                f"{stream.num_tasks} tasks, so the finished rounds would not be those of this run"
            )
        self._check_saved_strategy(saved.strategy, saved.arrays, self._fewest(stream, rounds), initial)
        self.strategy = saved.strategy
        return Start(saved.arrays, saved.round + 1, saved.wall_s, saved.records, saved.client_states,
                     saved.nonfinite_dropped, saved.traffic)

    def _train(
        self, server_round: int, arrays: ArrayRecord, grid: SimulationGrid
    ) -> tuple[ArrayRecord, MetricRecord | None]:
        """One round of the strategy's training; the new global arrays (the old where it gives none)."""
        with grid.round(server_round), seeded_global_state(derive_seed(self.run_cfg.seed, Purpose.STRATEGY,
                                                                       server_round)):
            messages = self.strategy.configure_train(server_round, arrays, ConfigRecord(), grid)
            new_arrays, train_metrics = self.strategy.aggregate_train(server_round, grid.send_and_receive(messages))
        if new_arrays is None:
            return arrays, train_metrics
        call = f"round {server_round}: {type(self.strategy).__name__}.aggregate_train"
        return as_global_arrays(new_arrays, arrays, call), train_metrics

    def _check_strategy_serves(self, arrays: ArrayRecord) -> None:
        """A strategy (or one it wraps) may refuse the global arrays before any work: ``check_arrays(arrays)``."""
        for _, layer in strategy_layers(self.strategy):
            if callable(getattr(layer, "check_arrays", None)):
                layer.check_arrays(arrays)

    def _end_task(self, task: int, server_round: int, arrays: ArrayRecord, grid: SimulationGrid) -> ArrayRecord:
        """The strategy's ``on_task_end(task, arrays, grid)``, where it has one: its arrays, if it returns any.

        The FedStream protocol for server-side continual methods: a Flower strategy
        without the method is untouched; one inside a wrapper (Flower's DP) is found
        there. Through the Grid it may query clients (``MessageType.QUERY``); its
        random draws are seeded apart from the round's other calls.
        """
        hooked = [layer for _, layer in strategy_layers(self.strategy) if callable(getattr(layer, "on_task_end", None))]
        if not hooked:
            return arrays
        on_task_end = hooked[0].on_task_end
        seed = derive_seed(self.run_cfg.seed, Purpose.STRATEGY, server_round, Draw.TASK_END_CALL)
        with grid.round(server_round), seeded_global_state(seed):
            ended = on_task_end(task, arrays, grid)
        if ended is None:
            return arrays
        return as_global_arrays(ended, arrays, f"round {server_round}: {type(hooked[0]).__name__}.on_task_end")

    def _check_saved_strategy(self, saved: Strategy, arrays: ArrayRecord, fewest: int, initial: ArrayRecord) -> None:
        """Refuse a checkpoint whose strategy or weights are not the configured run's, or would hang or poison it.

        ``initial``: the configured model's global arrays, whose names and shapes the saved ones must have.
        """
        where = self.run_dir / "checkpoints"
        shapes = {name: tuple(array.shape) for name, array in arrays.items()}
        if shapes != {name: tuple(array.shape) for name, array in initial.items()}:
            raise ConfigError(
                f"resume = true: the global weights in {where} are not the configured model's "
                f"(names and shapes differ from model.name = {self.run_cfg.model.name!r}'s shared weights)"
            )
        configured = [type(layer) for _, layer in strategy_layers(self.strategy)]
        found = [type(layer) for _, layer in strategy_layers(saved)]
        if found != configured:
            raise ConfigError(
                f"resume = true: the checkpoint in {where} holds a {' around '.join(t.__name__ for t in found)} "
                f"strategy; the config builds {' around '.join(t.__name__ for t in configured)}"
            )
        check_sampling(saved, fewest, f"the checkpoint in {where}", self.run_cfg.eval.federated)
        if not all_finite(arrays.to_numpy_ndarrays()):
            raise ConfigError(f"resume = true: the checkpoint in {where} holds non-finite global weights")

    def _check_same_run(self, saved: dict[str, Any]) -> None:
        """Refuse to resume a checkpoint of a different config; rounds may grow, engines differ."""
        current = to_dict(self.run_cfg)
        may_differ = {"rounds", "engine"}  # the numbers do not depend on the engine
        differing = sorted(k for k in current if k not in may_differ and current[k] != saved.get(k))
        if differing:
            raise ConfigError(
                f"resume=true: the checkpoint in {self.run_dir / 'checkpoints'} was written "
                f"with different {', '.join(differing)}; resume with the same config"
            )

def _check_model_serves(model: torch.nn.Module, method: type[ClientMethod], cfg: RunConfig) -> None:
    """Refuse, before any client trains, a model that lacks what probes or personal layers need."""
    if cfg.eval.probes and not callable(getattr(model, "features", None)):
        raise ConfigError(
            f"model.name = {cfg.model.name!r}: the model has no features(x) method, which the "
            "representation probes need; add one or set eval.probes=false"
        )
    if not method.personal_prefixes:
        return
    personal = [k for k in model.state_dict() if k.startswith(method.personal_prefixes)]
    # The server scores each client's own model as its head on the shared features.
    if not (callable(getattr(model, "features", None)) and isinstance(getattr(model, "head", None), torch.nn.Module)
            and personal and all(k.startswith("head.") for k in personal)):
        raise ConfigError(
            f"client.method = {cfg.client.method!r} keeps {', '.join(method.personal_prefixes)}* for each "
            f"client: it needs a model with features(x) and a head holding those weights, and "
            f"model.name = {cfg.model.name!r} has none"
        )
    log.warning(
        "client.method = %s keeps each client's head: the global model is the global encoder under the "
        "initial head, never trained, and acc_* and the accuracy matrix score that; client_acc_personal_* "
        "scores each client's own model, the probes the encoder", cfg.client.method,
    )


def as_global_arrays(returned: ArrayRecord, expected: ArrayRecord, call: str) -> ArrayRecord:
    """A strategy's new global arrays in the model's order; stop where they are not the model's or not numbers.

    Clients load the global arrays in order, so a record with the model's keys in
    another order is put in order. One with other keys or shapes would otherwise
    fail a round later, inside every client's ``load_state_dict``, with no word of
    the strategy that made it.
    """
    shapes = {name: tuple(array.shape) for name, array in returned.items()}
    wanted = {name: tuple(array.shape) for name, array in expected.items()}
    if shapes != wanted:
        missing, extra = sorted(wanted.keys() - shapes.keys()), sorted(shapes.keys() - wanted.keys())
        reshaped = [f"{k} has shape {shapes[k]}, expected {wanted[k]}"
                    for k in wanted.keys() & shapes.keys() if wanted[k] != shapes[k]]
        found = [f"missing {missing}"] * bool(missing) + [f"not the model's {extra}"] * bool(extra) + sorted(reshaped)
        raise ClientFailure(
            f"{call} returned an ArrayRecord that is not the model's global weights ({'; '.join(found)}); "
            f"return one with the keys and shapes of the ArrayRecord it was given: {', '.join(wanted)}"
        )
    if not all_finite(returned.to_numpy_ndarrays()):
        raise ClientFailure(f"{call} returned non-finite global weights (training diverged)")
    if list(returned) != list(expected):
        return ArrayRecord({name: returned[name] for name in expected})
    return returned
