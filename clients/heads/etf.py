"""A fixed simplex-ETF classifier behind a trainable projection.

FedETF: Li, Shang, He, Lin & Wu 2023, "No Fear of Classifier Biases: Neural
Collapse Inspired Federated Learning with Synthetic and Fixed Classifier"
(ICCV 2023; code: github.com/ZexiLee/ICCV-2023-FedETF). Under neural collapse
the class means and classifier vectors of a well-trained network form a
simplex equiangular tight frame; FedETF fixes the classifier to one from the
start, so no client can bias it, and every client learns features for the same
optimal class directions. As in its code (``Proto_Classifier``, ``linear_proto``,
``scaling_train``):

    W      = sqrt(C / (C - 1)) * U (I - 1 1^T / C)     U: d x C, orthonormal columns
    z      = P h + b,  z_hat = z / |z|                 P: trainable projection to d dims
    logits = beta * z_hat^T W                          beta: learnable scalar, starts at 1 / temperature

The columns of ``W`` are unit vectors with pairwise cosine ``-1 / (C - 1)``.
``U`` is the Q of a QR decomposition of a Gaussian ``d x C`` matrix drawn from
the model's generator, so every copy of the model built from the run's seed
(the server's and every worker's) holds the same ``W``; it is a non-persistent
buffer, never trained, never sent and never checkpointed. The projection is an
``nn.Linear`` and travels like the encoder.

The scale ``beta`` is the head's parameter ``scale`` (a 0-d tensor, state_dict key
``head.scale``): clients train it with the rest of the model (the same SGD,
momentum and weight decay), the strategy aggregates it like any weight (FedAvg: the
mean of the clients' betas), and it goes into checkpoints; a personal-head method
(``fedper``, ``fedrep``) keeps it with the client's head. ``model.etf.temperature``
is its starting value's reciprocal, ``beta_0 = 1 / temperature``. The paper's code
starts it at 1 where the projection has ``d = C`` dimensions (its LeNet-5 and
ResNets) and at 10 for its CIFAR-10 CNN's 64-dimensional projection; our default
``dim`` is ``C`` too, so the default is ``temperature = 1.0`` (``beta_0 = 1``; the
fixed head's default was 0.1). On ``digits_extreme_label_skew`` (3 seeds, README)
``beta_0 = 10`` collapses as the fixed 0.1 did, and ``beta_0 = 1`` grows to about
6.3 by round 50. ``model.etf.learn_temperature=false`` fixes the scale instead:
``logits = z_hat^T W / temperature``, no parameter; with the same temperature the
numbers are those of the head before the scale was learnable.

``beta`` is an unconstrained scalar, as in the paper, not parametrised to stay
positive (a log or softplus would also change how FedAvg averages it): the loss
itself pushes it away from zero. Its gradient is ``sum_c p_c cos_c - cos_y``; at
``beta = 0`` the softmax is uniform and ``W``'s columns sum to zero, so the
gradient is ``-cos_y``, and near zero ``beta`` grows as long as the features lean
towards their own class's vertex, which the same loss trains them to do. On
``digits_extreme_label_skew`` and ``digits_class_incremental`` (seed 0, from 1) the
global beta was 2.2 and 1.4 after round 1 and never fell below that, dipping by at
most 0.03 at a new task.

Differences from the paper: the paper's balanced loss and its personalisation
stage (fine-tuning the ETF and projection locally) belong to a client method, not
to the head. ``dim`` defaults to the number of classes, as the paper's ResNet and
LeNet models use (``d >= C`` is needed).
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
    temperature: float = 1.0  # learnable: the scale starts at 1 / temperature; fixed: logits = cosine / temperature
    learn_temperature: bool = True  # the paper's learnable scale beta (trained, sent); false: fixed at temperature
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
    """Normalised projected features against a fixed simplex ETF, times a learnable scale (or over a fixed
    ``temperature``)."""

    Settings: ClassVar[type] = ETFSettings
    section: ClassVar[str] = "etf"
    etf: torch.Tensor
    scale: nn.Parameter | None

    def __init__(self, feature_dim: int, num_classes: int, settings: ETFSettings, generator: torch.Generator) -> None:
        super().__init__()
        dim = num_classes if settings.dim is None else settings.dim
        if num_classes < 2 or dim < num_classes:
            raise ConfigError(
                f"model.etf.dim = {settings.dim!r}: a simplex ETF of {num_classes} classes needs at least 2 classes "
                f"and dim >= {num_classes}"
            )
        self.temperature = settings.temperature  # fixed: the logits' divisor; learnable: 1 / the scale's start
        self.projection = nn.Linear(feature_dim, dim)  # trained and sent; drawn by build_model
        if settings.learn_temperature:  # the paper's beta: a 0-d parameter, trained, sent and checkpointed
            self.scale = nn.Parameter(torch.tensor(1.0 / settings.temperature))
        else:
            self.register_parameter("scale", None)
        self.register_buffer("etf", simplex_etf(dim, num_classes, generator), persistent=False)

    def forward(self, features: torch.Tensor) -> torch.Tensor:
        cosines = F.normalize(self.projection(features), dim=1) @ self.etf
        return cosines / self.temperature if self.scale is None else cosines * self.scale
