"""Users' client methods that misbehave on one client: each must fail the run, naming it."""

import os
import sys
import time

import torch

from clients.sgd import SGDClient


class BlocksOnClientThree(SGDClient):
    """Plain SGD, except client 3 never returns from round 2."""

    def begin(self, model, context):
        while context.client_id == 3 and context.server_round == 2:
            time.sleep(0.05)


class ExitsOnClientThree(SGDClient):
    """Plain SGD, except client 3 ends its process as a success."""

    def begin(self, model, context):
        if context.client_id == 3:
            sys.exit(0)


class NaNOnClientThree(SGDClient):
    """Plain SGD, except client 3 returns NaN weights from round 2 on."""

    def end(self, model, context):
        if context.client_id == 3 and context.server_round >= 2:
            with torch.no_grad():
                next(model.parameters()).fill_(float("nan"))
        return {}


class KillsItsProcessOnClientThree(SGDClient):
    """Plain SGD, except client 3 ends the process hosting it (an actor, on Ray)."""

    def begin(self, model, context):
        if context.client_id == 3:
            os._exit(1)


class SwallowsErrorsAndBlocksOnClientThree(SGDClient):
    """Plain SGD, except client 3 blocks in round 2 and swallows every Exception meanwhile."""

    def begin(self, model, context):
        while context.client_id == 3 and context.server_round == 2:
            try:
                time.sleep(0.05)
            except Exception:
                pass


class DiesOnceOnClientThree(SGDClient):
    """Plain SGD, except the first time client 3 trains, it ends the process hosting it.

    The file named by FEDSTREAM_TEST_SENTINEL records that it happened.
    """

    def begin(self, model, context):
        sentinel = os.environ["FEDSTREAM_TEST_SENTINEL"]
        if context.client_id == 3 and not os.path.exists(sentinel):
            open(sentinel, "w").close()
            os._exit(1)
