"""Instantiate the configured strategy and reject settings that could never run."""

from __future__ import annotations

import inspect
import re
from typing import Any

from flwr.serverapp.strategy import Strategy
from hydra.errors import InstantiationException
from hydra.utils import instantiate
from omegaconf import DictConfig

from simulator.config import ConfigError
from simulator.registry import import_object

# Keys Hydra's instantiate reads itself; every other key of a node is a constructor argument.
_HYDRA_KEYS = ("_target_", "_recursive_", "_convert_", "_partial_", "_args_")
# FedAvg-family attributes that make Flower's sample_nodes wait (forever, in a
# simulation) when they exceed the number of clients.
_NODE_MINIMUMS = ("min_available_nodes", "min_train_nodes", "min_evaluate_nodes")


def check_sampling(strategy: Strategy, present: int, why: str, federated_evaluation: bool) -> None:
    """Reject sampling Flower would wait on forever, or that samples no client.

    ``present`` is the fewest clients present in any round and ``why`` says
    where it comes from, for the message. Flower samples ``max(int(n *
    fraction), minimum)`` of the ``n`` clients and waits until that many
    exist: a fraction above 1 or a minimum above ``present`` never comes true.
    The evaluation fraction matters only where the engine runs the strategy's
    evaluation (``eval.federated``); 0 there means none.
    """
    fractions = [("fraction_train", "min_train_nodes", False)]
    if federated_evaluation:
        fractions.append(("fraction_evaluate", "min_evaluate_nodes", True))
    for path, layer in strategy_layers(strategy):
        for attribute in _NODE_MINIMUMS:
            value = getattr(layer, attribute, 0)
            if value > present:
                raise ConfigError(
                    f"{path}.{attribute} = {value}: only {present} clients are present ({why}); "
                    "the strategy would wait forever for clients"
                )
        for attribute, minimum, zero_allowed in fractions:
            if not hasattr(layer, attribute):
                continue
            fraction, least = getattr(layer, attribute), getattr(layer, minimum, 0)
            if not (0 <= fraction <= 1 if zero_allowed else 0 < fraction <= 1):
                interval = "[0, 1]" if zero_allowed else "(0, 1]"
                consequence = "; Flower would wait forever for more clients than exist" if fraction > 1 else ""
                raise ConfigError(f"{path}.{attribute} = {fraction}: must be in {interval}{consequence}")
            if not zero_allowed and max(int(present * fraction), least) < 1:
                raise ConfigError(
                    f"{path}.{attribute} = {fraction} with {path}.{minimum} = {least} samples no client of "
                    f"the {present} present ({why}); raise either"
                )


def build_strategy(node: DictConfig) -> Strategy:
    """Instantiate ``node`` (a Hydra node with ``_target_``); the engine checks it against the stream.

    Each ``_target_`` in it (a DP wrapper's ``strategy`` too) must name a class
    that exists, and each key must be an argument of that class's constructor,
    so a typo is named before Hydra's instantiate reports it as a TypeError.
    """
    _check_arguments(node, "strategy")
    target = node.get("_target_")
    try:
        strategy = instantiate(node, _convert_="all")
    except InstantiationException as error:
        cause = _first_line(error)
        unexpected = re.search(r"unexpected keyword argument '(\w+)'", cause)
        raise ConfigError(
            unexpected
            and _refused_key(node, "strategy", unexpected.group(1))
            or f"strategy._target_ = {target!r}: {cause}"
        ) from None
    if not isinstance(strategy, Strategy):
        raise ConfigError(
            f"strategy._target_ = {target!r}: built a {type(strategy).__name__}, "
            "expected a subclass of flwr.serverapp.strategy.Strategy"
        )
    return strategy


def strategy_class(target: Any, path: str = "strategy") -> Any:
    """What the dotted path ``target`` names; a ConfigError saying which module or name is missing.

    Hydra's own message would call a module without the class "not a package".
    """
    return import_object(target, f"{path}._target_", _strategies_in)


