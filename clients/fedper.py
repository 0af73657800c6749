"""FedPer: Arivazhagan et al. 2019, "Federated Learning with Personalization Layers".

The model is a shared body (the encoder), which the server aggregates, and
personal layers (the head), which each client keeps. Body and head train
together on the client's data each round. The head is the client's state: it
is loaded over the round's global encoder before training and stored after,
and never leaves the client (``personal_prefixes``), so a Flower strategy
aggregates the encoder alone, since it aggregates the arrays that arrive. A
client that has not trained yet starts from the model's initial head.
"""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any

import torch
from torch import nn

from clients.base import ClientMethod, TrainContext
from simulator.protocol import ClientState


class FedPerClient(ClientMethod):
    """Local SGD on the global encoder and the client's own head; only the encoder is sent."""

    section = "fedper"
    personal_prefixes = ("head.",)

    def begin(self, model: nn.Module, context: TrainContext) -> None:
        self.personalize(model, context.state)

    def personalize(self, model: nn.Module, state: Mapping[str, Any]) -> None:
        tensors = model.state_dict()
        with torch.no_grad():
            for name, array in state.items():
                if name in tensors:
                    tensors[name].copy_(torch.tensor(array))  # a copy: state arrays are read-only

    def new_state(self, model: nn.Module, context: TrainContext) -> ClientState:
        return {
            **context.state,
            **{
                name: tensor.detach().cpu().numpy().copy()
                for name, tensor in model.state_dict().items()
                if name.startswith(self.personal_prefixes)
            },
        }
