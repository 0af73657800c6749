"""What a checkpoint keeps of a strategy: its state, as data, per layer (a DP wrapper and what it wraps).

A strategy is rebuilt from the validated config on resume; only what changes
between rounds comes from the checkpoint. A layer's state holds two parts:

- ``flower``: the attributes a Flower strategy it derives from keeps between
  rounds (:data:`_FLOWER_STATE`: FedOpt's moments, FedAvgM's momentum, the
  adaptive clipping norm), as Flower's classes cannot implement a protocol;
- ``own``: what the layer's ``checkpoint_state()`` returns, where it has one
  (``simulator.protocol.StatefulStrategy``: FOT's bases, CCVR's class statistics).

:func:`lost_on_resume` proves a state whole: restored into a copy of the
strategy as built, it must give the live strategy's attributes back.
"""

from __future__ import annotations

import functools
import hashlib
import inspect
import math
import random
from collections import OrderedDict
from collections.abc import Mapping
from dataclasses import dataclass
from typing import Any

import numpy as np
import torch
from flwr.app import Array, ArrayRecord
from flwr.serverapp.strategy import (
    DifferentialPrivacyClientSideAdaptiveClipping,
    DifferentialPrivacyServerSideAdaptiveClipping,
    DifferentialPrivacyServerSideFixedClipping,
    FedAvg,
    FedAvgM,
    QFedAvg,
    Strategy,
)
from flwr.serverapp.strategy.dp_fixed_clipping import DifferentialPrivacyFixedClippingBase
from flwr.serverapp.strategy.fedopt import FedOpt

from strategies.factory import strategy_layers

# How an attribute of a Flower strategy is kept: its values by weight name, a list in the global
# arrays' order, an ArrayRecord, or a positive number; None where it is not set yet.
_BY_NAME, _LIST, _RECORD, _POSITIVE = "arrays by weight name", "arrays in weight order", "ArrayRecord", "number > 0"


@dataclass(frozen=True)
class _Kept:
    state: dict[str, str]  # attribute -> how it is kept
    rebuilt: tuple[str, ...] = ()  # attributes configure_train sets afresh every round: not state


# Each Flower class a strategy may derive from, and what it keeps between rounds (read from
# flwr 1.42's code: the attributes its methods assign other than in __init__). The first class
# of a strategy's MRO found here applies; its subclasses add their own through the protocol.
_FLOWER_STATE: dict[type, _Kept] = {
    FedAvg: _Kept({}),
    FedOpt: _Kept({"m_t": _BY_NAME, "v_t": _BY_NAME}, rebuilt=("current_arrays",)),
    FedAvgM: _Kept({"current_arrays": _RECORD, "momentum_vector": _LIST}),
    QFedAvg: _Kept({}, rebuilt=("current_arrays",)),
    DifferentialPrivacyFixedClippingBase: _Kept({}),  # an accountant's state is not covered: see lost_on_resume
    DifferentialPrivacyServerSideFixedClipping: _Kept({}, rebuilt=("current_arrays",)),
    DifferentialPrivacyClientSideAdaptiveClipping: _Kept({"clipping_norm": _POSITIVE}),
    DifferentialPrivacyServerSideAdaptiveClipping: _Kept({"clipping_norm": _POSITIVE}, rebuilt=("current_arrays",)),
}


class StrategyStateError(ValueError):
    """A saved strategy state that does not fit the strategy or the global arrays; the message says where."""


@dataclass(frozen=True)
class LayerState:
    """One layer's state: where it is (``strategy``, ``strategy.strategy``), its class, its state."""

    path: str
    kind: str  # module.qualname of the layer's class
    state: dict[str, Any]  # JSON values and numpy arrays


def strategy_state(strategy: Strategy) -> list[LayerState]:
    """The state of every layer of ``strategy``, outermost first."""
    saved = []
    for path, layer in strategy_layers(strategy):
        state: dict[str, Any] = {}
        if (kept := _flower_kept(layer)) is not None and kept.state:
            state["flower"] = {name: _plain(getattr(layer, name), how) for name, how in kept.state.items()}
        if callable(getattr(layer, "checkpoint_state", None)):
            state["own"] = layer.checkpoint_state()
        saved.append(LayerState(path, class_name(type(layer)), state))
    return saved


