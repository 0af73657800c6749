"""Classifier heads: the layer that turns the encoder's features into class logits.

Every head takes features ``(batch, feature_dim)`` and returns logits
``(batch, num_classes)``, and is built as
``Head(feature_dim, num_classes, settings, generator)``. Its settings are a
frozen dataclass, ``Head.Settings``, read from the config section
``Head.section``. Trainable weights are ``nn.Linear`` submodules, so
``clients.models.build_model`` draws them from the seeded generator like the
encoder's; anything else a head holds is a non-persistent buffer, which never
travels and never goes into a checkpoint.

A new head is one new file plus one line in ``HEADS``.
"""

from __future__ import annotations

from typing import Any

from torch import nn

from clients.heads.etf import ETFHead, ETFSettings
from clients.heads.linear import LinearHead, LinearSettings
from clients.heads.normalized import NormalizedHead, NormalizedSettings
from simulator.config import ConfigError, section_settings

HEADS: dict[str, type[nn.Module]] = {
    "linear": LinearHead,
    "normalized": NormalizedHead,
    "etf": ETFHead,
}


def resolve_head(name: str) -> type[nn.Module]:
    """The head class registered as ``name``."""
    if name not in HEADS:
        raise ConfigError(f"model.head = {name!r}: unknown head; valid: {', '.join(sorted(HEADS))}")
    return HEADS[name]


def head_settings(name: str, sections: dict[str, Any], where: str) -> Any:
    """The settings of head ``name`` from the ``model.<section>`` sections given (see ``section_settings``)."""
    return section_settings(resolve_head(name), HEADS.values(), sections, "model", "head", where)


__all__ = [
    "HEADS", "ETFHead", "ETFSettings", "LinearHead", "LinearSettings", "NormalizedHead", "NormalizedSettings",
    "head_settings", "resolve_head",
]
