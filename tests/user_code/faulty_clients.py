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
