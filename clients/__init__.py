"""Client side: the representation models and the local training methods.

A client method is a small class with the :class:`~clients.base.ClientMethod`
interface; ``client.method`` names one in ``METHODS`` or gives the dotted path
of a user's own subclass, and its settings come from ``client.<section>``.
A new method is one new file plus one line here.
"""

from __future__ import annotations

import difflib
import importlib
import logging
from typing import Any

from clients.base import Batch, ClientMethod, ClientState, LocalResult, PreviousTask, TrainContext
from clients.ewc import EWCClient
from clients.fedprox import FedProxClient
from clients.lwf import LwFClient
from clients.replay import ReplayClient
from clients.sgd import SGDClient
from simulator.config import ConfigError, build_section

METHODS: dict[str, type[ClientMethod]] = {
    "sgd": SGDClient,
    "fedprox": FedProxClient,
    "replay": ReplayClient,
    "ewc": EWCClient,
    "lwf": LwFClient,
}
log = logging.getLogger("fedstream")


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
    """The settings of ``method_name`` from the ``client.<section>`` sections given.

    Every shipped method's section is checked (a typo in one fails a sweep
    before any of its jobs runs); a section that belongs to no known method
    is an error when its name is close to a known one (a typo), and otherwise
    reported and ignored, since a sweep over several users' methods gives each
    job the others' sections too.
    """
    chosen = resolve_method(method_name)
    known = {m.section_name(): m for m in (*METHODS.values(), chosen)}
    settings = {name: _settings(m, sections.get(name, {}), where) for name, m in known.items()}
    for name in sorted(sections.keys() - known.keys()):
        if close := difflib.get_close_matches(name, known, n=1, cutoff=0.75):
            raise ConfigError(f"{where}: client.{name}: no client method has this section; "
                              f"did you mean client.{close[0]}?")
        log.warning("%s: client.%s belongs to no known client method (%s); ignored",
                    where, name, ", ".join(sorted(known)))
    return settings[chosen.section_name()]


def _settings(method: type[ClientMethod], given: Any, where: str) -> Any:
    path = f"client.{method.section_name()}"
    settings = build_section(method.Settings, given, path, where)
    problems = getattr(settings, "problems", lambda: [])()
    if problems:
        key, reason = problems[0]
        raise ConfigError(f"{where}: {path}.{key} = {getattr(settings, key)!r}: {reason}")
    return settings


__all__ = [
    "METHODS", "Batch", "ClientMethod", "ClientState", "LocalResult", "PreviousTask", "TrainContext",
    "method_settings", "resolve_method",
]
