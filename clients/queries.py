"""What a client answers when the server asks (Flower ``MessageType.QUERY``) instead of training.

A server-side method may need statistics of the clients' data that training
replies do not carry: FOT the inputs each layer sees, CCVR per-class feature
statistics. The strategy sends a query message with the global arrays and a
query name (``simulator.protocol`` describes the messages and the shipped
answers); the client's method answers with named arrays computed on the
client's current data (at a task end: the data of the task just ended) and its
state, by the handler ``QUERIES`` ships under that name, or a user's
``handler(model, query) -> dict[str, np.ndarray]`` named by dotted path (so a
strategy can keep its client half in its own file). Randomness comes from the
generator the worker seeds from (run seed, round, client), so answers do not
depend on which actor computed them.
"""

from __future__ import annotations

from collections.abc import Callable

import numpy as np
import torch
from torch import nn
from torch.nn import functional as F

from simulator.protocol import (
    CLASS_FEATURE_STATISTICS,
    CLASS_FEATURES,
    CLASSES,
    COUNTS,
    COVARIANCES,
    FEATURES,
    LABELS,
    LAYER_INPUT_ENERGIES,
    LAYER_INPUT_SKETCHES,
    MEANS,
    NUM_SAMPLES,
    Query,
)
from simulator.registry import Registry


def layer_input_sketches(model: nn.Module, query: Query) -> dict[str, np.ndarray]:
    """FOT's client side, first step: for each linear and conv layer, a random sketch of the inputs it sees
    outside the server's basis for it, and their energy.

    With ``R`` the layer's inputs on the client's data (features x samples; a
    conv layer's unfolded patches) and ``U`` the server's basis for the layer
    (``query.arrays``; none: empty), the answer is ``(R - U U^T R) @ G`` for a
    private random ``G`` (samples x (features - width of U), uniform in [-1, 1]),
    in float32: summed over clients it is a sketch of all clients' residual
    inputs side by side, which is all the server needs (Bakman et al. 2024; the
    sum is what secure aggregation would reveal). Its width is the dimension of
    the space outside ``U``, the most directions the server can still add,
    whatever the client's size (the sum needs one shape from every client).
    With it: ``R``'s energy (squared Frobenius norm, ``<name>/energy``) and the
    part of it outside ``U`` (``<name>/residual_energy``), which the server sums
    too, in float64, and the sample count.
    """
    inputs = _layer_inputs(model, query.x)
    answer: dict[str, np.ndarray] = {NUM_SAMPLES: np.array(len(query.x), dtype=np.int64)}
    for name, matrix in inputs.items():  # matrix: features x samples
        residual = _outside(matrix, query.arrays.get(name))
        width = matrix.shape[0] - (0 if name not in query.arrays else query.arrays[name].shape[1])
        mix = torch.rand(matrix.shape[1], width, generator=query.generator, dtype=torch.float64) * 2 - 1
        answer[name] = (residual @ mix).to(torch.float32).numpy()
        answer[f"{name}/energy"] = np.array(float(matrix.square().sum()))
        answer[f"{name}/residual_energy"] = np.array(float(residual.square().sum()))
    return answer


def layer_input_energies(model: nn.Module, query: Query) -> dict[str, np.ndarray]:
    """FOT's client side, second step: the exact energy of each asked layer's inputs in the server's
    candidate directions.

    ``query.arrays``: per layer, orthonormal directions ``C`` (features x k) in its
    input space. With ``R`` the layer's inputs on the client's data, the answer is,
    per layer, their Gram matrix ``C^T R R^T C`` (k x k, float64; its diagonal: the
    energy along each direction), additive over clients; and the sample count.
    """
    inputs = _layer_inputs(model, query.x)
    answer: dict[str, np.ndarray] = {NUM_SAMPLES: np.array(len(query.x), dtype=np.int64)}
    for name, directions in query.arrays.items():
        if name not in inputs:
            raise KeyError(f"{name!r}: no linear or conv layer of the model has this weight")
        along = torch.from_numpy(np.asarray(directions, dtype=np.float64)).T @ inputs[name]  # k x samples
        answer[name] = (along @ along.T).numpy()
    return answer


