"""A cosine classifier on L2-normalised features.

Feature normalisation as in FedFN: Kim, Lee, Oh & Yun 2023, "FedFN: Feature
Normalization for Alleviating Data Heterogeneity Problem in Federated Learning"
(FL@FM-NeurIPS'23 workshop, arXiv:2311.13267). Under label skew, local
models give larger feature norms to the classes a client sees than to those it
does not, and that gap grows with heterogeneity; normalising the features
removes it. The class weights are normalised too, making the logit a scaled
cosine (NormFace, Wang et al. 2017; in FL with a scale ``s = 1 / temperature``
e.g. FedNH, Dai et al. AAAI 2023), so a class's logit cannot grow through the
norm of its weight vector either:

    logits_c = cos(h, w_c) / temperature = <h / |h|, w_c / |w_c|> / temperature

No bias. The temperature is fixed: logits lie in ``[-1/T, 1/T]``, and a small
``T`` lets the softmax come close to one-hot (with T = 0.1 and 10 classes the
largest attainable probability exceeds 0.9999).
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import ClassVar

import torch
from torch import nn
from torch.nn import functional as F


@dataclass(frozen=True)
class NormalizedSettings:
    temperature: float = 0.1  # logits = cosine / temperature (scale 10)

    def problems(self) -> list[tuple[str, str]]:
        return [] if self.temperature > 0 else [("temperature", "must be > 0")]


class NormalizedHead(nn.Module):
    """Cosines between the normalised features and each class's normalised weight vector, over ``temperature``."""

    Settings: ClassVar[type] = NormalizedSettings
    section: ClassVar[str] = "normalized"

    def __init__(
        self, feature_dim: int, num_classes: int, settings: NormalizedSettings, generator: torch.Generator
    ) -> None:
        super().__init__()
        self.temperature = settings.temperature
        self.classes = nn.Linear(feature_dim, num_classes, bias=False)  # one weight row per class; drawn by build_model

    def forward(self, features: torch.Tensor) -> torch.Tensor:
        cosines = F.normalize(features, dim=1) @ F.normalize(self.classes.weight, dim=1).T
        return cosines / self.temperature
