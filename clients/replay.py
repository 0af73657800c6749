"""Experience replay: Chaudhry et al. 2019, "On Tiny Episodic Memories in Continual Learning".

Each client keeps a small episodic memory of its earlier tasks' samples,
filled by reservoir sampling when it moves to a new task, and every minibatch
is trained together with as many samples drawn from that memory. The memory
holds sample indices into the stream's arrays (and each sample's task, for
task-incremental masks), never copies of samples.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np
import torch
from torch import nn

from clients.base import Batch, ClientMethod, TrainContext
from simulator.protocol import ClientState


@dataclass(frozen=True)
class ReplaySettings:
    buffer_size: int = 200  # samples each client remembers
    batch_size: int | None = None  # replayed samples per minibatch; null: client.batch_size

    def problems(self) -> list[tuple[str, str]]:
        checks = [
            ("buffer_size", self.buffer_size >= 1),
            ("batch_size", self.batch_size is None or self.batch_size >= 1),
        ]
        return [(key, "must be at least 1") for key, ok in checks if not ok]


class ReplayClient(ClientMethod):
    """Each minibatch joined by samples replayed from the client's reservoir of earlier tasks."""

    Settings = ReplaySettings
    section = "replay"

    def begin_task(self, model: nn.Module, context: TrainContext) -> ClientState | None:
        if context.previous is None:
            return None
        state = context.state
        indices, tasks = list(state.get("indices", [])), list(state.get("tasks", []))
        seen = state.get("seen", 0)
        draws = torch.rand(len(context.previous.indices), generator=context.generator)
        for index, draw in zip(context.previous.indices.tolist(), draws.tolist()):
            if len(indices) < self.settings.buffer_size:  # reservoir sampling (Vitter's algorithm R)
                indices.append(index)
                tasks.append(context.previous.task)
            elif (slot := int(draw * (seen + 1))) < self.settings.buffer_size:
                indices[slot], tasks[slot] = index, context.previous.task
            seen += 1
        return {**state, "indices": np.array(indices, np.int64), "tasks": np.array(tasks, np.int64), "seen": seen}

    def prepare_batch(self, batch: Batch, context: TrainContext) -> Batch:
        memory = context.state.get("indices")
        if memory is None or len(memory) == 0:  # nothing remembered yet (the task it left gave it no samples)
            return batch
        count = self.config.batch_size if self.settings.batch_size is None else self.settings.batch_size
        picks = torch.randint(len(memory), (count,), generator=context.generator).numpy()
        replayed = context.samples(memory[picks], context.state["tasks"][picks])
        return Batch(torch.cat([batch.x, replayed.x]), torch.cat([batch.y, replayed.y]), _joined_masks(batch, replayed))

    def end(self, model: nn.Module, context: TrainContext) -> dict[str, float]:
        return {"replay_memory": float(len(context.state.get("indices", ())))}


def _joined_masks(first: Batch, second: Batch) -> torch.Tensor | None:
    """One mask row per sample of ``first`` then ``second`` (None where neither is masked)."""
    if first.mask is None and second.mask is None:
        return None
    labels = (first.mask if first.mask is not None else second.mask).shape[-1]
    rows = [
        torch.ones(len(b.y), labels, dtype=torch.bool, device=b.y.device)
        if b.mask is None
        else b.mask.expand(len(b.y), -1)
        for b in (first, second)
    ]
    return torch.cat(rows)
