"""A user's client method that writes into the shared payload, and a user's strategy bound to the server's model."""

from __future__ import annotations

from flwr.serverapp.strategy import FedAvg

from clients.scaffold import ScaffoldClient


class MutatingScaffold(ScaffoldClient):
    """SCAFFOLD's client that adds 1 to the server's control variate in place: every later client would see it."""

    def begin(self, model, context):
        super().begin(model, context)
        context.payload["head.bias"].add_(1.0)


class BoundToTheModel(FedAvg):
    """FedAvg that keeps the engine's ``model_for`` as an attribute and uses it at every round's aggregation."""

    def bind_model(self, model_for):
        self.model_for = model_for

    def aggregate_train(self, server_round, replies):
        arrays, metrics = super().aggregate_train(server_round, replies)
        self.model_for(arrays)  # a copy of the global model, which must hold these parameters
        return arrays, metrics
