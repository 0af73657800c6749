"""Plain local SGD (FedAvg's client, McMahan et al. 2017): the base loop unchanged."""

from clients.base import ClientMethod


class SGDClient(ClientMethod):
    """Minibatch SGD on the client's data, nothing added."""

    section = "sgd"
