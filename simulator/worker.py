"""What runs clients: one reused model, the data, and a list of client jobs per call.

A :class:`ClientWorker` lives in a Ray actor (ray backend) or in the driver
(local backend); both call the same :meth:`ClientWorker.execute`, so both give the
same numbers. Per the speed rules: the model is built once and weights are
loaded into it in place; the data arrives once (zero-copy numpy from Ray's
object store) and each client is a slice of it by index; a call carries the
whole share of a cohort an actor trains, and the global weights once.
"""

from __future__ import annotations

import contextlib
import logging
import math
import os
import threading
import traceback
import warnings
from collections.abc import Callable, Iterator, Mapping
from dataclasses import dataclass
from types import MappingProxyType
from typing import Any

import numpy as np
import torch

from clients import METHODS
from clients.augment import AUGMENTATIONS
from clients.base import Batch, ClientMethod, ReadOnlyState, TrainContext, shared_keys
from clients.clipping import clip_if_asked
from clients.models import build_model, evaluate
from simulator.config import NO_AUGMENTATION, ExperimentConfig
from simulator.deadline import ClientTimeout, deadline
from simulator.protocol import (
    ACCURACY,
    EVAL_LOSS,
    LEARNING_RATE,
    NUM_EXAMPLES,
    QUERY,
    QUERY_NAME,
    QUERY_SAMPLES,
    TRAIN,
    TRAIN_LOSS,
    ClientJob,
    ClientOutcome,
    Query,
    check_state,
)
from simulator.seeding import Draw, Purpose, derive_seed, rng, seed_torch_global, torch_generator

log = logging.getLogger("fedstream")


class ExitCalled(BaseException):
    """A client's code called ``os._exit`` where :func:`os_exit_guard` raises instead (the local backend).

    A BaseException, as SystemExit is, so a client's own ``except Exception`` cannot swallow it.
    """


class BadReply(TypeError):
    """A client method returned what the protocol cannot carry; the message names the method and the value."""


@dataclass(frozen=True)
class WorkerData:
    """The arrays clients index into; put in Ray's object store once per run."""

    x_train: np.ndarray
    y_train: np.ndarray
    x_test: np.ndarray
    y_test: np.ndarray
    num_classes: int
    task_masks: np.ndarray | None = None  # (tasks, labels): what each task's logits may take, if restricted

    @classmethod
    def of(cls, stream: Any) -> WorkerData:
        """The arrays and task masks of ``stream`` (a :class:`~simulator.streams.Stream`)."""
        masks = [stream.task_mask(t) for t in range(stream.num_tasks)]
        task_masks = None if masks[0] is None else np.stack(masks)
        return cls(stream.x_train, stream.y_train, stream.x_test, stream.y_test, stream.num_classes, task_masks)


