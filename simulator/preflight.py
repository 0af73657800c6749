"""The checks that run before any client trains: each refuses a run that could only fail, hang or mislead.

The engine calls them in order once the data, stream and model exist, and,
for ``resume=true``, against the checkpoint: a stream whose sampling the
strategy could never satisfy, a model without what probes or personal layers
need, a strategy that refuses the model's arrays, a checkpoint of another
config, strategy or model. Method-specific warnings (a proximal term the
client method ignores, a personal head's meaning for the global accuracy)
come from here too, so the engine stays the loop.
"""

from __future__ import annotations

import logging
from pathlib import Path
from typing import Any

import numpy as np
import torch
from flwr.app import ArrayRecord
from flwr.serverapp.strategy import Strategy

from clients import METHODS
from clients.augment import AUGMENTATIONS
from clients.base import ClientMethod
from clients.fedprox import FedProxClient
from simulator.checkpoint import Checkpoint
from simulator.config import NO_AUGMENTATION, ConfigError, ExperimentConfig, to_dict
from simulator.protocol import PROXIMAL_MU
from simulator.run_dir import leaves
from simulator.seeding import Purpose, torch_generator
from simulator.streams import Stream
from simulator.worker import all_finite
from strategies import check_sampling, strategy_layers

log = logging.getLogger("fedstream")
_UNSET = "(not set)"  # a key one config has and the other lacks


def stream_rounds(config: ExperimentConfig, stream: Stream, strategy: Strategy) -> int:
    """The run's rounds (``rounds``, else the stream's own length); refuse sampling the stream cannot satisfy."""
    rounds = config.rounds or stream.default_rounds
    if rounds is None:
        raise ConfigError(f"rounds = None: stream.kind = {config.stream.kind!r} needs rounds set")
    check_sampling(
        strategy,
        fewest_present(stream, rounds),
        f"the fewest in any round of stream.kind = {config.stream.kind!r}",
        config.eval.federated,
    )
    return rounds


def fewest_present(stream: Stream, rounds: int) -> int:
    """The fewest clients present in any round: more is what a strategy would wait for forever."""
    return min(len(stream.available_clients(r)) for r in range(1, rounds + 1))


def check_model_serves(model: torch.nn.Module, method: type[ClientMethod], config: ExperimentConfig) -> None:
    """Refuse, before any client trains, a model that lacks what probes, diagnostics or personal layers need."""
    measured = [
        key for key, on in (("eval.probes", config.eval.probes), ("eval.diagnostics", config.eval.diagnostics)) if on
    ]
    if measured and not callable(getattr(model, "features", None)):
        raise ConfigError(
            f"model.name = {config.model.name!r}: the model has no features(x) method, which the "
            f"representation {' and '.join(k.split('.')[1] for k in measured)} need; add one or set "
            + " ".join(f"{key}=false" for key in measured)
        )
    if not method.personal_prefixes:
        return
    personal = [k for k in model.state_dict() if k.startswith(method.personal_prefixes)]
    # The server scores each client's own model as its head on the shared features.
    if not (
        callable(getattr(model, "features", None))
        and isinstance(getattr(model, "head", None), torch.nn.Module)
        and personal
        and all(k.startswith("head.") for k in personal)
    ):
        raise ConfigError(
            f"client.method = {config.client.method!r} keeps {', '.join(method.personal_prefixes)}* for each "
            f"client: it needs a model with features(x) and a head holding those weights, and "
            f"model.name = {config.model.name!r} has none"
        )
    log.warning(
        "client.method = %s keeps each client's head: the global model is the global encoder under the "
        "initial head, never trained, and acc_* and the accuracy matrix score that; client_acc_personal_* "
        "scores each client's own model, the probes the encoder",
        config.client.method,
    )


def check_image_options(config: ExperimentConfig, images: np.ndarray) -> None:
    """Refuse what only images can take on other inputs: ``engine.channels_last``, and ``data.augment``,
    whose every augmentation takes a batch ``(N, C, H, W)``; one that fails on two training samples, or
    returns another shape or type, fails here."""
    if config.engine.channels_last and images.ndim != 4:
        raise ConfigError(
            f"engine.channels_last = true lays out images (channels, height, width); data.dataset = "
            f"{config.data.dataset!r} gives inputs of shape {images.shape[1:]}: set engine.channels_last=false"
        )
    augment = config.data.augment
    if augment == NO_AUGMENTATION:
        return
    if images.ndim != 4:
        raise ConfigError(
            f"data.augment = {augment!r} augments images (channels, height, width); "
            f"data.dataset = {config.data.dataset!r} gives inputs of shape {images.shape[1:]}: use data.augment=none"
        )
    x = torch.from_numpy(images[:2].copy())
    try:
        augmented = AUGMENTATIONS.resolve(augment)(x, torch_generator(config.seed, Purpose.AUGMENT))
    except Exception as error:
        raise ConfigError(
            f"data.augment = {augment!r} failed on two training samples: {type(error).__name__}: {error}"
        ) from None
    if not isinstance(augmented, torch.Tensor) or augmented.shape != x.shape or augmented.dtype != x.dtype:
        found = (
            f"{augmented.dtype} {tuple(augmented.shape)}"
            if isinstance(augmented, torch.Tensor)
            else type(augmented).__name__
        )
        raise ConfigError(
            f"data.augment = {augment!r} returned {found} for a batch of {x.dtype} {tuple(x.shape)}: "
            "an augmentation returns a batch of the shape and type it was given"
        )


