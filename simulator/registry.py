"""How a plugin of any kind is found and configured: a short name from a registry, or a dotted path.

Every kind of plugin (client methods, heads, models, streams, datasets, client
query handlers, run hooks) is chosen the same way: a config key names it by a
short name its :class:`Registry` ships, or by the dotted path of a user's own
(``client.method=my_pkg.MyMethod``), imported without any library edit. A
plugin that has hyperparameters declares them as a frozen dataclass,
``Settings``, read from its own config section (``client.<section>``,
``stream.<section>``, ...), where ``section`` is the plugin's ``section``
attribute, else its ``__name__``; ``Settings.problems()``, where defined,
names impossible values as ``(key, reason)`` pairs.
"""

from __future__ import annotations

import difflib
import importlib
import logging
from collections.abc import Callable, Iterable, Mapping
from dataclasses import dataclass
from typing import Any, Generic, TypeVar

from simulator.config import ConfigError, build_section

log = logging.getLogger("fedstream")
Plugin = TypeVar("Plugin")


@dataclass(frozen=True)
class NoSettings:
    """The settings of a plugin that has none of its own."""


def import_object(target: str, key: str, hint: Callable[[Any], str] | None = None) -> Any:
    """The object the dotted path ``target`` names (the value of config key ``key``).

    The longest prefix that imports is the module, the rest are attributes, as
    Hydra resolves ``_target_``. Errors name the key, the missing module or
    attribute; ``hint(module)`` may add what the module offers instead.
    """
    parts = str(target).split(".")
    for end in range(len(parts) - 1, 0, -1):
        module_name = ".".join(parts[:end])
        try:
            owner = importlib.import_module(module_name)
        except ModuleNotFoundError as error:
            if error.name and (module_name + ".").startswith(error.name + "."):
                continue  # no module of this name: try a shorter prefix
            raise ConfigError(f"{key} = {target!r}: importing {module_name} failed: {error}") from None
        except Exception as error:
            raise ConfigError(
                f"{key} = {target!r}: importing {module_name} failed: {type(error).__name__}: {error}"
            ) from None
        for part in parts[end:]:
            if not hasattr(owner, part):
                offer = f"; {hint(owner)}" if hint else ""
                raise ConfigError(f"{key} = {target!r}: {owner.__name__} has no {part!r}{offer}")
            owner = getattr(owner, part)
        return owner
    raise ConfigError(f"{key} = {target!r}: expected pkg.module.Name; no module named {parts[0]!r}")


def section_name(plugin: Any) -> str:
    """The config section that holds a plugin's settings: its ``section``, else its ``__name__``."""
    return getattr(plugin, "section", None) or plugin.__name__


def plugin_settings(plugin: Any, given: Any, path: str, where: str) -> Any:
    """``plugin.Settings`` built from ``given`` (the section at ``path``), every key, type and value checked."""
    settings = build_section(getattr(plugin, "Settings", NoSettings), given, path, where)
    problems = getattr(settings, "problems", lambda: [])()
    if problems:
        key, reason = problems[0]
        raise ConfigError(f"{where}: {path}.{key} = {getattr(settings, key)!r}: {reason}")
    return settings


class Registry(Generic[Plugin]):
    """The shipped plugins of one kind by short name; :meth:`resolve` also takes a dotted path.

    ``kind`` names the kind in messages ("client method"), ``key`` the config key
    that chooses one (``client.method``), ``expected`` what a dotted path must
    name, which ``accepts`` checks.
    """

    def __init__(
        self,
        kind: str,
        key: str,
        shipped: Mapping[str, Plugin],
        expected: str,
        accepts: Callable[[Any], bool] = callable,
    ) -> None:
        self.kind, self.key, self.expected, self.accepts = kind, key, expected, accepts
        self.shipped = dict(shipped)

    def __contains__(self, name: str) -> bool:
        return name in self.shipped

    def __iter__(self) -> Iterable[str]:
        return iter(self.shipped)

    def resolve(self, name: str, where: str = "") -> Plugin:
        """The plugin ``name`` names: a shipped one, or a user's by dotted path. ``where``: the
        config's source (the scenario file), for messages."""
        if name in self.shipped:
            return self.shipped[name]
        source = f"{where}: " if where else ""
        if "." not in name:
            shipped = f"valid: {', '.join(sorted(self.shipped))} or " if self.shipped else "expected "
            raise ConfigError(
                f"{source}{self.key} = {name!r}: unknown {self.kind}; {shipped}the dotted path of {self.expected}"
            )
        try:
            plugin = import_object(name, self.key)
        except ConfigError as error:
            raise ConfigError(f"{source}{error}") from None
        if not self.accepts(plugin):
            raise ConfigError(f"{source}{self.key} = {name!r}: expected {self.expected}, found {plugin!r}")
        return plugin

    def settings(self, name: str, sections: dict[str, Any], path: str, where: str, strict: bool = False) -> Any:
        """The ``Settings`` of plugin ``name`` from the ``path.<section>`` sections given.

        Every shipped plugin's section is checked (a typo in one fails a sweep
        before any of its jobs runs). A section that belongs to no plugin is
        an error where its name is close to a known one (a typo); otherwise it
        is reported and ignored, since a sweep over several users' plugins
        gives each job the others' sections too. ``strict``: a section of any
        plugin but the chosen one is refused (a stream kind's keys mean nothing
        to another kind).
        """
        chosen = self.resolve(name, where)
        known = {section_name(p): p for p in (*self.shipped.values(), chosen)}
        mine = section_name(chosen)
        if strict:
            for other in sorted(sections.keys() - {mine}):
                raise ConfigError(
                    f"{where}: {path}.{other}: settings of another {self.kind} than "
                    f"{self.key} = {name!r}, whose settings are {path}.{mine}"
                )
        settings = {n: plugin_settings(p, sections.get(n, {}), f"{path}.{n}", where) for n, p in known.items()}
        for unknown in sorted(sections.keys() - known.keys()):
            if close := difflib.get_close_matches(unknown, known, n=1, cutoff=0.75):
                raise ConfigError(
                    f"{where}: {path}.{unknown}: no {self.kind} has this section; did you mean {path}.{close[0]}?"
                )
            log.warning(
                "%s: %s.%s belongs to no known %s (%s); ignored",
                where,
                path,
                unknown,
                self.kind,
                ", ".join(sorted(known)),
            )
        return settings[mine]
