"""The round loop: the one place that owns it.

An :class:`Experiment` drives a Flower strategy's ``configure_*`` / ``aggregate_*``
methods itself, through our :class:`~simulator.grid.SimulationGrid`, so that it
can act between them: at a task end it calls the strategy's own ``on_task_end``
where it has one (``simulator.protocol.TaskEndStrategy``), and after every
round the hooks (``simulator/hooks.py``: the shipped ones, then the user's
``eval.hooks``) measure, log and checkpoint. Every strategy call runs under
global random state seeded from (run seed, round): Flower samples clients with
``random.sample``, and that makes the cohort a function of the seed. The
checks before any work are ``simulator/preflight.py``'s.
"""

from __future__ import annotations

import contextlib
import copy
import logging
import time
from pathlib import Path
from typing import Any

import torch
from flwr.app import ArrayRecord, ConfigRecord, MetricRecord
from flwr.serverapp.strategy import Strategy
from flwr.supercore.task_identity import TaskIdentity

from clients import METHODS
from clients.base import shared_keys
from clients.models import build_model
from simulator import checkpoint, preflight
from simulator.backends import make_backend
from simulator.checkpoint import Checkpoints, Start
from simulator.client_state import ClientStateStore
from simulator.config import ConfigError, ExperimentConfig, to_dict
from simulator.data import load_dataset
from simulator.diagnostics import Diagnostics
from simulator.evaluation import FederatedEvaluation, HeadEvaluation, task_accuracies
from simulator.grid import SimulationGrid
from simulator.hooks import HOOKS, Hook, Hooks, RoundView, RunSetup
from simulator.interrupts import Interrupted, stop_requests
from simulator.probes import Probes
from simulator.reporting_hooks import Communication, ForgettingPlot, Progress
from simulator.run_dir import MB, RunDirectory
from simulator.running_statistics import RunningStatistics
from simulator.seeding import Draw, Purpose, derive_seed, seeded_global_state, torch_generator
from simulator.strategy_calls import as_global_arrays, strategy_call
from simulator.streams import Stream, build_stream
from simulator.worker import WorkerData
from strategies import strategy_layers

SERVER_NODE_ID = 1  # Flower's SuperLink node id: the source of every instruction
log = logging.getLogger("fedstream")


