"""The round loop: the one place that owns it.

An :class:`Experiment` drives a Flower strategy's ``configure_*`` / ``aggregate_*``
methods itself, through our :class:`~simulator.grid.SimulationGrid`, so that it
can evaluate, log and checkpoint between them. Every strategy call runs under
global random state seeded from (run seed, round): Flower samples clients with
``random.sample``, and that makes the cohort a function of the seed.
"""

from __future__ import annotations

import logging
import shutil
import time
from pathlib import Path
from typing import Any

import numpy as np
import torch
from flwr.app import ArrayRecord, ConfigRecord, MetricRecord
from flwr.serverapp.strategy import Strategy
from flwr.supercore.task_identity import TaskIdentity
from tqdm import tqdm

from clients import resolve_method
from clients.fedprox import FedProxClient
from clients.base import ClientMethod, shared_keys
from clients.models import build_model
from simulator import checkpoint, metrics
from simulator.backends import ClientFailure, make_backend
from simulator.client_state import ClientStates
from simulator.config import ConfigError, RunConfig, to_dict
from simulator.data import load_dataset
from simulator.evaluation import accuracy_record, client_accuracies, task_accuracies
from simulator.grid import SimulationGrid
from simulator.keys import ACCURACY, NUM_EXAMPLES, PROXIMAL_MU, TRAIN_LOSS
from simulator.plot import plot_forgetting
from simulator.probes import probe_record
from simulator.run_dir import RunDirectory
from simulator.seeding import Purpose, derive_seed, seeded_global_state, torch_generator
from simulator.streams import Stream, build_stream
from simulator.worker import WorkerData, all_finite
from strategies import check_sampling, strategy_layers

SERVER_NODE_ID = 1  # Flower's SuperLink node id: the source of every instruction
log = logging.getLogger("fedstream")


