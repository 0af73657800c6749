"""A user's client method that draws from torch's global generator, not the context's."""

import torch

from clients.sgd import SGDClient


class NoisyGradients(SGDClient):
    """Plain SGD with Gaussian noise on every gradient, drawn from torch's global generator."""

    def adjust_gradients(self, model, context):
        for param in model.parameters():
            if param.grad is not None:
                param.grad.add_(torch.randn_like(param) * 1e-2)