class Experiment:
    """One scenario, one strategy, one seed: runs and writes its run directory."""

    def __init__(
        self,
        config: ExperimentConfig,
        strategy: Strategy,
        run_dir: Path,
        resume: bool = False,
        keep_warm: bool = False,
    ) -> None:
        """``keep_warm``: leave Ray and the actors up for the next run of a sweep in this process."""
        self.config = config
        self.strategy = strategy
        self.run_dir = run_dir
        self.resume = resume
        self.keep_warm = keep_warm

    def run(self) -> dict[str, Any]:
        """Run every round; return the summary written to ``summary.json``."""
        config, started = self.config, time.perf_counter()
        logging.getLogger("flwr").setLevel(logging.WARNING)

        # 1. Data, stream and model, and the checks only they can refute, before Ray starts.
        method = METHODS.resolve(config.client.method)
        stream = build_stream(config, load_dataset(config.data, config.federation.num_clients, config.seed))
        rounds = preflight.stream_rounds(config, stream, self.strategy)
        init = torch_generator(config.seed, Purpose.MODEL_INIT)
        model = build_model(stream.x_train.shape[1:], stream.num_classes, config.model, init)
        preflight.check_model_serves(model, method, config)
        preflight.check_image_options(config, stream.x_train)
        # 2. Resume from the last finished round, if asked (read before Ray starts; the strategy as
        #    built from the config, its state restored), else from the model's weights, less its personal layers.
        initial = ArrayRecord({k: v for k, v in model.state_dict().items() if k in shared_keys(model, method)})
        statistics = RunningStatistics(list(initial.keys()), (name for name, _ in model.named_buffers()))
        strategy_as_built = self._copy_for_checkpoints() if config.engine.checkpoint_every else None
        start = self._resumed(stream, rounds, initial, statistics) if self.resume else Start(initial)
        budget = int(config.engine.client_state_memory_mb * MB)
        states = ClientStateStore(self.run_dir / checkpoint.CLIENT_STATE_DIR, budget, start.client_states)
        preflight.warn_if_proximal_term_unused(self.strategy, method, config.client.method)
        preflight.check_both_halves(self.strategy, method, config.client.method)
        preflight.check_strategy_serves(self.strategy, statistics.parameters_of(start.arrays))
        # 3. Clients: a backend (Ray actors or in-process) behind Flower's Grid interface, started as
        #    soon as every check has passed; the run directory only then (a refused run writes
        #    nothing); the hooks. What needs no client runs while new actors import torch.
        with contextlib.ExitStack() as cleanup:  # closes the hooks, then the backend, however the run ends
            backend = make_backend(config, WorkerData.of(stream), self.keep_warm)
            cleanup.push(lambda kind, error, trace: backend.close(failed=kind is not None))
            baseline = task_accuracies(model, stream, config.eval.batch_size)  # the untrained model's: fwt's
            data = backend.data  # with Ray, the object store's copy: reading it lets the driver's own go
            stream.use_arrays(data.x_train, data.y_train, data.x_test, data.y_test)
            grid = SimulationGrid(
                backend,
                stream,
                states,
                config.eval.client_test_size,
                run_id=config.seed,
                on_nonfinite=config.engine.on_nonfinite,
                nonfinite_dropped=start.nonfinite_dropped,
                traffic=start.traffic,
                personal=bool(method.personal_prefixes),
                statistics=statistics,
            )
            bind_server_model([self.strategy, strategy_as_built], model, statistics)
            TaskIdentity.run_id, TaskIdentity.node_id, TaskIdentity.task_id = config.seed, SERVER_NODE_ID, 0
            outputs, elapsed = (
                RunDirectory(self.run_dir, start.records, {"rounds": rounds, **stream.derived()}),
                lambda: start.wall_s + time.perf_counter() - started,
            )
            setup = RunSetup(
                config,
                stream,
                rounds,
                start.round,
                model,
                method(config.client),
                states,
                grid,
                outputs,
                elapsed,
                strategy_as_built,
            )
            hooks, arrays = assemble_hooks(setup), start.arrays
            cleanup.callback(hooks.close)
            stop = cleanup.enter_context(stop_requests())  # Ctrl-C, SIGTERM: stop after the round, checkpointed
            for server_round in range(start.round, rounds + 1):
                # 4. Train: the strategy samples and configures, clients train, it aggregates.
                arrays, train_metrics = self._train(server_round, arrays, grid)
                # 5. At a task's last round, the strategy's own step, where it has one.
                task = stream.task_of_round(server_round)
                task_ended = server_round == rounds or stream.task_of_round(server_round + 1) != task
                if task_ended:
                    arrays = self._end_task(task, server_round, arrays, grid)
                # 6. The hooks: evaluations and probes measure, the record is logged, checkpoints save.
                view = RoundView(setup, server_round, task, task_ended, arrays, self.strategy, train_metrics)
                measured, view.interrupted = hooks.after_round(view), stop.signal_number is not None
                hooks.after_log(view, setup.outputs.log(view.record(measured)) if measured else None)
                if view.interrupted:
                    raise Interrupted(stop.signal_number, server_round)
            # 7. The end: the accuracy matrix and summary with what every hook adds, then the plots.
            end = RoundView(setup, rounds, stream.task_of_round(rounds), True, arrays, self.strategy, None)
            summary = setup.outputs.finish(setup.elapsed(), rounds, baseline, hooks.at_end(end), to_dict(config))
            hooks.finished(end)
            return summary

    def _copy_for_checkpoints(self) -> Strategy:
        """A copy of the strategy as built: each checkpoint restores its state into a copy of this, to prove the
        state whole (checkpoint.Checkpoints)."""
        try:
            return copy.deepcopy(self.strategy)
        except Exception as error:  # a user's strategy holding a lock, a file, a connection
            raise ConfigError(
                f"strategy._target_ = {type(self.strategy).__name__}: checkpoints need a copy of the strategy, "
                f"which cannot be copied ({type(error).__name__}: {error}); make it copyable, or run with "
                "engine.checkpoint_every=0"
            ) from None

    def _resumed(self, stream: Stream, rounds: int, initial: ArrayRecord, statistics: RunningStatistics) -> Start:
        """Where the newest checkpoint left the run, checked against this config."""
        where = self.run_dir / "checkpoints"
        saved = checkpoint.load(where)
        preflight.check_resumable(saved, where, self.config, stream, rounds, initial)
        checkpoint.restore_strategy(saved, self.strategy, where, statistics.parameters_of(saved.arrays))
        return Start.after(saved)

    def _train(
        self, server_round: int, arrays: ArrayRecord, grid: SimulationGrid
    ) -> tuple[ArrayRecord, MetricRecord | None]:
        """One round of the strategy's training; the new global arrays (the old where it gives none)."""
        seed = derive_seed(self.config.seed, Purpose.STRATEGY, server_round)
        call = f"round {server_round}: {type(self.strategy).__name__}"
        parameters = grid.statistics.for_strategy(arrays)  # buffers: simulator/running_statistics.py
        with grid.round(server_round), seeded_global_state(seed):
            with strategy_call(f"{call}.configure_train"):
                messages = self.strategy.configure_train(server_round, parameters, ConfigRecord(), grid)
            replies = grid.send_and_receive(messages)
            with strategy_call(f"{call}.aggregate_train"):
                new_arrays, train_metrics = self.strategy.aggregate_train(server_round, replies)
        if new_arrays is None:  # the model stays as it was, its buffers too
            return arrays, train_metrics
        new_parameters = as_global_arrays(new_arrays, parameters, f"{call}.aggregate_train")
        return grid.statistics.with_averaged(new_parameters), train_metrics

    def _end_task(self, task: int, server_round: int, arrays: ArrayRecord, grid: SimulationGrid) -> ArrayRecord:
        """The strategy's ``on_task_end(task, arrays, grid)``, where it (or one it wraps) has one: its arrays,
        if it returns any. Its random draws are seeded apart from the round's other calls."""
        hooked = [layer for _, layer in strategy_layers(self.strategy) if callable(getattr(layer, "on_task_end", None))]
        if not hooked:
            return arrays
        seed = derive_seed(self.config.seed, Purpose.STRATEGY, server_round, Draw.TASK_END_CALL)
        call = f"round {server_round}: {type(hooked[0]).__name__}.on_task_end"
        parameters = grid.statistics.for_strategy(arrays)
        with grid.round(server_round), seeded_global_state(seed), strategy_call(call):
            ended = hooked[0].on_task_end(task, parameters, grid)
        return arrays if ended is None else grid.statistics.with_averaged(as_global_arrays(ended, parameters, call))