class ClientWorker:
    """Trains and evaluates clients on one reused model."""

    def __init__(self, config: ExperimentConfig, data: WorkerData, gpu: bool = False) -> None:
        torch.set_num_threads(config.engine.torch_threads)
        self.config = config
        self.data = data
        self.gpu_share = config.engine.num_gpus_per_actor if gpu else None  # the card's share it capped itself at
        self.device = gpu_device(config.engine.num_gpus_per_actor) if gpu else torch.device("cpu")
        generator = torch_generator(config.seed, Purpose.MODEL_INIT)
        self.model = build_model(data.x_train.shape[1:], data.num_classes, config.model, generator).to(self.device)
        if config.engine.channels_last:
            self.model = self.model.to(memory_format=torch.channels_last)
        self.augment = None if config.data.augment == NO_AUGMENTATION else AUGMENTATIONS.resolve(config.data.augment)
        self.autocast = torch.bfloat16 if config.engine.amp == "bf16" else None
        method = METHODS.resolve(config.client.method)
        self.method = method(config.client)
        self.shared = shared_keys(self.model, method)  # the names of what the server sends and gets
        buffers = {name for name, _ in self.model.named_buffers()}  # batch norm's statistics: never clipped
        self.clipped = [i for i, name in enumerate(self.shared) if name not in buffers]
        # Personal tensors restart from the initial model for each client: its own come from its state.
        self.initial_personal = {
            k: v.clone() for k, v in self.model.state_dict().items() if k.startswith(method.personal_prefixes)
        }
        self.running: ClientJob | None = None  # the job whose client's code runs now, for os_exit_guard

    def execute(self, jobs: list[ClientJob], weights: list[list[np.ndarray]]) -> list[ClientOutcome]:
        """Run ``jobs`` back to back; a failing client becomes an outcome with its traceback.

        The first failure (an error, a timeout) ends the call: it fails the run, so the jobs after
        it are not run (each blocked client would cost ``engine.client_timeout_s`` more) and come
        back as outcomes whose error says so. They follow a real failure in job order, which is
        the one the Grid names.
        """
        outcomes: list[ClientOutcome] = []
        payloads: dict[int, Mapping[str, torch.Tensor]] = {}  # on the device once per call, whatever its clients
        for job in jobs:
            outcomes.append(self._run_one(job, weights, payloads))
            if outcomes[-1].error is not None:
                failed = outcomes[-1].client_id
                outcomes.extend(not_run(later, failed) for later in jobs[len(outcomes) :])
                break
        return outcomes

    def _run_one(
        self, job: ClientJob, sets: list[list[np.ndarray]], payloads: dict[int, Mapping[str, torch.Tensor]]
    ) -> ClientOutcome:
        """``sets``: the call's weights and payloads, by index; ``payloads``: those on the device so far."""
        weights = sets[job.weights_index]
        limit = self.config.engine.client_timeout_s
        late = f"client {job.client_id} ran longer than engine.client_timeout_s = {limit} s in round {job.server_round}"
        self.running = job
        try:
            with deadline(limit, late):
                # Randomness a user's model or method draws from torch's global generator
                # (dropout) is the client's, whatever actor runs it.
                seed_torch_global(
                    derive_seed(self.config.seed, Purpose.CLIENT_GLOBAL, job.server_round, job.client_id), self.device
                )
                self._load(weights)
                if job.kind == TRAIN:
                    return self._train(job, weights, self._payload(job, sets, payloads))
                if job.kind == QUERY:
                    return self._answer(job)
                return self._evaluate(job)
        except BadReply as error:  # raised here, after the method returned: its message says it all
            return ClientOutcome(job.client_id, None, {}, error=str(error))
        # Reported with the client id, failing the run; SystemExit and os._exit too: a client's
        # sys.exit(0) must not end the run as a success.
        except (Exception, SystemExit, ClientTimeout, ExitCalled):
            return ClientOutcome(job.client_id, None, {}, error=traceback.format_exc())
        finally:
            self.running = None

    def _load(self, weights: list[np.ndarray]) -> None:
        # Weights from Ray's object store are read-only views; copy_ only reads them.
        with torch.no_grad(), warnings.catch_warnings():
            warnings.filterwarnings("ignore", message="The given NumPy array is not writable")
            state = self.model.state_dict()  # fresh: a method may have rebound a parameter's storage
            for name, array in zip(self.shared, weights, strict=True):
                state[name].copy_(torch.from_numpy(array))
            if self.initial_personal:
                self.model.load_state_dict(self.initial_personal, strict=False)

    def _weights(self) -> list[np.ndarray]:
        state = self.model.state_dict()
        return [state[name].detach().cpu().numpy().copy() for name in self.shared]

    def _tensor(self, array: np.ndarray | None) -> torch.Tensor | None:
        return None if array is None else torch.from_numpy(array).to(self.device)

    def _inputs(self, array: np.ndarray) -> torch.Tensor:
        """Model inputs on the device, in channels-last memory where ``engine.channels_last`` asks."""
        x = torch.from_numpy(array).to(self.device)
        return x.contiguous(memory_format=torch.channels_last) if self.config.engine.channels_last else x

    def _augmentation(self, job: ClientJob) -> Callable[[torch.Tensor], torch.Tensor] | None:
        """``data.augment`` drawing from the client's own generator for the round (clients/augment.py), its
        batches back in channels-last memory where ``engine.channels_last`` asks (a gather makes them plain)."""
        if self.augment is None:
            return None
        augment = self.augment
        generator = torch_generator(self.config.seed, Purpose.AUGMENT, job.server_round, job.client_id)
        if self.config.engine.channels_last:
            return lambda x: augment(x, generator).contiguous(memory_format=torch.channels_last)
        return lambda x: augment(x, generator)

    def _samples(self, indices: np.ndarray, task: np.ndarray | int) -> Batch:
        """Training samples by index, masked as their task(s) are (methods fetch replayed data so)."""
        masks = self.data.task_masks
        return Batch(
            self._inputs(self.data.x_train[indices]),
            self._tensor(self.data.y_train[indices]),
            None if masks is None else self._tensor(masks[task]),
        )

    def _payload(
        self, job: ClientJob, sets: list[list[np.ndarray]], payloads: dict[int, Mapping[str, torch.Tensor]]
    ) -> Mapping[str, torch.Tensor]:
        """The job's payload by name on the device, copied there once per call (the empty mapping for none): every
        client of the call that shares it gets the same tensors, which ``_train`` checks no client changed."""
        if job.payload is None:
            return MappingProxyType({})
        if job.payload.index not in payloads:
            arrays = sets[job.payload.index]
            tensors = {name: torch.tensor(array, device=self.device) for name, array in zip(job.payload.names, arrays)}
            payloads[job.payload.index] = MappingProxyType(tensors)
        return payloads[job.payload.index]

    def _train(
        self, job: ClientJob, global_weights: list[np.ndarray], payload: Mapping[str, torch.Tensor]
    ) -> ClientOutcome:
        x = self._inputs(self.data.x_train[job.indices])
        y = self._tensor(self.data.y_train[job.indices])
        context = TrainContext(
            server_round=job.server_round,
            client_id=job.client_id,
            task=job.task,
            config=job.config,
            generator=torch_generator(self.config.seed, Purpose.CLIENT_TRAIN, job.server_round, job.client_id),
            lr=float(job.config.get(LEARNING_RATE, self.config.client.lr)),
            state=job.state,
            samples=self._samples,
            new_task=job.new_task,
            previous=job.previous,
            class_mask=self._tensor(job.class_mask),
            augment=self._augmentation(job),
            autocast=self.autocast,
            payload=payload,
        )
        versions = {name: tensor._version for name, tensor in payload.items()}
        result = self.method.train(self.model, x, y, context)
        changed = [name for name, tensor in payload.items() if tensor._version != versions[name]]
        if changed:  # the clients after it on this worker would see the change: results would depend on the actor
            raise BadReply(
                f"client {job.client_id} changed the payload's {changed} in place in round {job.server_round}; the "
                "payload is shared by a worker's clients: copy it first (.clone())"
            )
        hook = "end" if type(self.method).train is ClientMethod.train else "train"  # what gave the metrics
        check_metrics(result.metrics, f"{type(self.method).__name__}.{hook}")
        arrays = self._weights()
        metrics = {**result.metrics, NUM_EXAMPLES: float(result.num_examples), TRAIN_LOSS: result.train_loss}
        clipped = [arrays[i] for i in self.clipped], [global_weights[i] for i in self.clipped]
        metrics.update(clip_if_asked(*clipped, job.config))
        finite = math.isfinite(result.train_loss) and all_finite(arrays)
        return ClientOutcome(
            job.client_id,
            arrays,
            metrics,
            state=check_state(job.state if result.state is None else result.state),
            finite=finite,
        )

    def _answer(self, job: ClientJob) -> ClientOutcome:
        indices = job.indices
        cap = job.config.get(QUERY_SAMPLES)
        if cap is not None and len(indices) > cap:  # the same subset for every query of the round
            draw = rng(self.config.seed, Purpose.CLIENT_QUERY, job.server_round, job.client_id, Draw.QUERY_SAMPLE)
            indices = np.sort(draw.choice(indices, int(cap), replace=False))
        query = Query(
            name=str(job.config.get(QUERY_NAME, "")),  # none: an unknown query, which the error lists
            arrays=job.query_arrays,
            x=self._inputs(self.data.x_train[indices]),
            y=self._tensor(self.data.y_train[indices]),
            generator=torch_generator(self.config.seed, Purpose.CLIENT_QUERY, job.server_round, job.client_id),
            state=ReadOnlyState(job.state),
        )
        answer = self.method.answer(self.model, query)
        return ClientOutcome(
            job.client_id, list(answer.values()), {NUM_EXAMPLES: float(len(indices))}, array_names=list(answer)
        )

    def _evaluate(self, job: ClientJob) -> ClientOutcome:
        self.method.personalize(self.model, job.state)  # the client's own model, where it has one
        x = self._inputs(self.data.x_test[job.indices])
        y = self._tensor(self.data.y_test[job.indices])
        mask = self._tensor(job.class_mask)
        loss, accuracy = evaluate(self.model, x, y, self.config.eval.batch_size, mask)
        metrics = {NUM_EXAMPLES: float(len(job.indices)), ACCURACY: accuracy, EVAL_LOSS: loss}
        return ClientOutcome(job.client_id, None, metrics)


