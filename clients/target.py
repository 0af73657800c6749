"""TARGET's client half: Zhang et al. 2023 (ICCV), "TARGET: Federated Class-Continual Learning via
Exemplar-Free Distillation" (the server half, which makes the samples: ``strategies/target.py``;
``strategy=target`` and ``client.method=target`` go together, the run refuses one without the other).

In the rounds after a task end, the strategy's payload (``context.payload``)
holds samples it synthesised by inverting the global model (``synthetic``),
the classes seen before the live task (``old_classes``) and that global
model's parameters by name (``teacher/<name>``). Each minibatch's loss is then

    CE(f(x), y) + kd_weight * KL(softmax(t(s)[old] / T) || softmax(f(s)[old] / T))

with ``(x, y)`` the client's real batch, ``s`` a batch of ``synthetic_batch_size``
samples drawn from the payload's (and augmented as real batches are, where
``data.augment`` asks), ``t`` the teacher, ``f`` the model in training, and
``[old]`` the old classes' logits. The KL is averaged over the batch and not
multiplied by ``T^2``: the authors' code (``_KD_loss``) takes the soft cross-
entropy, which is this KL plus the teacher's entropy (a constant), at T=2 with
weight 25 (their ``--kd``, with their client lr 0.01 and momentum 0.9 on a
ResNet with batch norm). At fashion_class_incremental's lr 0.05 without
momentum on the small CNN, 25 kills most of the CNN's ReLU units in task 1's
first round (the model then answers one class whatever the input; README);
``client.target.kd_weight=4`` does not.

With ``ce_new_classes_only`` (their code's choice: ``output[:, known:]``) the
real batch's cross-entropy leaves out the old classes' logits (but any the
batch holds), so that new data does not push the old classes down and only
the distillation shapes them. Neither term then ranks a new class above the
old ones (each is unchanged by adding a constant to its own group of logits):
a new class wins only as far as training grows its logits past the old ones,
which at digits scale (2 classes a task, 10 rounds) it barely does (README).
Without it, the cross-entropy over all classes pushes the old classes down on
new data and the run forgets as FedAvg does. Without a payload (the first
task), plain cross-entropy, as sgd.

The teacher is a copy of the model the worker keeps (one per worker, like
LwF's), into which each round's payload parameters are loaded by name.
Strategies see and send parameters only, not batch norm's buffers: the
teacher takes the model's buffers as training starts (the global ones of the
round, not those at the task end; the same where the model has no batch norm).
Without augmentation the teacher's logits on all the samples are computed
once a round (the teacher and the samples do not change within it). Nothing
is kept per client.
"""

from __future__ import annotations

import copy
from dataclasses import dataclass
from typing import ClassVar

import numpy as np
import torch
from torch import nn
from torch.nn import functional as F

from clients.base import Batch, ClientMethod, TrainContext, autocast, masked
from simulator.protocol import NUM_SAMPLES, Query

# The payload's names and the describe_data answer's keys, as strategies/target.py writes and reads them.
SYNTHETIC, OLD_CLASSES, TEACHER_PREFIX = "synthetic", "old_classes", "teacher/"
CLASSES, SHAPE, LOW, HIGH = "classes", "shape", "low", "high"


@dataclass(frozen=True)
class TargetSettings:
    kd_weight: float = 25.0  # the authors' --kd
    temperature: float = 2.0  # theirs
    synthetic_batch_size: int = 128  # synthetic samples distilled on per real minibatch
    ce_new_classes_only: bool = True  # their code: the real batch's CE over the classes not yet old

    def problems(self) -> list[tuple[str, str]]:
        checks = [
            ("kd_weight", self.kd_weight >= 0, "must be >= 0"),
            ("temperature", self.temperature > 0, "must be > 0"),
            ("synthetic_batch_size", self.synthetic_batch_size >= 1, "must be >= 1"),
        ]
        return [(key, reason) for key, ok, reason in checks if not ok]


def distillation(student: torch.Tensor, teacher: torch.Tensor, temperature: float) -> torch.Tensor:
    """``KL(softmax(teacher / T) || softmax(student / T))`` averaged over the batch (no ``T^2``)."""
    target = F.softmax(teacher / temperature, dim=1)
    return F.kl_div(F.log_softmax(student / temperature, dim=1), target, reduction="batchmean")