def restore_strategy_state(strategy: Strategy, saved: list[LayerState], arrays: ArrayRecord) -> None:
    """Set ``saved`` on ``strategy``, just built from the config; a StrategyStateError if it does not fit."""
    layers = strategy_layers(strategy)
    kinds = [class_name(type(layer)) for _, layer in layers]
    if [layer.kind for layer in saved] != kinds:
        held = " around ".join(s.kind for s in saved) or "no strategy"
        raise StrategyStateError(f"it holds the state of {held}; the config builds {' around '.join(kinds)}")
    for (path, layer), layer_state in zip(layers, saved):
        try:
            _restore_layer(layer, layer_state.state, arrays, path)
        except StrategyStateError:
            raise
        except Exception as error:  # a crafted state may hold any JSON where a dict or an array belongs
            raise StrategyStateError(f"{path} ({type(layer).__name__}): {type(error).__name__}: {error}") from None


def _restore_layer(layer: Strategy, state: dict[str, Any], arrays: ArrayRecord, path: str) -> None:
    if not isinstance(state, dict) or not set(state) <= {"flower", "own"}:
        found = sorted(state) if isinstance(state, dict) else f"a {type(state).__name__}"
        raise StrategyStateError(f"{path}: holds {found}, expected a dict of 'flower' and 'own' parts")
    kept = _flower_kept(layer)
    flower = state.get("flower", {})
    expected = set(kept.state) if kept is not None else set()
    if set(flower) != expected:
        raise StrategyStateError(f"{path}: holds {sorted(flower)}, {type(layer).__name__} keeps {sorted(expected)}")
    for name, how in (kept.state if kept is not None else {}).items():
        setattr(layer, name, _restored(flower[name], how, f"{path}.{name}", arrays))
    restore = getattr(layer, "restore_state", None)
    if ("own" in state) != callable(restore):
        raise StrategyStateError(f"{path}: the state and {type(layer).__name__}'s restore_state do not match")
    if callable(restore):
        restore(state["own"], arrays)


def expect_keys(state: Any, keys: set[str], where: str) -> None:
    """Refuse a state that is not a dict of exactly ``keys``: one entry more may be an attempt to set what the
    config decides."""
    if not isinstance(state, dict) or set(state) != keys:
        found = sorted(state) if isinstance(state, dict) else f"a {type(state).__name__}"
        raise StrategyStateError(f"{where}: holds {found}, expected a dict of {sorted(keys)}")


def float_array(value: Any, shape: tuple[int | None, ...], where: str) -> np.ndarray:
    """``value`` if it is a finite float array of ``shape`` (None in ``shape``: any length); else a
    StrategyStateError naming ``where``."""
    if (
        not isinstance(value, np.ndarray)
        or value.dtype.kind != "f"
        or value.ndim != len(shape)
        or any(want is not None and got != want for got, want in zip(value.shape, shape))
    ):
        found = f"{value.dtype} array of shape {value.shape}" if isinstance(value, np.ndarray) else type(value).__name__
        raise StrategyStateError(f"{where}: expected a float array of shape {shape}, found a {found}")
    if not np.isfinite(value).all():
        raise StrategyStateError(f"{where}: holds NaN or infinite values")
    return value


def lost_on_resume(live: Strategy, restored: Strategy) -> list[str]:
    """The attributes (``strategy.v_t``, ...) in which ``restored`` (a copy of the strategy as built, its
    state restored) differs from ``live``: what a resume would lose; empty when the state is whole."""
    lost = []
    for (path, one), (_, other) in zip(strategy_layers(live), strategy_layers(restored)):
        kept = _flower_kept(one)
        skipped = {"strategy", *(kept.rebuilt if kept is not None else ())}  # a wrapped layer is compared itself
        for name in sorted((vars(one).keys() | vars(other).keys()) - skipped):
            if _fingerprint(getattr(one, name, None), set()) != _fingerprint(getattr(other, name, None), set()):
                lost.append(f"{path}.{name}")
    return lost


def class_name(kind: type) -> str:
    return f"{kind.__module__}.{kind.__qualname__}"


def _flower_kept(layer: Strategy) -> _Kept | None:
    return next((_FLOWER_STATE[k] for k in type(layer).__mro__ if k in _FLOWER_STATE), None)


def _plain(value: Any, how: str) -> Any:
    """An attribute of a Flower strategy as JSON values and arrays."""
    if value is None or how == _POSITIVE:
        return value
    if how == _RECORD:
        return {name: array.numpy() for name, array in value.items()}
    return dict(value) if how == _BY_NAME else list(value)


