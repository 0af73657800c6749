"""Instantiate the configured strategy and reject settings that could never run."""

from __future__ import annotations

from typing import Any

from flwr.serverapp.strategy import Strategy
from hydra.errors import InstantiationException
from hydra.utils import instantiate
from omegaconf import DictConfig

from simulator.config import ConfigError

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
    """Instantiate ``node`` (a Hydra node with ``_target_``); the engine checks it against the stream."""
    target = node.get("_target_")
    try:
        strategy = instantiate(node, _convert_="all")
    except InstantiationException as error:
        raise ConfigError(f"strategy._target_ = {target!r}: {_first_line(error)}") from None
    if not isinstance(strategy, Strategy):
        raise ConfigError(
            f"strategy._target_ = {target!r}: built a {type(strategy).__name__}, "
            "expected a subclass of flwr.serverapp.strategy.Strategy"
        )
    return strategy


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
