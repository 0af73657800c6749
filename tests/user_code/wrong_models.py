"""Users' models for model.name=tests.user_code.wrong_models.<function> that cannot be called as a model is."""

import math

from torch import nn


def two_arguments(input_shape, num_classes):
    """Forgets the model config: called as f(input_shape, num_classes, config), it raises a TypeError."""
    return nn.Sequential(nn.Flatten(), nn.Linear(math.prod(input_shape), num_classes))


def keyword_only(input_shape, *, num_classes, config):
    """Takes the right names, but not by position."""
    return nn.Sequential(nn.Flatten(), nn.Linear(math.prod(input_shape), num_classes))