def _restored(value: Any, how: str, key: str, arrays: ArrayRecord) -> Any:
    """``value`` as the attribute it was, checked against the global arrays; a StrategyStateError naming ``key``."""
    if value is None:
        return None
    if how == _POSITIVE:
        if isinstance(value, bool) or not isinstance(value, (int, float)) or not (math.isfinite(value) and value > 0):
            raise StrategyStateError(f"{key} = {value!r}: expected a finite number > 0")
        return value
    shapes = {name: (array.shape, np.dtype(array.dtype)) for name, array in arrays.items()}
    found = list(value.items()) if isinstance(value, dict) and how != _LIST else None
    if how == _LIST and isinstance(value, list) and len(value) == len(shapes):
        found = list(zip(shapes, value))
    if found is None or sorted(name for name, _ in found) != sorted(shapes):
        raise StrategyStateError(f"{key}: expected {how} for the weights {list(shapes)}")
    for name, array in found:
        float_array(array, tuple(shapes[name][0]), f"{key}[{name!r}]")
    if how == _RECORD:
        return ArrayRecord(OrderedDict((name, Array(array)) for name, array in found))
    return dict(found) if how == _BY_NAME else [array for _, array in found]


_PYTHON_EXACT = (np.dtype(np.float64), np.dtype(np.int64), np.dtype(np.bool_))  # numpy types Python numbers hold


def _tensor_values(tensor: torch.Tensor) -> np.ndarray | tuple[str, ...]:
    """A tensor's values as numpy (bfloat16 and the like widened to float32, exactly); a tensor numpy cannot
    hold (sparse, on the meta device) by its dtype, shape and layout."""
    tensor = tensor.detach()
    try:
        return tensor.cpu().numpy()
    except (TypeError, RuntimeError):
        try:
            return tensor.cpu().float().numpy()
        except (TypeError, RuntimeError, NotImplementedError):
            return ("tensor", str(tensor.dtype), str(tuple(tensor.shape)), str(tensor.layout))


def _fingerprint(value: Any, seen: set[int]) -> Any:
    """A comparable summary of ``value``: equal for equal data, whatever the objects' identities (a numpy
    scalar as the 0-d array a checkpoint keeps it as, one that is exactly a Python number as that number, a
    tuple as the list); random generators by their state."""
    if isinstance(value, torch.Tensor):
        value = _tensor_values(value)
    if isinstance(value, (np.ndarray, np.generic)) and np.ndim(value) == 0 and value.dtype in _PYTHON_EXACT:
        value = value.item()  # np.float64, np.int64, np.bool_: what float(), int(), bool() give back exactly
    if isinstance(value, (np.ndarray, np.generic)):
        value = np.asarray(value)
        return ("array", value.dtype.str, value.shape, hashlib.sha256(np.ascontiguousarray(value).data).hexdigest())
    if isinstance(value, np.random.Generator):
        return ("generator", _fingerprint(value.bit_generator.state, seen))
    if isinstance(value, (np.random.RandomState, random.Random)):
        return ("random", _fingerprint(value.get_state() if hasattr(value, "get_state") else value.getstate(), seen))
    if isinstance(value, (bytes, bytearray)):
        return ("bytes", hashlib.sha256(value).hexdigest())
    if value is None or isinstance(value, (bool, int, float, complex, str, np.generic)):
        return (type(value).__name__, repr(value))
    if isinstance(value, Array):
        return ("Array", value.dtype, tuple(value.shape), hashlib.sha256(value.data).hexdigest())
    if isinstance(value, Mapping):  # dicts, ArrayRecords
        return ("dict", sorted((repr(_fingerprint(k, seen)), _fingerprint(v, seen)) for k, v in value.items()))
    if isinstance(value, (list, tuple)):
        return ("sequence", [_fingerprint(v, seen) for v in value])
    if isinstance(value, (set, frozenset)):
        return ("set", sorted(repr(_fingerprint(v, seen)) for v in value))
    if isinstance(value, functools.partial):
        return ("partial", _fingerprint((value.func, value.args, value.keywords), seen))
    if inspect.ismethod(value):
        return ("method", value.__func__.__qualname__, _fingerprint(value.__self__, seen))
    if callable(value) and hasattr(value, "__qualname__") or inspect.ismodule(value):
        return ("named", getattr(value, "__module__", None), getattr(value, "__qualname__", value.__name__))
    if id(value) in seen:
        return ("seen", type(value).__qualname__)
    slots = [
        name
        for kind in type(value).__mro__
        for name in (
            (lambda declared: (declared,) if isinstance(declared, str) else declared)(vars(kind).get("__slots__", ()))
        )
        if name not in ("__dict__", "__weakref__")
    ]
    if hasattr(value, "__dict__") or slots:
        fields = {**getattr(value, "__dict__", {}), **{name: getattr(value, name, None) for name in slots}}
        return (type(value).__qualname__, _fingerprint(fields, seen | {id(value)}))
    return ("opaque", type(value).__qualname__)
