"""A user's strategy that keeps the keyword arguments it does not name, instead of passing them on."""

from flwr.serverapp.strategy import FedAvg


class KeepsOptions(FedAvg):
    """FedAvg with ``mu`` and whatever else the config gives it, kept in ``options``."""

    def __init__(self, mu: float = 0.1, **options):
        super().__init__()
        self.mu, self.options = mu, options
