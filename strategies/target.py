"""TARGET: Zhang, Chen, Zhuang & Lyu 2023, "TARGET: Federated Class-Continual Learning via Exemplar-Free
Distillation" (ICCV); the authors' code: github.com/zj-jayzhang/Federated-Class-Continual-Learning.

The server half (the client half: ``clients/target.py``, ``client.method=target``;
the run refuses one without the other). A FedAvg that, at the end of every
task but the last:

1. asks each present client what its data of the task looks like
   (``clients.target.describe_data``, by dotted path: the labels it holds, its
   inputs' shape and per-channel range; no sample leaves a client), and adds
   the labels to the classes seen so far;
2. inverts the global model: trains a generator on the driver's CPU so that
   the global model classifies its samples as the seen classes, their batch
   norm statistics match the global model's (where it has batch norm) and a
   student distilled from the global model disagrees with it on them
   (``strategies/generator.py`` has the losses and what differs from the
   authors' code), and keeps ``synthetic_samples`` of them, balanced over the
   seen classes;
3. from the next round on, sends every training message a payload
   (``strategies.payload.add_payload``): the samples (``synthetic``), the seen
   classes (``old_classes``) and the global parameters of the task end
   (``teacher/<name>``), until the next task end replaces them. Clients add to
   their cross-entropy a distillation from that teacher on the samples.

The global model itself is not changed at a task end. Every draw comes from
torch's global generator, seeded from numpy's global state (which the engine
seeds for ``on_task_end`` from the run seed and round), under ``fork_rng``, on
one CPU thread (so that the samples do not depend on the driver's thread
count, which differs between the local backend and Ray). The synthesis's cost
per task end is logged at INFO on ``fedstream`` and kept in ``task_end_costs``.

Defaults (``scenarios/strategy/target.yaml`` repeats them): the authors' CIFAR-100
settings (``methods/target.py``) where they fit: latent 256, generator lr 0.002,
latent lr 0.01, Adam betas (0.5, 0.999), CE weight 0.5, BN weight 10,
adversarial weight 1, batches of 256, 10 generator steps a batch, student lr
0.2 at T=20. Four differ, to keep a task end on a 2-core CPU to under a minute
at 28x28: ``synthetic_samples`` 1,024 (theirs make 10 batches, 2,560 samples;
``--nums`` caps the set at 8,000), ``generator_width`` 16 (64), and
``warmup_batches`` 1 with ``student_steps`` 20 (theirs warm up for 20 batches of
10, so that on CIFAR-100 the student and the adversarial term never start; on
Tiny-ImageNet 20 of 200, then 400 student steps a batch): here the paper's
diversity term runs.
"""

from __future__ import annotations

import logging
import weakref
from collections.abc import Callable, Iterable
from typing import Any, ClassVar

import numpy as np
import torch
from flwr.app import ArrayRecord, ConfigRecord, Message
from flwr.serverapp import Grid
from flwr.serverapp.strategy import FedAvg
from torch import nn

from simulator.config import ConfigError
from simulator.protocol import NUM_SAMPLES, NUM_TASKS
from strategies.generator import SynthesisSettings, synthesize
from strategies.payload import add_payload
from strategies.queries import ask_clients
from strategies.state import StrategyStateError, expect_keys, float_array

log = logging.getLogger("fedstream")

# The client half's query handler (clients/target.py), named by dotted path as clients/queries.py allows,
# and its answer's keys; the payload's names (clients/target.py reads the same).
DESCRIBE_DATA = "clients.target.describe_data"
CLASSES, SHAPE, LOW, HIGH = "classes", "shape", "low", "high"
SYNTHETIC, OLD_CLASSES, TEACHER_PREFIX = "synthetic", "old_classes", "teacher/"

# Each strategy's bound model_for (bind_model), beside it: a checkpoint compares a strategy's attributes with
# those of a copy as built, which is never bound.
_SERVER_MODELS: weakref.WeakKeyDictionary[Any, Callable[[ArrayRecord], nn.Module]] = weakref.WeakKeyDictionary()

_INTEGERS = (
    "synthetic_samples",
    "synthesis_batch_size",
    "generator_steps",
    "latent_dim",
    "generator_width",
)
_NON_NEGATIVE_INTEGERS = ("warmup_batches", "student_steps")
_POSITIVE = ("generator_lr", "latent_lr", "student_lr", "student_temperature")
_NON_NEGATIVE = ("ce_weight", "bn_weight", "adversarial_weight")


