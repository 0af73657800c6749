"""What runs clients: one reused model, the data, and a list of client jobs per call.

A :class:`ClientWorker` lives in a Ray actor (ray backend) or in the driver
(local backend); both call the same :meth:`ClientWorker.execute`, so both give the
same numbers. Per the speed rules: the model is built once and weights are
loaded into it in place; the data arrives once (zero-copy numpy from Ray's
object store) and each client is a slice of it by index; a call carries the
whole share of a cohort an actor trains, and the global weights once.
"""

from __future__ import annotations

import math
import traceback
import warnings
from dataclasses import dataclass
from typing import Any

import numpy as np
import torch

from clients import METHODS
from clients.base import Batch, ReadOnlyState, TrainContext, shared_keys
from clients.clipping import clip_if_asked
from clients.models import build_model, evaluate
from simulator.config import ExperimentConfig
from simulator.deadline import ClientTimeout, deadline
from simulator.protocol import (
    ACCURACY,
    EVAL_LOSS,
    LEARNING_RATE,
    NUM_EXAMPLES,
    QUERY,
    QUERY_NAME,
    TRAIN,
    TRAIN_LOSS,
    ClientJob,
    ClientOutcome,
    Query,
    check_state,
)
from simulator.seeding import Purpose, derive_seed, seed_torch_global, torch_generator


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
        method = METHODS.resolve(config.client.method)
        self.method = method(config.client)
        self.shared = shared_keys(self.model, method)  # the names of what the server sends and gets
        # Personal tensors restart from the initial model for each client: its own come from its state.
        self.initial_personal = {
            k: v.clone() for k, v in self.model.state_dict().items() if k.startswith(method.personal_prefixes)
        }

    def execute(self, jobs: list[ClientJob], weights: list[list[np.ndarray]]) -> list[ClientOutcome]:
        """Run ``jobs`` back to back; a failing client becomes an outcome with its traceback.

        The first failure (an error, a timeout) ends the call: it fails the run, so the jobs after
        it are not run (each blocked client would cost ``engine.client_timeout_s`` more) and come
        back as outcomes whose error says so. They follow a real failure in job order, which is
        the one the Grid names.
        """
        outcomes: list[ClientOutcome] = []
        for job in jobs:
            outcomes.append(self._run_one(job, weights[job.weights_index]))
            if outcomes[-1].error is not None:
                failed = outcomes[-1].client_id
                outcomes.extend(not_run(later, failed) for later in jobs[len(outcomes) :])
                break
        return outcomes

    def _run_one(self, job: ClientJob, weights: list[np.ndarray]) -> ClientOutcome:
        limit = self.config.engine.client_timeout_s
        late = f"client {job.client_id} ran longer than engine.client_timeout_s = {limit} s in round {job.server_round}"
        try:
            with deadline(limit, late):
                # Randomness a user's model or method draws from torch's global generator
                # (dropout) is the client's, whatever actor runs it.
                seed_torch_global(
                    derive_seed(self.config.seed, Purpose.CLIENT_GLOBAL, job.server_round, job.client_id), self.device
                )
                self._load(weights)
                if job.kind == TRAIN:
                    return self._train(job, weights)
                if job.kind == QUERY:
                    return self._answer(job)
                return self._evaluate(job)
        # Reported with the client id, failing the run; SystemExit too: a client's sys.exit(0)
        # must not end the run as a success.
        except (Exception, SystemExit, ClientTimeout):
            return ClientOutcome(job.client_id, None, {}, error=traceback.format_exc())

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

    def _samples(self, indices: np.ndarray, task: np.ndarray | int) -> Batch:
        """Training samples by index, masked as their task(s) are (methods fetch replayed data so)."""
        masks = self.data.task_masks
        return Batch(
            self._tensor(self.data.x_train[indices]),
            self._tensor(self.data.y_train[indices]),
            None if masks is None else self._tensor(masks[task]),
        )

    def _train(self, job: ClientJob, global_weights: list[np.ndarray]) -> ClientOutcome:
        x = self._tensor(self.data.x_train[job.indices])
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
        )
        result = self.method.train(self.model, x, y, context)
        arrays = self._weights()
        metrics = {**result.metrics, NUM_EXAMPLES: float(result.num_examples), TRAIN_LOSS: result.train_loss}
        metrics.update(clip_if_asked(arrays, global_weights, job.config))
        finite = math.isfinite(result.train_loss) and all_finite(arrays)
        return ClientOutcome(
            job.client_id,
            arrays,
            metrics,
            state=check_state(job.state if result.state is None else result.state),
            finite=finite,
        )

    def _answer(self, job: ClientJob) -> ClientOutcome:
        query = Query(
            name=str(job.config.get(QUERY_NAME, "")),  # none: an unknown query, which the error lists
            arrays=job.query_arrays,
            x=self._tensor(self.data.x_train[job.indices]),
            y=self._tensor(self.data.y_train[job.indices]),
            generator=torch_generator(self.config.seed, Purpose.CLIENT_QUERY, job.server_round, job.client_id),
            state=ReadOnlyState(job.state),
        )
        answer = self.method.answer(self.model, query)
        return ClientOutcome(
            job.client_id, list(answer.values()), {NUM_EXAMPLES: float(len(job.indices))}, array_names=list(answer)
        )

    def _evaluate(self, job: ClientJob) -> ClientOutcome:
        self.method.personalize(self.model, job.state)  # the client's own model, where it has one
        x = self._tensor(self.data.x_test[job.indices])
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


def not_run(job: ClientJob, failed: int) -> ClientOutcome:
    """The outcome of ``job``, left unrun because client ``failed`` before it failed the call."""
    reason = f"not run: client {failed} failed before it in round {job.server_round}"
    return ClientOutcome(job.client_id, None, {}, error=reason, finite=False)


def all_finite(arrays: list[np.ndarray]) -> bool:
    """Whether every value of ``arrays`` is a number (no NaN, no infinity)."""
    return all(np.isfinite(a).all() for a in arrays)
