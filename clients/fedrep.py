"""FedRep: Collins et al. 2021, "Exploiting Shared Representations for Personalized Federated Learning" (ICML).

Like FedPer, each client keeps its own head and only the encoder (the shared
representation) is aggregated; unlike FedPer, a round trains the two in turn:
first the head for ``client.fedrep.head_epochs`` epochs with the encoder
frozen, then the encoder for ``client.epochs`` epochs with the new head
frozen. The paper's experiments run many more head epochs than body epochs
(10 and 1 on CIFAR); the default follows them. The round's reported
``train_loss`` is the encoder phase's.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
from torch import nn

from clients.base import TrainContext
from clients.fedper import FedPerClient


@dataclass(frozen=True)
class FedRepSettings:
    head_epochs: int = 10  # epochs on the head, encoder frozen, before the encoder's client.epochs

    def problems(self) -> list[tuple[str, str]]:
        return [("head_epochs", "must be at least 1")] if self.head_epochs < 1 else []


class FedRepClient(FedPerClient):
    """The head trained first on the frozen encoder, then the encoder under the new head."""

    Settings = FedRepSettings
    section = "fedrep"

    def fit(self, model: nn.Module, x: torch.Tensor, y: torch.Tensor, context: TrainContext) -> float:
        head = [p for n, p in model.named_parameters() if n.startswith(self.personal_prefixes)]
        body = [p for n, p in model.named_parameters() if not n.startswith(self.personal_prefixes)]
        self.run_epochs(model, head, x, y, context, self.settings.head_epochs)
        return self.run_epochs(model, body, x, y, context, self.config.epochs)
