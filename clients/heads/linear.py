"""The plain linear head: ``logits = W h + b``, as every model had before heads were chosen."""

from __future__ import annotations

from dataclasses import dataclass
from typing import ClassVar

import torch
from torch import nn


@dataclass(frozen=True)
class LinearSettings:
    """The linear head has no settings of its own."""


class LinearHead(nn.Linear):
    """Exactly ``nn.Linear(feature_dim, num_classes)`` with bias: parameters ``weight`` and ``bias``.

    Being an ``nn.Linear`` itself (not wrapping one), it keeps the parameter
    names, order and initial draws of earlier runs, so their numbers do not change.
    """

    Settings: ClassVar[type] = LinearSettings
    section: ClassVar[str] = "linear"

    def __init__(
        self, feature_dim: int, num_classes: int, settings: LinearSettings, generator: torch.Generator
    ) -> None:
        super().__init__(feature_dim, num_classes)  # weights drawn by build_model from its generator
