"""Representation models: an encoder that produces features, a head that classifies them.

Keeping the two apart lets evaluation probe the representation (linear probe,
nearest class mean) as well as the head, and lets client methods treat them
differently (a personal head, a frozen encoder). ``model.name`` chooses the
encoder (``mlp``, ``cnn``, and the CIFAR ResNets ``resnet18``, ``resnet32`` of
``clients/resnets.py``) and ``model.head`` the head (``clients/heads/``).

A user's own model: ``model.name=pkg.module.function``, called as
``function(input_shape, num_classes, config)`` and returning an ``nn.Module``;
one that cannot take those three arguments is refused with the config.
Its weights are drawn under the run's seed (global torch RNG seeded from it),
so every copy of it is the same. Probes need a ``features(x)`` method; a
personal head (``fedper``, ``fedrep``) needs ``head`` with
``forward(x) == head(features(x))``, as :class:`RepresentationModel` has.
"""

from __future__ import annotations

import dataclasses
import inspect
import math
from collections.abc import Callable

import torch
from torch import nn

from clients.base import masked
from clients.heads import HEADS
from clients.resnets import NATURAL_WIDTH, resnet18, resnet32
from simulator.config import ConfigError, ModelConfig
from simulator.registry import Registry


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


SMALL_FEATURE_DIM = 64  # the MLP's and the CNN's features with model.feature_dim null


def feature_width(config: ModelConfig) -> int:
    """The width of the encoder's features: ``model.feature_dim``, or where null the encoder's own."""
    if config.feature_dim is not None:
        return config.feature_dim
    return NATURAL_WIDTH.get(config.name, SMALL_FEATURE_DIM)


def mlp(input_shape: tuple[int, ...], config: ModelConfig) -> nn.Module:
    """Two hidden layers on the flattened input."""
    return nn.Sequential(
        nn.Flatten(),
        nn.Linear(math.prod(input_shape), config.hidden),
        nn.ReLU(),
        nn.Linear(config.hidden, feature_width(config)),
        nn.ReLU(),
    )


