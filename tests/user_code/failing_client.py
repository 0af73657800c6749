"""A user's client method that breaks on one client: the run must fail, naming it."""

from clients.sgd import SGDClient


class FailsOnClientThree(SGDClient):
    """Plain SGD, except client 3 raises."""

    def begin(self, model, context):
        if context.client_id == 3:
            raise RuntimeError("sensor data corrupted on this device")
