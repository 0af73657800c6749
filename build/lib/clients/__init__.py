"""Client side: the representation models and the local training methods.

A client method is a small class with the :class:`~clients.base.ClientMethod`
interface; ``client.method`` names one in ``METHODS`` or gives the dotted path
of a user's own subclass. A new method is one new file plus one line here.
"""

from __future__ import annotations

import importlib

from clients.base import ClientMethod, LocalResult, TrainContext
from clients.fedprox import FedProxClient
from clients.sgd import SGDClient
from simulator.config import ConfigError

METHODS: dict[str, type[ClientMethod]] = {"sgd": SGDClient, "fedprox": FedProxClient}


def resolve_method(name: str) -> type[ClientMethod]:
    """The client method ``name`` (a short name or ``pkg.module.Class``)."""
    if name in METHODS:
        return METHODS[name]
    module_name, _, class_name = name.rpartition(".")
    if not module_name:
        raise ConfigError(
            f"client.method = {name!r}: unknown method; valid: {', '.join(sorted(METHODS))} "
            "or the dotted path of a ClientMethod subclass"
        )
    try:
        method = getattr(importlib.import_module(module_name), class_name)
    except (ImportError, AttributeError) as error:
        raise ConfigError(f"client.method = {name!r}: cannot import it ({error})") from None
    if not (isinstance(method, type) and issubclass(method, ClientMethod)):
        raise ConfigError(f"client.method = {name!r}: expected a subclass of clients.ClientMethod")
    return method


__all__ = ["METHODS", "ClientMethod", "LocalResult", "TrainContext", "resolve_method"]