def cnn(input_shape: tuple[int, ...], config: ModelConfig) -> nn.Module:
    """Two 3x3 conv blocks with 2x2 pooling, then a dense layer to the features.

    Needs inputs of at least 4x4 pixels; a ConfigError otherwise.
    """
    channels, height, width = input_shape
    if height < 4 or width < 4:
        raise ConfigError(
            f"model.name = 'cnn' pools twice by 2x2, so it needs images of at least 4x4 pixels; "
            f"the dataset gives shape {input_shape} (channels, height, width): use model.name=mlp"
        )
    return nn.Sequential(
        nn.Conv2d(channels, 16, 3, padding=1),
        nn.ReLU(),
        nn.MaxPool2d(2),
        nn.Conv2d(16, 32, 3, padding=1),
        nn.ReLU(),
        nn.MaxPool2d(2),
        nn.Flatten(),
        nn.Linear(32 * (height // 4) * (width // 4), feature_width(config)),
        nn.ReLU(),
    )


ENCODERS: dict[str, Callable[[tuple[int, ...], ModelConfig], nn.Module]] = {
    "mlp": mlp,
    "cnn": cnn,
    "resnet18": resnet18,
    "resnet32": resnet32,
}
IMAGE_ENCODERS = ("cnn", "resnet18", "resnet32")  # convolutional: they take (channels, height, width) inputs


class _ModelRegistry(Registry[Callable[..., nn.Module]]):
    """The models: a user's must take the arguments it is called with, checked with the config."""

    def resolve(self, name: str, where: str = "") -> Callable[..., nn.Module]:
        model = super().resolve(name, where)
        if name not in self.shipped:
            try:
                signature = inspect.signature(model, follow_wrapped=False)  # a decorator may supply arguments
            except (TypeError, ValueError):  # a builtin's may not be readable: it is called and tells
                return model
            try:
                signature.bind(None, None, None)
            except TypeError as error:
                source = f"{where}: " if where else ""
                raise ConfigError(
                    f"{source}model.name = {name!r}: takes {signature}, but a model is called as "
                    f"{getattr(model, '__name__', name)}(input_shape, num_classes, model_config) ({error})"
                ) from None
        return model


# A shipped name is an encoder under model.head; a user's dotted path is a whole model.
MODELS = _ModelRegistry(
    "model", "model.name", ENCODERS, "a function (input_shape, num_classes, model_config) -> nn.Module"
)


def build_model(
    input_shape: tuple[int, ...], num_classes: int, config: ModelConfig, generator: torch.Generator
) -> nn.Module:
    """Build ``config.name`` with weights drawn from ``generator`` (same seed, same weights)."""
    if config.name not in ENCODERS:
        return _users_model(input_shape, num_classes, config, generator)
    if config.name in IMAGE_ENCODERS and len(input_shape) != 3:
        raise ConfigError(
            f"model.name = {config.name!r} needs image inputs (channels, height, width); "
            f"the dataset gives shape {input_shape}: use model.name=mlp"
        )
    encoder = _initialized(ENCODERS[config.name](input_shape, config), generator)
    # The head draws after the encoder: every head starts from the same encoder.
    head = HEADS.resolve(config.head)
    settings = head.Settings() if config.head_settings is None else config.head_settings
    try:
        built = head(feature_width(config), num_classes, settings, generator)
    except Exception as error:  # a user's class that is no head: name the key, not a traceback
        raise ConfigError(
            f"model.head = {config.head!r}: Head(feature_dim, num_classes, settings, generator) failed: "
            f"{type(error).__name__}: {error}"
        ) from None
    return RepresentationModel(encoder, _initialized(built, generator))


def _initialized(module: nn.Module, generator: torch.Generator) -> nn.Module:
    """``module`` with each linear and conv layer's weights drawn as torch's default, from ``generator``."""
    with torch.no_grad():
        for layer in module.modules():
            if isinstance(layer, (nn.Linear, nn.Conv2d)):
                bound = 1.0 / math.sqrt(math.prod(layer.weight.shape[1:]))
                layer.weight.uniform_(-bound, bound, generator=generator)
                if layer.bias is not None:
                    layer.bias.uniform_(-bound, bound, generator=generator)
    return module


def _users_model(
    input_shape: tuple[int, ...], num_classes: int, config: ModelConfig, generator: torch.Generator
) -> nn.Module:
    factory = MODELS.resolve(config.name)
    if config.head != "linear":
        raise ConfigError(
            f"model.head = {config.head!r}: heads go on the shipped encoders ({', '.join(sorted(ENCODERS))}); "
            f"a user's model (model.name = {config.name!r}) builds its own"
        )
    with torch.random.fork_rng(devices=[]):
        torch.random.default_generator.manual_seed(generator.initial_seed())
        model = factory(input_shape, num_classes, dataclasses.replace(config, feature_dim=feature_width(config)))
    if not isinstance(model, nn.Module):
        raise ConfigError(f"model.name = {config.name!r}: returned {type(model).__name__}, expected an nn.Module")
    return model


@torch.no_grad()
def evaluate(
    model: torch.nn.Module,
    x: torch.Tensor,
    y: torch.Tensor,
    batch_size: int,
    class_mask: torch.Tensor | None = None,
) -> tuple[float, float]:
    """Mean cross-entropy loss and accuracy of ``model`` on ``(x, y)``, logits masked if asked."""
    model.eval()
    loss, correct = 0.0, 0
    for xb, yb in zip(x.split(batch_size), y.split(batch_size)):
        logits = masked(model(xb), class_mask)
        loss += float(torch.nn.functional.cross_entropy(logits, yb, reduction="sum"))
        correct += int((logits.argmax(1) == yb).sum())
    return loss / max(len(y), 1), correct / max(len(y), 1)
