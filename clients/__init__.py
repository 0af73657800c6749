"""Client side: the representation models and the local training methods.

A client method is a small class with the :class:`~clients.base.ClientMethod`
interface; ``client.method`` names one in ``METHODS`` or gives the dotted path
of a user's own subclass, and its settings come from ``client.<section>``.
A new method is one new file plus one line here. A method also answers the
server's queries (``clients/queries.py``) and may keep personal layers.
"""

from __future__ import annotations

import importlib
from typing import Any

from clients.base import Batch, ClientMethod, ClientState, LocalResult, PreviousTask, TrainContext
from clients.ewc import EWCClient
from clients.fedper import FedPerClient
from clients.fedprox import FedProxClient
from clients.fedrep import FedRepClient
from clients.lwf import LwFClient
from clients.replay import ReplayClient
from clients.sgd import SGDClient
from simulator.config import ConfigError, section_settings

METHODS: dict[str, type[ClientMethod]] = {
    "sgd": SGDClient,
    "fedprox": FedProxClient,
    "replay": ReplayClient,
    "ewc": EWCClient,
    "lwf": LwFClient,
    "fedper": FedPerClient,
    "fedrep": FedRepClient,
}


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


def method_settings(method_name: str, sections: dict[str, Any], where: str) -> Any:
    """The settings of ``method_name`` from the ``client.<section>`` sections given (see :func:`section_settings`)."""
    return section_settings(resolve_method(method_name), METHODS.values(), sections, "client", "client method", where)


__all__ = [
    "METHODS", "Batch", "ClientMethod", "ClientState", "LocalResult", "PreviousTask", "TrainContext",
    "method_settings", "resolve_method",
]
