"""A user's client method whose every client blocks: the run must fail at the first, not after all."""

import time

from clients.sgd import SGDClient


class SleepsInBegin(SGDClient):
    """Plain SGD, except every client sleeps far past any timeout before training."""

    def begin(self, model, context):
        time.sleep(30)
