"""A user's augmentations, named by dotted path (data.augment=augmentations.NAME)."""

from __future__ import annotations

import torch

from clients.augment import crop_flip

CALLS: list[int] = []  # the batch size of every call of ``recorded_crop_flip`` in this process


def recorded_crop_flip(x: torch.Tensor, generator: torch.Generator) -> torch.Tensor:
    """``crop_flip``, recording each batch; refuses to run where no gradient is taken (evaluation, probes)."""
    if not torch.is_grad_enabled():
        raise AssertionError("an augmentation ran where no gradient is taken: evaluation or a probe")
    CALLS.append(len(x))
    return crop_flip(x, generator)


def cropped(x: torch.Tensor, generator: torch.Generator) -> torch.Tensor:
    """Returns smaller images than it was given: refused before any client trains."""
    return x[:, :, 1:, 1:]
