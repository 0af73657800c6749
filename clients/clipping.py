"""Client-side clipping for differential privacy: what Flower's client-side DP wrappers expect of clients.

``DifferentialPrivacyClientSideFixedClipping`` and ``...AdaptiveClipping`` send
a clipping norm in the train ConfigRecord and add the noise themselves; each
client clips its update (its new weights minus the round's global ones) to that
L2 norm. Any client method gets this: the worker applies it to the weights a
method leaves.

For adaptive clipping the client also reports a bit, ``norm_bit``, and here
FedStream departs from Flower's own client mod on purpose. Andrew et al. 2021
("Differentially Private Learning with Adaptive Clipping") have each client
report b = 1 if its update's norm is <= C (unclipped) and move the norm
geometrically, C <- C * exp(-lr * (mean(b) - q)), so that the share of
unclipped updates meets the target quantile q. Flower's wrapper applies exactly
this update, with q its ``target_clipped_quantile``, but Flower's
``adaptiveclipping_mod`` reports b = 1 where the update was *clipped*: then
more clipping shrinks C further, and C runs away to 0 (or grows without bound)
instead of settling. FedStream's clients report "within the norm", the paper's
bit, so with the wrapper ``target_clipped_quantile`` is the share of updates
left unclipped and C settles at that quantile of the update norms
(tests/test_clipping.py).
"""

from __future__ import annotations

from typing import Any

import numpy as np

from simulator.protocol import CLIPPING_NORM, NORM_BIT


def clip_if_asked(arrays: list[np.ndarray], reference: list[np.ndarray], config: dict[str, Any]) -> dict[str, float]:
    """Clip ``arrays`` in place where the strategy's ``config`` sends a clipping norm; the metric to report."""
    if CLIPPING_NORM not in config:
        return {}
    return {NORM_BIT: float(clip_update(arrays, reference, float(config[CLIPPING_NORM])))}


def clip_update(arrays: list[np.ndarray], reference: list[np.ndarray], max_norm: float) -> bool:
    """Scale ``arrays - reference`` in place to L2 norm at most ``max_norm``.

    Returns whether the update was within the norm already (Andrew et al.'s bit; see the module).
    """
    norm = float(np.sqrt(sum(float(np.sum((a - r) ** 2)) for a, r in zip(arrays, reference))))
    if norm <= max_norm:
        return True
    scale = max_norm / norm
    for array, ref in zip(arrays, reference):
        array -= ref
        array *= scale
        array += ref
    return False
