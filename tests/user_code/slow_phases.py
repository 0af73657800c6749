"""A model that takes its time to build and a client method whose clients take theirs in round 2, so a
test can send a signal in that phase: each writes the file FEDSTREAM_TEST_SENTINEL names, once, as it
starts to wait; where the file already exists (the run's second start), neither waits."""

import math
import os
import time
from pathlib import Path

from torch import nn

from clients.sgd import SGDClient


def _first_time() -> bool:
    sentinel = Path(os.environ["FEDSTREAM_TEST_SENTINEL"])
    if sentinel.exists():
        return False
    sentinel.write_text(str(os.getpid()))
    return True


def slow_to_build(input_shape, num_classes, cfg):
    """A plain MLP, built after 60 s the first time (the driver builds it first)."""
    if _first_time():
        time.sleep(60)
    return nn.Sequential(
        nn.Flatten(), nn.Linear(math.prod(input_shape), cfg.hidden), nn.ReLU(), nn.Linear(cfg.hidden, num_classes)
    )


class SlowInRoundTwo(SGDClient):
    """Plain SGD, except every client of round 2 sleeps 20 s before training, in the run that first gets there."""

    waiting = False

    def begin(self, model, context):
        if context.server_round == 2 and (SlowInRoundTwo.waiting or _first_time()):
            SlowInRoundTwo.waiting = True
            time.sleep(20)
