"""Client-side adaptive DP clipping: FedStream's norm bit against Flower's server-side update."""

from __future__ import annotations

import numpy as np
import pytest
from flwr.app import ArrayRecord, Message
from flwr.serverapp.strategy import DifferentialPrivacyClientSideAdaptiveClipping, FedAvg
from helpers import flower_task_identity, train_reply

from clients.clipping import clip_if_asked
from simulator.protocol import CLIPPING_NORM, NUM_EXAMPLES

NORMS = [float(n) for n in range(1, 11)]  # each client's update has the same L2 norm every round


def _reply(node: int, update_norm: float, clipping_norm: float) -> Message:
    """A client's reply: its update of norm ``update_norm``, clipped as a FedStream client clips it."""
    reference = [np.zeros(4, np.float32)]
    arrays = [np.array([update_norm, 0.0, 0.0, 0.0], np.float32)]
    metrics = clip_if_asked(arrays, reference, {CLIPPING_NORM: clipping_norm})
    return train_reply(node, ArrayRecord(arrays), {NUM_EXAMPLES: 1, **metrics})


@pytest.mark.parametrize(("target", "initial"), [(0.5, 0.1), (0.5, 100.0), (0.8, 1.0), (0.2, 30.0)])
def test_the_clipping_norm_settles_where_the_unclipped_share_meets_its_target(target, initial):
    flower_task_identity()
    strategy = DifferentialPrivacyClientSideAdaptiveClipping(
        FedAvg(),
        noise_multiplier=0.0,
        num_sampled_clients=len(NORMS),
        initial_clipping_norm=initial,
        target_clipped_quantile=target,
        clip_norm_lr=0.2,
        clipped_count_stddev=0.0,
    )
    for server_round in range(1, 201):
        replies = [_reply(node, norm, strategy.clipping_norm) for node, norm in enumerate(NORMS, start=2)]
        strategy.aggregate_train(server_round, replies)
    # Andrew et al. 2021: C moves until the share of updates with norm <= C is the target quantile,
    # i.e. C between the k-th and (k+1)-th smallest norm for k = target * clients. Were the bit
    # "clipped" (Flower's client mod), the same update would drive C away from it, to 0 or infinity.
    k = round(target * len(NORMS))
    assert NORMS[k - 1] <= strategy.clipping_norm < NORMS[k]
    unclipped = sum(norm <= strategy.clipping_norm for norm in NORMS) / len(NORMS)
    assert unclipped == pytest.approx(target)
