"""Classifier heads: the layer that turns the encoder's features into class logits.

Every head takes features ``(batch, feature_dim)`` and returns logits
``(batch, num_classes)``, and is built as
``Head(feature_dim, num_classes, settings, generator)``. Its settings are a
frozen dataclass, ``Head.Settings``, read from the config section
``Head.section``. Trainable weights are ``nn.Linear`` submodules, so
``clients.models.build_model`` draws them from the seeded generator like the
encoder's, or parameters with a fixed starting value (the ETF head's learnable
scale); both travel and are checkpointed. Anything else a head holds is a
non-persistent buffer, which never travels and never goes into a checkpoint.

A new head is one new file plus one line in ``HEADS``; a user's head is the dotted
path of its class (``model.head=my_pkg.MyHead``), its settings under ``model.<section>``.
"""

from __future__ import annotations

import inspect

from torch import nn

from clients.heads.etf import ETFHead, ETFSettings
from clients.heads.linear import LinearHead, LinearSettings
from clients.heads.normalized import NormalizedHead, NormalizedSettings
from simulator.registry import Registry

HEADS: Registry[type[nn.Module]] = Registry(
    "head",
    "model.head",
    {"linear": LinearHead, "normalized": NormalizedHead, "etf": ETFHead},
    "an nn.Module subclass built as Head(feature_dim, num_classes, settings, generator)",
    lambda plugin: isinstance(plugin, type) and issubclass(plugin, nn.Module) and _takes_head_arguments(plugin),
)


def _takes_head_arguments(head: type) -> bool:
    """Whether ``head(feature_dim, num_classes, settings, generator)`` binds: refused at the config check, not
    inside the model's construction."""
    try:
        inspect.signature(head).bind(0, 0, None, None)
    except (TypeError, ValueError):
        return False
    return True


__all__ = ["HEADS", "ETFHead", "ETFSettings", "LinearHead", "LinearSettings", "NormalizedHead", "NormalizedSettings"]
