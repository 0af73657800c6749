"""Users' strategies whose aggregate is FedAvg's under other keys or in another order."""

from flwr.app import ArrayRecord
from flwr.serverapp.strategy import FedAvg


class RenamesAKey(FedAvg):
    """Returns FedAvg's arrays with the first key renamed: not the model's weights."""

    def aggregate_train(self, server_round, replies):
        arrays, metrics = super().aggregate_train(server_round, replies)
        items = list(arrays.items())
        return ArrayRecord({"renamed": items[0][1], **dict(items[1:])}), metrics


class ReversesKeys(FedAvg):
    """Returns FedAvg's arrays, every key kept, in reverse order."""

    def aggregate_train(self, server_round, replies):
        arrays, metrics = super().aggregate_train(server_round, replies)
        return ArrayRecord(dict(reversed(list(arrays.items())))), metrics


SEEN: list[list[str]] = []  # the keys of every reply KeysSeen aggregated, in this process


class KeysSeen(FedAvg):
    """FedAvg that records the keys of the arrays each reply brings it."""

    def aggregate_train(self, server_round, replies):
        replies = list(replies)
        SEEN.extend(list(reply.content["arrays"].keys()) for reply in replies)
        return super().aggregate_train(server_round, replies)
