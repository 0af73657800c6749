"""A user's strategy that sends the clients a learning rate of its own each round (Flower's "lr")."""

from flwr.serverapp.strategy import FedAvg


class SendsLearningRate(FedAvg):
    """FedAvg whose train config carries ``lr``."""

    def __init__(self, client_lr: float, **kwargs):
        super().__init__(**kwargs)
        self.client_lr = client_lr

    def configure_train(self, server_round, arrays, config, grid):
        config["lr"] = self.client_lr
        return super().configure_train(server_round, arrays, config, grid)