def warn_if_proximal_term_unused(strategy: Strategy, method: type[ClientMethod], method_name: str) -> None:
    """Say so where the strategy sends a proximal term (Flower's FedProx) that ``method`` ignores."""
    mu = max(getattr(layer, "proximal_mu", 0.0) for _, layer in strategy_layers(strategy))
    if mu and not issubclass(method, FedProxClient):
        log.warning(
            "the strategy sends %s=%s but client.method=%s ignores it; "
            "set client.method=fedprox to apply the proximal term",
            PROXIMAL_MU,
            mu,
            method_name,
        )


def check_both_halves(strategy: Strategy, method: type[ClientMethod], method_name: str) -> None:
    """A method in two halves runs with both, or not at all: a strategy (or one it wraps) that names its
    client half (``client_half``, a ``client.method`` name) needs ``client.method`` to be it or to build on
    it, and a client method that names its server half (``server_half``) needs a strategy whose client half
    it is (``simulator.protocol.PairedStrategy``)."""
    halves = [(path, layer) for path, layer in strategy_layers(strategy) if getattr(layer, "client_half", None)]
    for path, layer in halves:
        if path != "strategy":  # a wrapper (DP clipping) changes the updates the client half's state was made from
            raise ConfigError(
                f"{path}._target_ = {type(layer).__name__}: a strategy with a client half cannot be wrapped "
                f"(here by {type(strategy).__name__}): its clients' state follows the updates they sent, not "
                "the wrapper's clipped or noised ones"
            )
        if not issubclass(method, METHODS.resolve(layer.client_half, f"{path}.client_half")):
            raise ConfigError(
                f"{path}._target_ = {type(layer).__name__} needs its client half, client.method="
                f"{layer.client_half}; client.method = {method_name!r} is not it"
            )
    server_half = getattr(method, "server_half", None)
    if server_half and not any(issubclass(method, METHODS.resolve(layer.client_half)) for _, layer in halves):
        raise ConfigError(
            f"client.method = {method_name!r} is the client half of strategy={server_half}, which the strategy "
            f"({type(strategy).__name__}) is not: run it with strategy={server_half}"
        )


def check_strategy_serves(strategy: Strategy, arrays: ArrayRecord) -> None:
    """A strategy (or one it wraps) may refuse the global arrays before any work: ``check_arrays(arrays)``
    (``simulator.protocol.TaskEndStrategy``)."""
    for _, layer in strategy_layers(strategy):
        if callable(getattr(layer, "check_arrays", None)):
            layer.check_arrays(arrays)


def check_resumable(
    saved: Checkpoint,
    where: Path,
    config: ExperimentConfig,
    stream: Stream,
    rounds: int,
    initial: ArrayRecord,
) -> None:
    """Refuse a checkpoint (in ``where``) that this config cannot continue exactly, or that would hang or
    poison the run. ``initial``: the configured model's global arrays, whose names, shapes and dtypes it must
    have. (The strategy's state is checked as it is restored.)"""
    _check_same_config(saved.config, config, where)
    if rounds < saved.round:
        raise ConfigError(
            f"rounds = {rounds}: the checkpoint in {where} has finished round {saved.round}; "
            f"resume with rounds >= {saved.round}"
        )
    if saved.num_tasks != stream.num_tasks:
        raise ConfigError(
            f"rounds = {rounds}: resuming would change the stream from {saved.num_tasks} to "
            f"{stream.num_tasks} tasks, so the finished rounds would not be those of this run"
        )
    # The kind of number, not its width: Flower's adaptive strategies return float64 weights for a float32 model.
    layout = {name: (tuple(array.shape), np.dtype(array.dtype).kind) for name, array in saved.arrays.items()}
    expected = {name: (tuple(array.shape), np.dtype(array.dtype).kind) for name, array in initial.items()}
    if layout != expected:
        differing = sorted(
            f"{name}: {layout.get(name, 'missing')} there, {expected.get(name, 'none')} in the model"
            for name in layout.keys() | expected.keys()
            if layout.get(name) != expected.get(name)
        )
        raise ConfigError(
            f"resume = true: the global weights in {where} are not the configured model's "
            f"(model.name = {config.model.name!r}): {'; '.join(differing[:5])}"
        )
    if not all_finite(saved.arrays.to_numpy_ndarrays()):
        raise ConfigError(f"resume = true: the checkpoint in {where} holds non-finite global weights")


def _check_same_config(saved: dict[str, Any], config: ExperimentConfig, where: Path) -> None:
    """Refuse to resume a checkpoint of a different config, naming each differing key with both values;
    rounds may grow, engines differ (the numbers do not depend on the engine)."""
    current, before = leaves(to_dict(config)), leaves(saved)
    may_differ = ("rounds", "engine.")
    differing = sorted(
        key
        for key in current.keys() | before.keys()
        if not key.startswith(may_differ) and current.get(key, _UNSET) != before.get(key, _UNSET)
    )
    if differing:
        shown = "; ".join(
            f"{key} = {before.get(key, _UNSET)!r} there, {current.get(key, _UNSET)!r} now" for key in differing
        )
        raise ConfigError(
            f"resume=true: the checkpoint in {where} was written with another config: {shown}; "
            "resume with the same config"
        )
