"""Learning without Forgetting: Li & Hoiem 2017, "Learning without Forgetting" (TPAMI).

When a client moves to a new task, the model it then holds (the global weights
at its task boundary) becomes its teacher, and the labels of its earlier tasks
become its old classes. On the new task, each minibatch's loss adds
``alpha * T^2 * KL(teacher || model)`` over the old classes' logits softened
by temperature ``T``: the model keeps answering on old classes as the teacher
did, from new data alone. The teacher's weights and the old-class mask are the
client's state.
"""

from __future__ import annotations

import copy
from dataclasses import dataclass

import numpy as np
import torch
from torch import nn
from torch.nn import functional as F

from clients.base import Batch, ClientMethod, TrainContext, flat_parameters, masked


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

    def begin_task(self, model: nn.Module, context: TrainContext) -> None:
        if context.previous is None:
            return
        labels = context.samples(context.previous.indices, context.previous.task).y.cpu().numpy()
        old = np.array(context.state.get("old_classes", np.zeros(0, bool)))
        old = np.pad(old, (0, max(int(labels.max()) + 1 - len(old), 0)))
        old[labels] = True
        context.state.update(teacher=flat_parameters(model), old_classes=old)

    def begin(self, model: nn.Module, context: TrainContext) -> None:
        self.old_classes = None
        if "teacher" not in context.state:
            return
        if self.teacher is None:
            self.teacher = copy.deepcopy(model).eval()
        device = next(model.parameters()).device
        weights = torch.tensor(np.asarray(context.state["teacher"]), device=device)
        torch.nn.utils.vector_to_parameters(weights, self.teacher.parameters())
        self.old_classes = torch.from_numpy(np.flatnonzero(context.state["old_classes"])).to(device)
        self.distillation, self.batches = torch.zeros((), device=device), 0

    def loss(self, model: nn.Module, batch: Batch, context: TrainContext) -> torch.Tensor:
        if self.old_classes is None:
            return super().loss(model, batch, context)
        logits = model(batch.x)
        new_task = F.cross_entropy(masked(logits, batch.mask), batch.y)
        with torch.no_grad():
            target = F.softmax(self.teacher(batch.x)[:, self.old_classes] / self.settings.temperature, dim=1)
        log_student = F.log_softmax(logits[:, self.old_classes] / self.settings.temperature, dim=1)
        distillation = F.kl_div(log_student, target, reduction="batchmean") * self.settings.temperature**2
        self.distillation = self.distillation + distillation.detach()
        self.batches += 1
        return new_task + self.settings.alpha * distillation

    def end(self, model: nn.Module, context: TrainContext) -> dict[str, float]:
        if self.old_classes is None:
            return {"lwf_distillation": 0.0}
        return {"lwf_distillation": float(self.distillation) / max(self.batches, 1)}
