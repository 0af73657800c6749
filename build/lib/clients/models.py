"""Representation models: an encoder that produces features, a head that classifies them.

Keeping the two apart lets evaluation probe the representation (linear probe,
nearest class mean) as well as the head, and lets client methods treat them
differently (a personal head, a frozen encoder).
"""

from __future__ import annotations

import math
from collections.abc import Callable

import torch
from torch import nn

from simulator.config import ConfigError, ModelConfig


class RepresentationModel(nn.Module):
    """``head(encoder(x))``; ``features`` exposes the encoder's output."""

    def __init__(self, encoder: nn.Module, head: nn.Module) -> None:
        super().__init__()
        self.encoder = encoder
        self.head = head

    def features(self, x: torch.Tensor) -> torch.Tensor:
        """The representation of ``x``."""
        return self.encoder(x)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.head(self.encoder(x))


def mlp(input_shape: tuple[int, ...], num_classes: int, cfg: ModelConfig) -> RepresentationModel:
    """Two hidden layers on the flattened input."""
    encoder = nn.Sequential(
        nn.Flatten(),
        nn.Linear(math.prod(input_shape), cfg.hidden),
        nn.ReLU(),
        nn.Linear(cfg.hidden, cfg.feature_dim),
        nn.ReLU(),
    )
    return RepresentationModel(encoder, nn.Linear(cfg.feature_dim, num_classes))


def cnn(input_shape: tuple[int, ...], num_classes: int, cfg: ModelConfig) -> RepresentationModel:
    """Two 3x3 conv blocks with 2x2 pooling, then a dense layer to the features."""
    if len(input_shape) != 3:
        raise ConfigError(
            f"model.name = 'cnn' needs image inputs (channels, height, width); "
            f"the dataset gives shape {input_shape}: use model.name=mlp"
        )
    channels, height, width = input_shape
    encoder = nn.Sequential(
        nn.Conv2d(channels, 16, 3, padding=1),
        nn.ReLU(),
        nn.MaxPool2d(2),
        nn.Conv2d(16, 32, 3, padding=1),
        nn.ReLU(),
        nn.MaxPool2d(2),
        nn.Flatten(),
        nn.Linear(32 * (height // 4) * (width // 4), cfg.feature_dim),
        nn.ReLU(),
    )
    return RepresentationModel(encoder, nn.Linear(cfg.feature_dim, num_classes))


MODELS: dict[str, Callable[[tuple[int, ...], int, ModelConfig], RepresentationModel]] = {
    "mlp": mlp,
    "cnn": cnn,
}


def build_model(
    input_shape: tuple[int, ...], num_classes: int, cfg: ModelConfig, generator: torch.Generator
) -> RepresentationModel:
    """Build ``cfg.name`` with weights drawn from ``generator`` (same seed, same weights)."""
    if cfg.name not in MODELS:
        raise ConfigError(f"model.name = {cfg.name!r}: unknown model; valid: {sorted(MODELS)}")
    model = MODELS[cfg.name](input_shape, num_classes, cfg)
    with torch.no_grad():
        for module in model.modules():
            if isinstance(module, (nn.Linear, nn.Conv2d)):
                fan_in = math.prod(module.weight.shape[1:])
                bound = 1.0 / math.sqrt(fan_in)
                module.weight.uniform_(-bound, bound, generator=generator)  # torch's default
                module.bias.uniform_(-bound, bound, generator=generator)
    return model