class TargetClient(ClientMethod):
    """Cross-entropy on the live task plus distillation from the strategy's teacher on its synthetic samples."""

    Settings = TargetSettings
    section = "target"
    server_half: ClassVar[str] = "target"  # the strategy (scenarios/strategy/target.yaml) that sends the payload
    teacher: nn.Module | None = None  # the worker's one teacher model, parameters loaded per round

    def begin(self, model: nn.Module, context: TrainContext) -> None:
        self.synthetic = None
        self.distilled, self.batches = 0.0, 0
        payload = context.payload
        if SYNTHETIC not in payload or len(payload[OLD_CLASSES]) == 0:
            return
        if self.teacher is None:
            self.teacher = copy.deepcopy(model).eval().requires_grad_(False)
        parameters = dict(self.teacher.named_parameters())
        missing = sorted(set(parameters) - {k[len(TEACHER_PREFIX) :] for k in payload if k.startswith(TEACHER_PREFIX)})
        if missing:
            raise ValueError(f"client.method=target: the payload lacks the teacher's parameters {missing}")
        buffers = dict(model.named_buffers())
        with torch.no_grad():
            for name, param in parameters.items():
                param.copy_(payload[TEACHER_PREFIX + name])
            for name, buffer in self.teacher.named_buffers():
                buffer.copy_(buffers[name])
        self.synthetic = payload[SYNTHETIC]
        self.old_classes = payload[OLD_CLASSES].long()
        self.teacher_logits = None  # without augmentation, the teacher's logits on the samples, once a round
        if context.augment is None:
            with torch.no_grad(), autocast(context.autocast, self.synthetic.device):
                self.teacher_logits = torch.cat(
                    [self.teacher(part)[:, self.old_classes] for part in self.synthetic.split(self.config.batch_size)]
                ).float()
        seed = int(torch.randint(2**62, (1,), generator=context.generator))
        self.draws = torch.Generator().manual_seed(seed)  # which synthetic samples each step distils on
        self.distillation_sum = torch.zeros((), device=self.synthetic.device)

    def loss(self, model: nn.Module, batch: Batch, context: TrainContext) -> torch.Tensor:
        if self.synthetic is None:
            return super().loss(model, batch, context)
        logits = masked(model(batch.x), batch.mask)
        if self.settings.ce_new_classes_only:
            old = torch.zeros(logits.shape[1], dtype=torch.bool, device=logits.device)
            old[self.old_classes] = True
            old[batch.y] = False  # a class the batch holds keeps its logit
            logits = logits.masked_fill(old, float("-inf"))
        cross_entropy = F.cross_entropy(logits, batch.y)
        size = min(self.settings.synthetic_batch_size, len(self.synthetic))
        chosen = torch.randint(len(self.synthetic), (size,), generator=self.draws).to(self.synthetic.device)
        samples = self.synthetic[chosen]
        if self.teacher_logits is not None:
            teacher = self.teacher_logits[chosen]
        else:  # augmented samples: the teacher sees each as the student does
            samples = context.augment(samples)
            with torch.no_grad():
                teacher = self.teacher(samples)[:, self.old_classes]
        student = model(samples)[:, self.old_classes]
        kd = distillation(student, teacher, self.settings.temperature)
        self.distillation_sum = self.distillation_sum + kd.detach()
        self.batches += 1
        return cross_entropy + self.settings.kd_weight * kd

    def end(self, model: nn.Module, context: TrainContext) -> dict[str, float]:
        if self.synthetic is None:
            return {"target_distillation": 0.0}
        return {"target_distillation": float(self.distillation_sum) / max(self.batches, 1)}


def describe_data(model: nn.Module, query: Query) -> dict[str, np.ndarray]:
    """The server half's query (``strategies/target.py``, by this dotted path): the labels the client holds,
    its inputs' shape, and their least and greatest value per channel (vectors: over all features), so that
    the generator makes inputs of the right shape and range. No sample and no per-sample value leaves."""
    x, y = query.x.detach(), query.y
    channels = x.shape[1] if x.dim() == 4 else 1
    if len(x):
        by_channel = x.transpose(0, 1).reshape(channels, -1) if x.dim() == 4 else x.reshape(1, -1)
        low, high = by_channel.amin(dim=1).double().cpu().numpy(), by_channel.amax(dim=1).double().cpu().numpy()
    else:
        low, high = np.full(channels, np.inf), np.full(channels, -np.inf)
    return {
        CLASSES: torch.unique(y).cpu().numpy().astype(np.int64),
        SHAPE: np.array(x.shape[1:], dtype=np.int64),
        LOW: low,
        HIGH: high,
        NUM_SAMPLES: np.array(len(y), dtype=np.int64),
    }