def gpu_device(share: float) -> torch.device:
    """The GPU an actor was given, its memory capped at ``share`` of the card when it shares one.

    Ray's fractional GPUs only schedule: without a cap, one actor's caching
    allocator can take the whole card from the others. A torch without CUDA
    is an error, not a silent fall back to the CPU.
    """
    if not torch.cuda.is_available():
        raise RuntimeError(
            f"engine.num_gpus_per_actor = {share:g}, but this actor's torch {torch.__version__} "
            f"{'has no CUDA' if torch.version.cuda is None else 'sees no CUDA device'}: install a CUDA "
            "build of torch on every node, or set engine.num_gpus_per_actor=0"
        )
    if share < 1:
        torch.cuda.set_per_process_memory_fraction(share)
    return torch.device("cuda")


def check_metrics(metrics: Any, method: str) -> None:
    """A :class:`BadReply` naming ``method`` unless ``metrics`` is a dict Flower's MetricRecord takes, as it
    checks: string keys; values ints or floats (not bools), or lists of only ints or only floats."""
    if not isinstance(metrics, Mapping):
        raise BadReply(f"{method} returned {_short(metrics)} ({type(metrics).__name__}), not a dict of metrics")
    for key, value in metrics.items():
        if not isinstance(key, str):
            raise BadReply(f"{method} returned a metric named {_short(key)} ({type(key).__name__}): names are strings")
        items = value if isinstance(value, list) else [value]
        if all(_number(item) and isinstance(item, type(items[0])) for item in items):
            continue
        kind = f"a list of {', '.join(sorted({type(v).__name__ for v in value}))}" if items is value else None
        raise BadReply(
            f"{method} returned metrics[{key!r}] = {_short(value)} ({kind or f'a {type(value).__name__}'}); a "
            "metric is an int or a float, or a list of only ints or only floats (a tensor: .item(); numpy: float())"
        )