class Experiment:
    """One scenario, one strategy, one seed: runs and writes its run directory."""

    def __init__(self, run: RunConfig, strategy: Strategy, run_dir: Path, resume: bool = False) -> None:
        self.run_cfg = run
        self.strategy = strategy
        self.run_dir = run_dir
        self.resume = resume

    def run(self) -> dict[str, Any]:
        """Run every round; return the summary written to ``summary.json``."""
        cfg = self.run_cfg
        started, wall_offset = time.perf_counter(), 0.0
        elapsed = lambda: wall_offset + time.perf_counter() - started  # noqa: E731
        logging.getLogger("flwr").setLevel(logging.WARNING)

        # 1. Data and stream: what each client holds at each round. Values only the
        #    data can refute (and the client method's name) fail here, before Ray starts.
        method = resolve_method(cfg.client.method)
        stream = build_stream(cfg, load_dataset(cfg.data, cfg.federation.num_clients, cfg.seed))
        rounds = cfg.rounds or stream.default_rounds
        if rounds is None:
            raise ConfigError(f"rounds = None: stream.kind = {cfg.stream.kind!r} needs rounds set")
        fewest = min(len(stream.available_clients(r)) for r in range(1, rounds + 1))
        check_sampling(self.strategy, fewest, f"the fewest in any round of stream.kind = {cfg.stream.kind!r}",
                       federated_evaluation=cfg.eval.federated)

        # 2. Model: the server's copy, seeded; its weights are the initial global arrays,
        #    and its accuracy on each task is the baseline of forward transfer.
        model = build_model(
            stream.x_train.shape[1:], stream.num_classes, cfg.model,
            torch_generator(cfg.seed, Purpose.MODEL_INIT),
        )
        _check_model_serves(model, method, cfg)
        client_method = method(cfg.client)  # the server's: it personalises models for evaluation
        # What travels: all of the model, but the layers each client keeps for itself.
        shared = set(shared_keys(model, method))
        arrays = ArrayRecord({k: v for k, v in model.state_dict().items() if k in shared})
        first_round, saved_states = 1, None
        initial = task_accuracies(model, stream, cfg.eval.batch_size)

        # 3. Resume from the last finished round, if asked: weights, strategy, client states.
        #    The checkpoint is read before Ray starts, and its strategy only through an allow-list.
        records: list[dict[str, Any]] = []
        nonfinite_dropped = 0
        previous_files: list[str] = []  # the client-state files the previous kept checkpoint names
        if self.resume:
            strategy_modules = {type(layer).__module__ for _, layer in strategy_layers(self.strategy)}
            saved = checkpoint.load(self.run_dir / "checkpoints", strategy_modules)
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
            self._check_saved_strategy(saved.strategy, saved.arrays, fewest, arrays)
            arrays, self.strategy, saved_states = saved.arrays, saved.strategy, saved.client_states
            first_round, wall_offset, records = saved.round + 1, saved.wall_s, saved.records
            nonfinite_dropped = saved.nonfinite_dropped
            previous_files = list(saved_states.files.values())
        states = ClientStates(
            self.run_dir / checkpoint.CLIENT_STATE_DIR, int(cfg.engine.client_state_memory_mb * 2**20), saved_states
        )
        self._warn_unused_proximal_term()

        # 4. Clients: a backend (Ray actors or in-process) behind Flower's Grid interface.
        backend = make_backend(cfg, WorkerData.of(stream))
        stream.use_arrays(backend.data)  # with Ray, the object store's copy: the driver's own is freed
        outputs = RunDirectory(self.run_dir, records)  # after every check: a refused run writes nothing
        grid = SimulationGrid(backend, stream, states, cfg.eval.client_test_size, run_id=cfg.seed,
                              on_nonfinite=cfg.engine.on_nonfinite, nonfinite_dropped=nonfinite_dropped,
                              personal=bool(method.personal_prefixes))
        TaskIdentity.run_id, TaskIdentity.node_id, TaskIdentity.task_id = cfg.seed, SERVER_NODE_ID, 0
        progress = tqdm(
            range(first_round, rounds + 1), initial=first_round - 1, total=rounds,
            desc="round", unit="round", dynamic_ncols=True,
        )
        try:
            for server_round in progress:
                # 5. Train: the strategy samples and configures, clients train, it aggregates.
                grid.server_round = server_round
                with seeded_global_state(derive_seed(cfg.seed, Purpose.STRATEGY, server_round)):
                    messages = self.strategy.configure_train(server_round, arrays, ConfigRecord(), grid)
                    replies = grid.send_and_receive(messages)
                    new_arrays, train_metrics = self.strategy.aggregate_train(server_round, replies)
                if new_arrays is not None:
                    _check_finite(new_arrays, server_round, self.strategy)
                    arrays = new_arrays
                task = stream.task_of_round(server_round)
                last_of_task = server_round == rounds or stream.task_of_round(server_round + 1) != task
                if last_of_task:
                    arrays = self._end_task(task, server_round, arrays, grid)

                # 6. Evaluate the global model on every task, and on the clients' own data,
                #    every eval.every rounds and at the end of every task; probe its encoder
                #    at the end of every task and every eval.probe_every rounds.
                every_probe = cfg.eval.probe_every
                probe = cfg.eval.probes and (last_of_task or bool(every_probe and server_round % every_probe == 0))
                if server_round % cfg.eval.every == 0 or last_of_task or probe:
                    model.load_state_dict(arrays.to_torch_state_dict(), strict=not method.personal_prefixes)
                    record = self._evaluate(model, stream, server_round, train_metrics, client_method, states)
                    if probe:
                        record.update(probe_record(model, stream, server_round, cfg.seed,
                                                   cfg.eval.probe_samples, cfg.eval.batch_size))
                    record["nonfinite_dropped"] = grid.nonfinite_dropped
                    record["client_state_mb"] = round(states.total_bytes / 2**20, 6)
                    record["client_state_spilled_mb"] = round(states.spilled_bytes / 2**20, 6)
                    record["wall_s"] = round(elapsed(), 3)
                    if cfg.eval.federated:  # with personal layers, each client evaluates its own model
                        key = "federated_acc_personal" if method.personal_prefixes else "federated_acc"
                        record[key] = self._federated_evaluation(server_round, arrays, grid)
                    outputs.log(record)
                    progress.set_postfix(task=task, loss=record["train_loss"], acc=f"{record['acc_seen']:.3f}")

                # 7. Checkpoint, so a crash never loses a finished round; then the client
                #    states' spill files that neither kept checkpoint names can go.
                every = cfg.engine.checkpoint_every
                if every and (server_round % every == 0 or server_round == rounds):
                    snapshot = states.snapshot()
                    checkpoint.save(self.run_dir / "checkpoints", checkpoint.Checkpoint(
                        round=server_round, arrays=arrays, strategy=self.strategy,
                        client_states=snapshot, wall_s=elapsed(), config=to_dict(cfg),
                        num_tasks=stream.num_tasks, records=outputs.records,
                        nonfinite_dropped=grid.nonfinite_dropped,
                    ))
                    states.collect(keep=previous_files)
                    previous_files = list(snapshot.files.values())
                elif not every:
                    states.collect()
        finally:
            progress.close()
            backend.close()

        # 8. Outputs: accuracy matrix, summary, forgetting plot. Without checkpoints no run
        #    can continue this one, so its client states' files go.
        if not cfg.engine.checkpoint_every:
            shutil.rmtree(states.directory, ignore_errors=True)
        summary = outputs.finish(elapsed(), rounds, initial)
        plot_forgetting(outputs.records, self.run_dir / "plots" / "forgetting.png",
                        title=f"{cfg.scenario} / {type(self.strategy).__name__}")
        return summary

    def _evaluate(
        self, model: torch.nn.Module, stream: Stream, server_round: int, train_metrics: MetricRecord | None,
        method: ClientMethod, states: ClientStates,
    ) -> dict[str, Any]:
        """One metrics.jsonl record: accuracy per task (None where unseen) and across clients.

        Where the client method keeps personal layers, ``client_acc_personal_*`` scores
        each client with its own model too: the global encoder under its personal head.
        """
        cfg = self.run_cfg
        accuracies = task_accuracies(model, stream, cfg.eval.batch_size)
        scored = (stream, server_round, cfg.seed, cfg.eval.max_clients, cfg.eval.client_test_size,
                  cfg.eval.batch_size)
        record = {
            "round": server_round,
            "task": stream.task_of_round(server_round),
            "train_loss": _metric(train_metrics, TRAIN_LOSS),
            **accuracy_record("acc", accuracies, stream, stream.seen_tasks(server_round)),
            **metrics.accuracy_spread(client_accuracies(model, *scored)),
            **_client_metrics(train_metrics),
        }
        if method.personal_prefixes:
            initial = {k: v.clone() for k, v in model.state_dict().items() if k.startswith(method.personal_prefixes)}

            def personalize(client: int) -> None:
                model.load_state_dict(initial, strict=False)
                method.personalize(model, states.get(client))

            personal = client_accuracies(model, *scored, personalize=personalize)
            model.load_state_dict(initial, strict=False)
            record.update(metrics.accuracy_spread(personal, "client_acc_personal"))
        return record

    def _end_task(self, task: int, server_round: int, arrays: ArrayRecord, grid: SimulationGrid) -> ArrayRecord:
        """The strategy's ``on_task_end(task, arrays, grid)``, where it has one: its arrays, if it returns any.

        The FedStream protocol for server-side continual methods: a Flower strategy
        without the method is untouched. Through the Grid it may query clients
        (``MessageType.QUERY``); its random draws are seeded like its rounds'.
        """
        on_task_end = getattr(self.strategy, "on_task_end", None)
        if not callable(on_task_end):
            return arrays
        with seeded_global_state(derive_seed(self.run_cfg.seed, Purpose.STRATEGY, server_round, 2)):
            ended = on_task_end(task, arrays, grid)
        if ended is None:
            return arrays
        _check_finite(ended, server_round, self.strategy)
        return ended

    def _federated_evaluation(self, server_round: int, arrays: ArrayRecord, grid: SimulationGrid) -> float | None:
        """The strategy's own client-side evaluation: sampled clients on their local test samples."""
        with seeded_global_state(derive_seed(self.run_cfg.seed, Purpose.STRATEGY, server_round, 1)):
            messages = self.strategy.configure_evaluate(server_round, arrays, ConfigRecord(), grid)
            metrics = self.strategy.aggregate_evaluate(server_round, grid.send_and_receive(messages))
        return _metric(metrics, ACCURACY)

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

    def _warn_unused_proximal_term(self) -> None:
        mu = max(getattr(layer, "proximal_mu", 0.0) for _, layer in strategy_layers(self.strategy))
        if mu and not issubclass(resolve_method(self.run_cfg.client.method), FedProxClient):
            log.warning(
                "the strategy sends %s=%s but client.method=%s ignores it; "
                "set client.method=fedprox to apply the proximal term",
                PROXIMAL_MU, mu, self.run_cfg.client.method,
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


def _check_finite(arrays: ArrayRecord, server_round: int, strategy: Strategy) -> None:
    """Stop where the global model stops being numbers, naming the round and the strategy."""
    if not all_finite(arrays.to_numpy_ndarrays()):
        raise ClientFailure(
            f"round {server_round}: {type(strategy).__name__} aggregated non-finite global weights "
            "(training diverged)"
        )


def _client_metrics(record: MetricRecord | None) -> dict[str, float]:
    """The strategy's aggregate of what the clients' method reported, as ``train/<name>``."""
    if record is None:
        return {}
    return {
        f"train/{key}": float(value) for key, value in record.items()
        if key not in (NUM_EXAMPLES, TRAIN_LOSS) and isinstance(value, (int, float))
    }


def _metric(record: MetricRecord | None, key: str) -> float | None:
    """A float from an aggregated MetricRecord, or None where the strategy gave none."""
    if record is None or key not in record:
        return None
    return float(np.asarray(record[key]))