class TARGET(FedAvg):
    """FedAvg that, at each task end, synthesises samples of the seen classes by inverting the global model
    and sends them, with that model as the teacher, to the next task's clients."""

    client_half: ClassVar[str] = "target"  # clients/__init__.py METHODS: the client method it needs

    def __init__(
        self,
        *args: Any,
        synthetic_samples: int = 1024,
        synthesis_batch_size: int = 256,
        generator_steps: int = 10,
        latent_dim: int = 256,
        generator_width: int = 16,
        generator_lr: float = 0.002,
        latent_lr: float = 0.01,
        ce_weight: float = 0.5,
        bn_weight: float = 10.0,
        adversarial_weight: float = 1.0,
        warmup_batches: int = 1,
        student_steps: int = 20,
        student_lr: float = 0.2,
        student_temperature: float = 20.0,
        **kwargs: Any,
    ) -> None:
        super().__init__(*args, **kwargs)
        values = dict(locals())
        for key in _INTEGERS + _NON_NEGATIVE_INTEGERS:
            value, least = values[key], 1 if key in _INTEGERS else 0
            if not isinstance(value, int) or isinstance(value, bool) or value < least:
                raise ConfigError(f"strategy.{key} = {value!r}: expected an integer >= {least}")
        for key in _POSITIVE + _NON_NEGATIVE:
            value = values[key]
            ok = isinstance(value, (int, float)) and not isinstance(value, bool) and np.isfinite(value)
            if not ok or value < 0 or (key in _POSITIVE and value == 0):
                raise ConfigError(
                    f"strategy.{key} = {value!r}: expected a number {'>' if key in _POSITIVE else '>='} 0"
                )
        if min(synthetic_samples, synthesis_batch_size) > 1 and synthetic_samples % synthesis_batch_size == 1:
            raise ConfigError(  # the generator's batch norm cannot train on a batch of one
                f"strategy.synthetic_samples = {synthetic_samples} leaves a last batch of 1 sample with "
                f"strategy.synthesis_batch_size = {synthesis_batch_size}; change either"
            )
        self.synthesis = SynthesisSettings(
            samples=synthetic_samples,
            batch_size=synthesis_batch_size,
            generator_steps=generator_steps,
            latent_dim=latent_dim,
            generator_width=generator_width,
            generator_lr=float(generator_lr),
            latent_lr=float(latent_lr),
            ce_weight=float(ce_weight),
            bn_weight=float(bn_weight),
            adversarial_weight=float(adversarial_weight),
            warmup_batches=warmup_batches,
            student_steps=student_steps,
            student_lr=float(student_lr),
            student_temperature=float(student_temperature),
        )
        self.seen_classes: list[int] = []  # every class a task end's clients held
        self.synthetic_x: np.ndarray | None = None  # the last task end's samples, float32 (N, *input shape)
        self.synthetic_y: np.ndarray | None = None  # the class each was made for
        self.teacher: dict[str, np.ndarray] = {}  # the last task end's global parameters, by name
        self.task_end_costs: list[dict[str, Any]] = []  # per task end: task, seconds, steps, samples

    def bind_model(self, model_for: Callable[[ArrayRecord], nn.Module]) -> None:
        """The engine's ``model_for(arrays)``: a new CPU copy of the global model holding ``arrays`` (and the
        current batch norm buffers), in eval mode (simulator.protocol.ServerModelStrategy). Called before the
        first round and on resume: not state, so it is kept beside the strategy, not in its attributes, which
        checkpoints prove restorable."""
        _SERVER_MODELS[self] = model_for

    @property
    def model_for(self) -> Callable[[ArrayRecord], nn.Module] | None:
        return _SERVER_MODELS.get(self)

    # --- rounds ---------------------------------------------------------------------------------------

    def configure_train(
        self, server_round: int, arrays: ArrayRecord, config: ConfigRecord, grid: Grid
    ) -> Iterable[Message]:
        messages = list(super().configure_train(server_round, arrays, config, grid))
        if self.synthetic_x is None:
            return messages
        payload = {
            SYNTHETIC: self.synthetic_x,
            OLD_CLASSES: np.asarray(self.seen_classes, dtype=np.int64),
            **{TEACHER_PREFIX + name: array for name, array in self.teacher.items()},
        }
        return add_payload(messages, arrays=payload, config={})

    def on_task_end(self, task: int, arrays: ArrayRecord, grid: Grid) -> None:
        """Synthesise samples of every class seen so far from the global model (not at the stream's last task,
        where nothing would use them); the global model is left as it is."""
        if task + 1 == grid.run.override_config.get(NUM_TASKS):
            return None
        if self.model_for is None:
            raise RuntimeError("strategy=target needs the global model at a task end: bind_model was never called")
        answers = [a for a in ask_clients(grid, arrays, DESCRIBE_DATA) if int(a[NUM_SAMPLES]) > 0]
        if not answers:
            log.warning("target: task %d end: no present client holds data; the samples stay as they were", task)
            return None
        shape, low, high, classes = described(answers)
        self.seen_classes = sorted(set(self.seen_classes) | set(classes))
        teacher, student = self.model_for(arrays), self.model_for(arrays)
        seed = int(np.random.randint(0, 2**63 - 1, dtype=np.int64))  # the engine seeds numpy's global state
        threads = torch.get_num_threads()
        try:
            torch.set_num_threads(1)
            with torch.random.fork_rng(devices=[]):
                torch.random.default_generator.manual_seed(seed)
                redrawn(student)
                made = synthesize(teacher, student, np.asarray(self.seen_classes), shape, low, high, self.synthesis)
        finally:
            torch.set_num_threads(threads)
        self.synthetic_x, self.synthetic_y = made.x, made.y
        self.teacher = {name: array.copy() for name, array in zip(arrays.keys(), arrays.to_numpy_ndarrays())}
        cost = {
            "task": int(task),
            "seconds": round(made.seconds, 3),
            "generator_steps": made.generator_steps,
            "student_steps": made.student_steps,
            "samples": len(made.x),
            "classes": len(self.seen_classes),
            "teacher_agreement": round(made.teacher_agreement, 4),
        }
        self.task_end_costs.append(cost)
        log.info(
            "target: task %d end: %d samples of %d classes (input %s) in %.1f s: %d generator steps, %d student "
            "steps; the global model gives %.0f%% of them the class they were made for",
            task,
            len(made.x),
            len(self.seen_classes),
            "x".join(map(str, shape)),
            made.seconds,
            made.generator_steps,
            made.student_steps,
            100 * made.teacher_agreement,
        )
        return None

    # --- state ----------------------------------------------------------------------------------------

    def checkpoint_state(self) -> dict[str, Any]:
        """The seen classes, the last task end's samples and teacher, and the costs so far
        (simulator.protocol.StatefulStrategy)."""
        synthesis = {}
        if self.synthetic_x is not None:
            synthesis = {"x": self.synthetic_x, "y": self.synthetic_y, "teacher": dict(self.teacher)}
        return {"classes": list(self.seen_classes), "synthesis": synthesis, "costs": list(self.task_end_costs)}

    def restore_state(self, state: dict[str, Any], arrays: ArrayRecord) -> None:
        expect_keys(state, {"classes", "synthesis", "costs"}, "TARGET's state")
        classes = state["classes"]
        if (
            not isinstance(classes, list)
            or any(not _whole(c) or c < 0 for c in classes)
            or classes != sorted(set(classes))
        ):
            raise StrategyStateError(f"TARGET's classes {classes!r}: expected distinct sorted class labels >= 0")
        synthesis = state["synthesis"]
        if synthesis:
            expect_keys(synthesis, {"x", "y", "teacher"}, "TARGET's synthesis")
            x = synthesis["x"]
            if not (isinstance(x, np.ndarray) and x.dtype == np.float32 and x.ndim >= 2 and len(x) > 0):
                found = f"{x.dtype} {x.shape}" if isinstance(x, np.ndarray) else type(x).__name__
                raise StrategyStateError(
                    f"TARGET's synthetic samples: expected float32 (samples, *input shape), found {found}"
                )
            float_array(x, x.shape, "TARGET's synthetic samples")  # finite
            y = synthesis["y"]
            if (
                not (isinstance(y, np.ndarray) and y.dtype == np.int64 and y.shape == (len(x),))
                or not np.isin(y, classes).all()
            ):
                raise StrategyStateError(
                    f"TARGET's synthetic labels: expected int64 of shape ({len(x)},) among {classes}"
                )
            teacher = synthesis["teacher"]
            shapes = dict(zip(arrays.keys(), (a.shape for a in arrays.to_numpy_ndarrays())))
            if not isinstance(teacher, dict) or sorted(teacher) != sorted(shapes):
                raise StrategyStateError(f"TARGET's teacher: expected the global parameters {sorted(shapes)}")
            self.teacher = {
                name: float_array(teacher[name], tuple(shapes[name]), f"TARGET's teacher[{name!r}]") for name in shapes
            }
            self.synthetic_x, self.synthetic_y = x, y
        costs = state["costs"]
        if not isinstance(costs, list) or any(not isinstance(c, dict) for c in costs):
            raise StrategyStateError("TARGET's costs: expected a list of dicts")
        self.seen_classes = list(classes)
        self.task_end_costs = [dict(c) for c in costs]


def described(answers: list[dict[str, np.ndarray]]) -> tuple[tuple[int, ...], np.ndarray, np.ndarray, list[int]]:
    """The clients' answers to ``describe_data`` together: the input shape (one for all), the range per channel
    (the least low, the greatest high), and the labels held."""
    shapes = {tuple(int(d) for d in a[SHAPE]) for a in answers}
    if len(shapes) != 1:
        raise ValueError(f"clients describe inputs of different shapes: {sorted(shapes)}")
    low = np.min([a[LOW] for a in answers], axis=0)
    high = np.max([a[HIGH] for a in answers], axis=0)
    high = np.where(high > low, high, low + 1.0)  # a constant channel: any range holds it
    classes = sorted({int(c) for a in answers for c in a[CLASSES]})
    return shapes.pop(), low, high, classes


def redrawn(model: nn.Module) -> nn.Module:
    """``model`` with every layer's weights (and batch norm's statistics) drawn afresh by its own
    ``reset_parameters``, from torch's global generator: TARGET's student starts untrained."""
    for module in model.modules():
        if module is not model and callable(getattr(module, "reset_parameters", None)):
            module.reset_parameters()
    return model


def _whole(value: Any) -> bool:
    return isinstance(value, int) and not isinstance(value, bool)