def bind_server_model(strategies: list[Strategy | None], model: torch.nn.Module, statistics: RunningStatistics) -> None:
    """Give each layer of ``strategies`` that asks for it (``bind_model``: ``simulator.protocol.ServerModelStrategy``)
    the way to the global model on the driver: ``model_for(arrays)``, a new copy of ``model`` holding those
    parameters and the current global buffers, in eval mode (TARGET inverts it). The strategy as built for
    the checkpoints' check gets the same function: what binding sets is no state a checkpoint must keep."""

    def model_for(arrays: ArrayRecord) -> torch.nn.Module:
        server_model = copy.deepcopy(model)
        weights = zip(statistics.shared, statistics.full_weights(arrays), strict=True)
        server_model.load_state_dict({name: torch.from_numpy(array) for name, array in weights}, strict=False)
        return server_model.eval()

    for strategy in filter(None, strategies):
        for _, layer in strategy_layers(strategy):
            if callable(getattr(layer, "bind_model", None)):
                layer.bind_model(model_for)


def assemble_hooks(setup: RunSetup) -> Hooks:
    """The run's hooks in the order they measure and then act on the round's record: the shipped
    measurements, the user's ``eval.hooks``, then traffic, checkpoints, progress and plots."""
    evaluation = setup.config.eval
    hooks: list[Hook] = [HeadEvaluation(setup)]
    if evaluation.probes:
        hooks.append(Probes(setup))
    if evaluation.diagnostics:
        hooks.append(Diagnostics(setup))
    if evaluation.federated:
        hooks.append(FederatedEvaluation(setup))
    hooks += [HOOKS.resolve(name)(setup) for name in evaluation.hooks]
    hooks += [Communication(setup), Checkpoints(setup), Progress(setup), ForgettingPlot(setup)]
    return Hooks(hooks)
