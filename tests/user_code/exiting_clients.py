"""Users' client methods that end their process, or reply with what no metric can be, on client 3 in
round 2: each must fail the run with a message naming the client and the round."""

import os
import sys
import threading

from clients.sgd import SGDClient


class SysExitsOnClientThree(SGDClient):
    """Plain SGD, except client 3 calls sys.exit(0) in round 2 (SystemExit: a success, were it let through)."""

    def begin(self, model, context):
        if context.client_id == 3 and context.server_round == 2:
            sys.exit(0)


class OsExitsOnClientThree(SGDClient):
    """Plain SGD, except client 3 calls os._exit(0) in round 2: no unwinding, no atexit, exit code 0."""

    def begin(self, model, context):
        if context.client_id == 3 and context.server_round == 2:
            os._exit(0)


class OsExitsInAThreadOnClientThree(SGDClient):
    """Plain SGD, except client 3 calls os._exit(0) from a thread of its own in round 2."""

    def begin(self, model, context):
        if context.client_id == 3 and context.server_round == 2:
            thread = threading.Thread(target=os._exit, args=(0,))
            thread.start()
            thread.join()


class StringMetricOnClientThree(SGDClient):
    """Plain SGD, except client 3's end() reports a string in round 2 (the others a float)."""

    def end(self, model, context):
        return {"note": "hello" if context.client_id == 3 and context.server_round == 2 else 1.0}
