"""Learning without Forgetting: Li & Hoiem 2017, "Learning without Forgetting" (TPAMI).

When a client moves to a new task, the model it then holds becomes its
teacher, and the labels of its earlier tasks become its old classes. On the
new task, each minibatch's loss adds ``alpha * T^2 * KL(teacher || model)``
over the old classes' logits softened by temperature ``T``: the model keeps
answering on old classes as the teacher did, from new data alone. In
task-incremental streams (masked logits) each old task is a head of its own
and is distilled on its own softmax, as in the paper; otherwise the old
classes share one. The teacher's weights (and batch norm's statistics, where
the model has them) and each class's old head (-1: not old) are the client's
state.

The teacher is the global model at the client's first round on the new task
(the weights it then holds), not at the last round of the old one: a client
that skipped rounds comes back to a model that has already moved on.
"""

from __future__ import annotations

import copy
from dataclasses import dataclass

import numpy as np
import torch
from torch import nn
from torch.nn import functional as F

from clients.base import Batch, ClientMethod, TrainContext, flat_parameters, flat_statistics, load_statistics, masked
from simulator.protocol import ClientState


@dataclass(frozen=True)
class LwFSettings:
    alpha: float = 1.0  # weight of the distillation term
    temperature: float = 2.0  # softens both distributions (Hinton et al. 2015)

    def problems(self) -> list[tuple[str, str]]:
        checks = [("alpha", self.alpha >= 0, "must be >= 0"), ("temperature", self.temperature > 0, "must be > 0")]
        return [(key, reason) for key, ok, reason in checks if not ok]


class LwFClient(ClientMethod):
    """Cross-entropy on the live task plus distillation from the client's teacher on old classes."""

    Settings = LwFSettings
    section = "lwf"
    teacher: nn.Module | None = None  # the worker's one teacher model, weights loaded per client
    old_classes: list[torch.Tensor] | None = None  # per old head, its classes: scratch for this client

    def begin_task(self, model: nn.Module, context: TrainContext) -> ClientState | None:
        if context.previous is None:
            return None
        labels = context.samples(context.previous.indices, context.previous.task).y.cpu().numpy()
        heads = np.array(context.state.get("old_heads", np.zeros(0, np.int64)))
        heads = np.pad(heads, (0, max(int(labels.max(initial=-1)) + 1 - len(heads), 0)), constant_values=-1)
        heads[labels] = context.previous.task if context.class_mask is not None else 0
        state = {**context.state, "teacher": flat_parameters(model), "old_heads": heads}
        if any(b.is_floating_point() for b in model.buffers()):  # batch norm: the teacher's statistics too
            state["teacher_statistics"] = flat_statistics(model)
        return state

    def begin(self, model: nn.Module, context: TrainContext) -> None:
        self.old_classes = None
        if "teacher" not in context.state or not (context.state["old_heads"] >= 0).any():
            return
        if self.teacher is None:
            self.teacher = copy.deepcopy(model).eval()
        device = next(model.parameters()).device
        weights = torch.tensor(np.asarray(context.state["teacher"]), device=device)
        torch.nn.utils.vector_to_parameters(weights, self.teacher.parameters())
        if "teacher_statistics" in context.state:
            load_statistics(context.state["teacher_statistics"], self.teacher)
        heads = context.state["old_heads"]
        self.old_classes = [
            torch.from_numpy(np.flatnonzero(heads == head)).to(device) for head in np.unique(heads[heads >= 0])
        ]
        self.distillation, self.batches = torch.zeros((), device=device), 0

    def loss(self, model: nn.Module, batch: Batch, context: TrainContext) -> torch.Tensor:
        if self.old_classes is None:
            return super().loss(model, batch, context)
        logits = model(batch.x)
        new_task = F.cross_entropy(masked(logits, batch.mask), batch.y)
        with torch.no_grad():
            teacher_logits = self.teacher(batch.x)
        distillation = sum(self._distillation(logits[:, head], teacher_logits[:, head]) for head in self.old_classes)
        self.distillation = self.distillation + distillation.detach()
        self.batches += 1
        return new_task + self.settings.alpha * distillation

    def _distillation(self, student: torch.Tensor, teacher: torch.Tensor) -> torch.Tensor:
        """``T^2 * KL(softmax(teacher / T) || softmax(student / T))``, averaged over the batch."""
        temperature = self.settings.temperature
        target = F.softmax(teacher / temperature, dim=1)
        return F.kl_div(F.log_softmax(student / temperature, dim=1), target, reduction="batchmean") * temperature**2

    def end(self, model: nn.Module, context: TrainContext) -> dict[str, float]:
        if self.old_classes is None:
            return {"lwf_distillation": 0.0, "lwf_single_class_heads": 0.0}
        # A head over one class distils nothing (a softmax over one logit is 1 for teacher and student
        # alike): reported, not silent. The paper's heads cover a task's classes; a client whose share
        # of an old task held one class has such a head.
        single = sum(1 for classes in self.old_classes if len(classes) == 1)
        return {
            "lwf_distillation": float(self.distillation) / max(self.batches, 1),
            "lwf_single_class_heads": float(single),
        }