def class_feature_statistics(model: nn.Module, query: Query) -> dict[str, np.ndarray]:
    """CCVR's client side: per class of the client's data, the count, mean and unbiased covariance of its features.

    Luo et al. 2021: the features are the encoder's (the head's inputs) under
    the global model; classes the client does not hold have count 0.
    """
    model.eval()
    with torch.no_grad():
        features = model.features(query.x).double().cpu()
    labels = query.y.cpu()
    classes = torch.unique(labels)
    if len(classes) == 0:  # a present client with no data of the task: no class to describe
        dim = features.shape[1]
        return {
            CLASSES: classes.numpy(),
            COUNTS: np.zeros(0, np.int64),
            MEANS: np.zeros((0, dim)),
            COVARIANCES: np.zeros((0, dim, dim)),
            NUM_SAMPLES: np.array(0, dtype=np.int64),
        }
    counts = torch.stack([(labels == c).sum() for c in classes])
    means = torch.stack([features[labels == c].mean(dim=0) for c in classes])
    covariances = torch.stack([_unbiased_covariance(features[labels == c]) for c in classes])
    return {
        CLASSES: classes.numpy(),
        COUNTS: counts.numpy(),
        MEANS: means.numpy(),
        COVARIANCES: covariances.numpy(),
        NUM_SAMPLES: np.array(len(labels), dtype=np.int64),
    }


def class_features(model: nn.Module, query: Query) -> dict[str, np.ndarray]:
    """FeTrIL's client side: the encoder's features (the head's inputs, under the global model) of the client's
    samples, float32, and their labels.

    Petit et al. 2023 train the head on the new classes' real features and on old classes' pseudo-features
    translated from them; a capped query (``ask_clients(max_samples=N)``) answers on a seeded subset.
    """
    model.eval()
    with torch.no_grad():
        features = model.features(query.x).float().cpu()
    return {
        FEATURES: features.numpy(),
        LABELS: query.y.cpu().numpy().astype(np.int64),
        NUM_SAMPLES: np.array(len(query.y), dtype=np.int64),
    }


QueryHandler = Callable[[nn.Module, Query], dict[str, np.ndarray]]
QUERIES: Registry[QueryHandler] = Registry(
    "query",
    "query",
    {
        LAYER_INPUT_SKETCHES: layer_input_sketches,
        LAYER_INPUT_ENERGIES: layer_input_energies,
        CLASS_FEATURE_STATISTICS: class_feature_statistics,
        CLASS_FEATURES: class_features,
    },
    "a function (model, query) -> dict[str, np.ndarray]",
)


def projected_layers(model: nn.Module) -> dict[str, nn.Module]:
    """The layers whose inputs a subspace method tracks, by their weight's state_dict name."""
    return {f"{name}.weight": m for name, m in model.named_modules() if isinstance(m, (nn.Linear, nn.Conv2d))}


def _layer_inputs(model: nn.Module, x: torch.Tensor) -> dict[str, torch.Tensor]:
    """Each linear or conv layer's inputs on ``x`` as a features x samples matrix (conv: unfolded patches)."""
    captured: dict[str, torch.Tensor] = {}
    handles = []
    for name, layer in projected_layers(model).items():

        def keep(module: nn.Module, args: tuple[torch.Tensor, ...], _: torch.Tensor, name: str = name) -> None:
            (inputs,) = args
            if isinstance(module, nn.Conv2d):
                patches = F.unfold(inputs, module.kernel_size, module.dilation, module.padding, module.stride)
                captured[name] = patches.transpose(0, 1).reshape(patches.shape[1], -1)
            else:
                captured[name] = inputs.reshape(len(inputs), -1).T

        handles.append(layer.register_forward_hook(keep))
    model.eval()
    try:
        with torch.no_grad():
            model(x)
    finally:
        for handle in handles:
            handle.remove()
    return {name: matrix.double().cpu() for name, matrix in captured.items()}


def _outside(matrix: torch.Tensor, basis: np.ndarray | None) -> torch.Tensor:
    """``R - U U^T R``: the part of the inputs ``R`` outside the basis ``U`` (all of them without one)."""
    if basis is None:
        return matrix
    u = torch.from_numpy(np.asarray(basis, dtype=np.float64))
    return matrix - u @ (u.T @ matrix)


def _unbiased_covariance(features: torch.Tensor) -> torch.Tensor:
    if len(features) < 2:
        return torch.zeros(features.shape[1], features.shape[1], dtype=features.dtype)
    centred = features - features.mean(dim=0)
    return centred.T @ centred / (len(features) - 1)