def _number(value: Any) -> bool:
    return isinstance(value, (int, float)) and not isinstance(value, bool)


def _short(value: Any, limit: int = 60) -> str:
    text = repr(value)
    return text if len(text) <= limit else text[: limit - 3] + "..."


@contextlib.contextmanager
def os_exit_guard(worker: ClientWorker, before_exit: Callable[[str], None] | None = None) -> Iterator[None]:
    """``os._exit`` replaced while ``worker`` runs clients: a call from a client's code names the client.

    ``os._exit`` ends a process at once, without unwinding or atexit: in the driver (the local backend)
    it would end the run with the client's exit code and no message, ``os._exit(0)`` as a success. Here,
    without ``before_exit``, a call in the thread that entered the guard raises :class:`ExitCalled`, which
    fails the client as an error does; from another thread of the client's it logs the client and ends
    the process with exit code 1. With ``before_exit`` (a Ray actor, which may die: Ray restarts it),
    ``before_exit`` gets a line naming the client and round, and the process exits as asked. A forked
    child's ``os._exit`` (a DataLoader worker's) and a call while no client runs are left alone. What
    cannot be caught: C code that calls ``exit()`` or ``abort()``, a signal that kills the process;
    ``engine.backend=ray`` runs clients in actors, and reports such a death naming the actor's clients.
    """
    real, pid, thread = os._exit, os.getpid(), threading.get_ident()

    def guarded(code: int) -> None:
        job = worker.running
        if os.getpid() != pid or job is None:
            real(code)
        what = f"client {job.client_id} called os._exit({code}) in round {job.server_round}"
        if before_exit is not None:
            before_exit(what)
            real(code)
        if threading.get_ident() == thread:
            raise ExitCalled(
                f"{what}: on the local backend clients run in the driver's process, which it would end "
                "without a word; raise an exception to fail the client"
            )
        log.error("%s from a thread of its own: the run ends here, with exit code 1", what)
        real(1)

    os._exit = guarded
    try:
        yield
    finally:
        os._exit = real


def not_run(job: ClientJob, failed: int) -> ClientOutcome:
    """The outcome of ``job``, left unrun because client ``failed`` before it failed the call."""
    reason = f"not run: client {failed} failed before it in round {job.server_round}"
    return ClientOutcome(job.client_id, None, {}, error=reason, finite=False)


def all_finite(arrays: list[np.ndarray]) -> bool:
    """Whether every value of ``arrays`` is a number (no NaN, no infinity)."""
    return all(np.isfinite(a).all() for a in arrays)