def strategy_arguments(target: Any, path: str = "strategy") -> list[str] | None:
    """The keyword arguments the class ``target`` (at ``path``) takes; None if they cannot be read.

    A constructor taking ``**kwargs`` passes them on to its parent's (FOT's to
    FedAvg's): the arguments are those named along the class's MRO up to the
    first ``__init__`` without ``**kwargs``. None where that chain never ends
    (it reaches ``object``) or a signature cannot be read.
    """
    named = strategy_class(target, path)
    owners = [klass for klass in named.__mro__ if "__init__" in vars(klass)] if isinstance(named, type) else []
    arguments: list[str] = []
    for callable_ in [vars(klass)["__init__"] for klass in owners] or [named]:
        try:
            parameters = list(inspect.signature(callable_).parameters.values())
        except (TypeError, ValueError):  # a builtin without a signature: instantiate will say what it is
            return None
        if owners:
            parameters = parameters[1:]  # self
        arguments += [
            p.name
            for p in parameters
            if p.kind in (p.POSITIONAL_OR_KEYWORD, p.KEYWORD_ONLY) and p.name not in arguments
        ]
        if not any(p.kind is p.VAR_KEYWORD for p in parameters):
            return arguments
    return None


def takes_any_keyword(target: Any, path: str = "strategy") -> bool:
    """Whether the class's own constructor takes ``**kwargs``: then which keys it takes shows only when it is
    built (FOT passes them on to FedAvg, which refuses a typo; a user's class may keep them)."""
    named = strategy_class(target, path)
    init = (
        next((vars(k)["__init__"] for k in named.__mro__ if "__init__" in vars(k)), None)
        if isinstance(named, type)
        else named
    )
    try:
        return any(p.kind is p.VAR_KEYWORD for p in inspect.signature(init).parameters.values())
    except (TypeError, ValueError):
        return True


def unknown_argument(target: Any, key: str) -> str | None:
    """Why ``key`` (a dotted path ending in the argument) cannot be given to ``target``'s class; None if it can,
    or if only building the class can tell (:func:`takes_any_keyword`)."""
    path, _, name = key.rpartition(".")
    arguments = strategy_arguments(target, path)
    if arguments is None or name in arguments or name in _HYDRA_KEYS or takes_any_keyword(target, path):
        return None
    return _not_an_argument(key, target, arguments)


def _not_an_argument(key: str, target: Any, arguments: list[str]) -> str:
    path = key.rpartition(".")[0]
    return (
        f"{key}: unknown key, not an argument of {path}._target_ = {target!r}; "
        f"valid keys: {', '.join(arguments) or '(none)'}"
    )


def _refused_key(node: DictConfig, path: str, name: str) -> str | None:
    """The message for argument ``name`` that a constructor in ``node`` (or a strategy it wraps) refused as it
    was built; None where no node sets it."""
    if name in node:
        return _not_an_argument(f"{path}.{name}", node._target_, strategy_arguments(node._target_, path) or [])
    nested = (key for key in node if isinstance(node.get(key), DictConfig) and "_target_" in node[key])
    return next(filter(None, (_refused_key(node[key], f"{path}.{key}", name) for key in nested)), None)


def _check_arguments(node: DictConfig, path: str) -> None:
    """Every key of ``node`` and its nested strategies is an argument of its ``_target_``'s constructor."""
    if "_target_" not in node:
        return
    for key in node:
        if problem := unknown_argument(node._target_, f"{path}.{key}"):
            raise ConfigError(problem)
        if isinstance(node.get(key), DictConfig):
            _check_arguments(node[key], f"{path}.{key}")


def _strategies_in(module: Any) -> str:
    """What a module offers as strategies, for a message about a name it lacks."""
    found = sorted(
        name
        for name, value in vars(module).items()
        if isinstance(value, type) and issubclass(value, Strategy) and not name.startswith("_")
    )
    return f"it has {', '.join(found)}" if found else "it defines no Strategy subclass"


def strategy_layers(strategy: Any) -> list[tuple[str, Any]]:
    """The strategy and the strategies it wraps (DP wrappers keep theirs in ``.strategy``)."""
    layers, path = [], "strategy"
    while strategy is not None:
        layers.append((path, strategy))
        strategy, path = getattr(strategy, "strategy", None), f"{path}.strategy"
    return layers


def _first_line(error: Exception) -> str:
    """Hydra nests the cause; the innermost message says what was wrong."""
    while error.__cause__ is not None:
        error = error.__cause__  # type: ignore[assignment]
    return str(error).strip().splitlines()[0] if str(error).strip() else type(error).__name__
