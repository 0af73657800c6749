"""Training-time data augmentation, applied per minibatch on the batch's device.

``data.augment`` names one: ``none`` (the default) or ``crop_flip``, the CIFAR
augmentation of He et al. 2016 that iCaRL, GEM, ER and the federated
continual-learning papers train with (a random 32x32 crop of the image padded
by 4 pixels on each side, then a horizontal flip with probability 1/2). A
user's is the dotted path of a function ``(x, generator) -> x`` taking a batch
``(N, C, H, W)`` and returning one of the same shape and type.

Its random draws come only from ``generator``, a CPU generator seeded from
(run seed, round, client id) apart from the one that orders batches, so
turning augmentation on changes no batch's samples, and the same client gives
the same numbers on any actor or backend. The draws are made on the CPU and
moved to the batch's device, so a GPU crops and flips the same images the same
way (its arithmetic, not the draws, makes GPU numbers differ from the CPU's). Only training batches are augmented, after a
method has added its own samples (replay's); evaluation and probes never are.

Padding fills with 0: with ``crop_flip`` the data are by default standardised
per channel (``data.normalize``, ``simulator/data/dataset.py``), so 0 is the
dataset's mean colour; torchvision pads before normalising, with black.
"""

from __future__ import annotations

from collections.abc import Callable

import torch
from torch.nn import functional as F

from simulator.registry import Registry

Augmentation = Callable[[torch.Tensor, torch.Generator], torch.Tensor]
PADDING = 4  # pixels on each side, as every CIFAR training script pads


def crop_flip(x: torch.Tensor, generator: torch.Generator) -> torch.Tensor:
    """Each image of ``x`` cropped at a random offset from its zero-padded copy, and flipped left-right
    with probability 1/2, in one gather for the whole batch."""
    n, channels, height, width = x.shape
    offsets = torch.randint(0, 2 * PADDING + 1, (2, n, 1), generator=generator)
    flipped = torch.rand(n, 1, generator=generator) < 0.5
    rows = offsets[0] + torch.arange(height)  # (n, height): the padded rows each crop takes
    columns = offsets[1] + torch.arange(width)
    columns = torch.where(flipped, columns.flip(1), columns)  # a flipped crop reads its columns backwards
    padded = F.pad(x, (PADDING, PADDING, PADDING, PADDING))
    samples = torch.arange(n, device=x.device)[:, None, None, None]
    channel = torch.arange(channels, device=x.device)[None, :, None, None]
    rows, columns = rows.to(x.device)[:, None, :, None], columns.to(x.device)[:, None, None, :]
    return padded[samples, channel, rows, columns]


AUGMENTATIONS: Registry[Augmentation] = Registry(
    "augmentation",
    "data.augment",
    {"crop_flip": crop_flip},
    "a function (x, generator) -> x over a batch of images",
)
