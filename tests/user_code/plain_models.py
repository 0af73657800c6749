"""Users' models for model.name=plain_models.<function>: no head nor features, features only, both; one built
through a decorator."""

import functools
import math

from torch import nn


def sequential(input_shape, num_classes, cfg):
    """A plain nn.Sequential: no features(x), no head."""
    return nn.Sequential(
        nn.Flatten(), nn.Linear(math.prod(input_shape), cfg.hidden), nn.ReLU(), nn.Linear(cfg.hidden, num_classes)
    )


class WithFeatures(nn.Module):
    """features(x), but its classifier is not called ``head``: probes work, a personal head does not."""

    def __init__(self, input_shape, num_classes, cfg):
        super().__init__()
        self.body = nn.Sequential(nn.Flatten(), nn.Linear(math.prod(input_shape), cfg.feature_dim), nn.ReLU())
        self.classifier = nn.Linear(cfg.feature_dim, num_classes)

    def features(self, x):
        return self.body(x)

    def forward(self, x):
        return self.classifier(self.features(x))


class WithHead(nn.Module):
    """features(x) and ``head``, forward(x) == head(features(x)): what fedper and fedrep need."""

    def __init__(self, input_shape, num_classes, cfg):
        super().__init__()
        self.body = nn.Sequential(nn.Flatten(), nn.Linear(math.prod(input_shape), cfg.feature_dim), nn.ReLU())
        self.head = nn.Linear(cfg.feature_dim, num_classes)

    def features(self, x):
        return self.body(x)

    def forward(self, x):
        return self.head(self.features(x))


def with_features(input_shape, num_classes, cfg):
    return WithFeatures(input_shape, num_classes, cfg)


def with_head(input_shape, num_classes, cfg):
    return WithHead(input_shape, num_classes, cfg)


def with_width(width):
    """A decorator that supplies the model's width: the decorated function takes one argument more."""

    def decorate(build):
        @functools.wraps(build)
        def model(input_shape, num_classes, cfg):
            return build(input_shape, num_classes, cfg, width)

        return model

    return decorate


@with_width(32)
def decorated(input_shape, num_classes, cfg, width):
    """Called as any model is, through its decorator (its own signature says four arguments)."""
    return nn.Sequential(
        nn.Flatten(), nn.Linear(math.prod(input_shape), width), nn.ReLU(), nn.Linear(width, num_classes)
    )
