"""A fixed simplex-ETF classifier behind a trainable projection.

FedETF: Li, Shang, He, Lin & Wu 2023, "No Fear of Classifier Biases: Neural
Collapse Inspired Federated Learning with Synthetic and Fixed Classifier"
(ICCV 2023; code: github.com/ZexiLee/ICCV-2023-FedETF). Under neural collapse
the class means and classifier vectors of a well-trained network form a
simplex equiangular tight frame; FedETF fixes the classifier to one from the
start, so no client can bias it, and every client learns features for the same
optimal class directions. As in its code (``Proto_Classifier``, ``linear_proto``):

    W      = sqrt(C / (C - 1)) * U (I - 1 1^T / C)     U: d x C, orthonormal columns
    z      = P h + b,  z_hat = z / |z|                 P: trainable projection to d dims
    logits = z_hat^T W / temperature

The columns of ``W`` are unit vectors with pairwise cosine ``-1 / (C - 1)``.
``U`` is the Q of a QR decomposition of a Gaussian ``d x C`` matrix drawn from
the model's generator, so every copy of the model built from the run's seed
(the server's and every worker's) holds the same ``W``; it is a non-persistent
buffer, never trained, never sent and never checkpointed. The projection is an
``nn.Linear`` and travels like the encoder.

Differences from the paper: its temperature is a learnable scalar ``beta``
multiplying the logits (initialised to 1, or 10 for its small CNN); here it is
fixed (``temperature = 0.1``, i.e. ``beta = 10``). The paper's balanced loss
and its personalisation stage (fine-tuning the ETF and projection locally)
belong to a client method, not to the head. ``dim`` defaults to the number of
classes, as the paper's ResNet and LeNet models use (``d >= C`` is needed).
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import ClassVar

import torch
from torch import nn
from torch.nn import functional as F

from simulator.config import MAX_WIDTH, ConfigError


@dataclass(frozen=True)
class ETFSettings:
    temperature: float = 0.1  # logits = cosine to the class's ETF vector / temperature
    dim: int | None = None  # projection width d (>= number of classes, <= MAX_WIDTH); null: the number of classes

    def problems(self) -> list[tuple[str, str]]:
        checks = [
            ("temperature", self.temperature > 0, "must be > 0"),
            (
                "dim",
                self.dim is None or 2 <= self.dim <= MAX_WIDTH,
                f"must be between 2 and {MAX_WIDTH} (and at least the number of classes); null: the number of classes",
            ),
        ]
        return [(key, reason) for key, ok, reason in checks if not ok]


def simplex_etf(dim: int, num_classes: int, generator: torch.Generator) -> torch.Tensor:
    """A ``dim x num_classes`` simplex ETF, randomly rotated by ``generator`` (float32, on CPU)."""
    gaussian = torch.randn(dim, num_classes, generator=generator, device=generator.device, dtype=torch.float64)
    rotation, _ = torch.linalg.qr(gaussian.cpu())  # reduced: dim x num_classes, orthonormal columns
    centering = torch.eye(num_classes, dtype=torch.float64) - 1.0 / num_classes
    return (math.sqrt(num_classes / (num_classes - 1)) * rotation @ centering).float()


class ETFHead(nn.Module):
    """Normalised projected features against a fixed simplex ETF, over ``temperature``."""

    Settings: ClassVar[type] = ETFSettings
    section: ClassVar[str] = "etf"
    etf: torch.Tensor

    def __init__(self, feature_dim: int, num_classes: int, settings: ETFSettings, generator: torch.Generator) -> None:
        super().__init__()
        dim = num_classes if settings.dim is None else settings.dim
        if num_classes < 2 or dim < num_classes:
            raise ConfigError(
                f"model.etf.dim = {settings.dim!r}: a simplex ETF of {num_classes} classes needs at least 2 classes "
                f"and dim >= {num_classes}"
            )
        self.temperature = settings.temperature
        self.projection = nn.Linear(feature_dim, dim)  # trained and sent; drawn by build_model
        self.register_buffer("etf", simplex_etf(dim, num_classes, generator), persistent=False)

    def forward(self, features: torch.Tensor) -> torch.Tensor:
        return F.normalize(self.projection(features), dim=1) @ self.etf / self.temperature
