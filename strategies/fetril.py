"""FeTrIL: Petit et al. 2023, "FeTrIL: Feature Translation for Exemplar-Free Class-Incremental Learning" (WACV).

The encoder trains on the first task only and is then frozen; at every later
task, old classes, whose data is gone, are represented by pseudo-features: the
real features of a new class translated to the old class's mean,
``f_old = f_new - mu_new + mu_old``, the new class being the one whose mean is
nearest the old class's (Euclidean, as the authors' ``compute_distances.py``
picks it; FeTrIL^1 in the paper's ablation), and a linear classifier is trained
on the new classes' real features and the old classes' pseudo-features together.
Federated here as a FedAvg whose encoder ``strategies/class_statistics.py``
freezes at the first task's end; at each task end it asks the present clients
for per-class feature statistics (``class_feature_statistics``: the exact class
means, pooled as CCVR pools them; old classes keep theirs, valid under the frozen
encoder) and for their features themselves (``class_features``, at most
``query_samples`` a client), and rebuilds the linear head on them.

The paper trains a linear SVM (one-vs-rest, C = 1, on L2-normalised features).
The head here is the model's own linear layer applied to raw features, so it is
a multinomial logistic regression instead, trained on standardised features
(an affine map, folded exactly back into the head's weights) with an L2 penalty
``weight_decay / 2 |W|^2``, full-batch by L-BFGS for at most ``iterations``
steps from zero: the problem is convex, so the head depends on the features,
not on a learning rate, an epoch count or a sample order, and needs no random
draws (nor torch: the module is numpy only). ``weight_decay`` 0.01 is the best
of 1e-4, 1e-3 and 1e-2 on seed 7 of digits_class_incremental (final accuracy
0.532, 0.585, 0.602) and the better of 1e-4 and 1e-2 on seed 7 of
fashion_class_incremental (0.488, 0.510); the reported seeds are 0-2. The
paper's SVM (C = 1, summed hinge loss) amounts to about 1 / N on a mean loss
over N features, 1e-5 to 1e-3 at these sizes.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

import numpy as np
from flwr.app import ArrayRecord
from flwr.serverapp import Grid

from simulator.config import ConfigError
from simulator.protocol import CLASS_FEATURE_STATISTICS, CLASS_FEATURES, FEATURES, LABELS
from strategies.class_statistics import FrozenEncoderHead, merged, pooled_statistics
from strategies.queries import ask_clients


class FeTrIL(FrozenEncoderHead):
    """FedAvg on the first task, then a frozen encoder under a linear head trained at every task end on the new
    classes' features and the old classes' translated pseudo-features."""

    name = "fetril"
    keeps_covariances = False  # the translation needs each class's mean only

    def __init__(
        self,
        *args: Any,
        query_samples: int | None = None,
        weight_decay: float = 1e-2,
        iterations: int = 100,
        **kwargs: Any,
    ) -> None:
        super().__init__(*args, **kwargs)
        if query_samples is not None and (
            isinstance(query_samples, bool) or not isinstance(query_samples, int) or query_samples < 1
        ):
            raise ConfigError(f"strategy.query_samples = {query_samples!r}: expected an integer >= 1, or null for all")
        if isinstance(weight_decay, bool) or not isinstance(weight_decay, (int, float)) or not weight_decay >= 0:
            raise ConfigError(f"strategy.weight_decay = {weight_decay!r}: expected a number >= 0")
        if isinstance(iterations, bool) or not isinstance(iterations, int) or iterations < 1:
            raise ConfigError(f"strategy.iterations = {iterations!r}: expected an integer >= 1")
        self.query_samples = query_samples
        self.weight_decay = float(weight_decay)
        self.iterations = iterations

    def rebuilt_rows(self, arrays: ArrayRecord, grid: Grid) -> tuple[dict[int, tuple[np.ndarray, float]], float]:
        measured = {
            c: (n, mean, None)
            for c, (n, mean, _) in pooled_statistics(ask_clients(grid, arrays, CLASS_FEATURE_STATISTICS)).items()
        }
        self.class_statistics = merged(self.class_statistics, measured)
        answers = ask_clients(grid, arrays, CLASS_FEATURES, max_samples=self.query_samples)
        features = np.concatenate([answer[FEATURES] for answer in answers]).astype(np.float64)
        labels = np.concatenate([answer[LABELS] for answer in answers])
        if not len(labels):
            raise ValueError("no client holds a sample of the task that ended: no features to train the head on")
        unsampled = sorted(set(measured) - set(labels.tolist()))
        if unsampled:  # a capped query's subset left them out: neither they nor the old classes they lend to train
            raise ValueError(
                f"strategy.query_samples = {self.query_samples}: the clients' features hold no sample of the new "
                f"classes {unsampled}, whose head could not be trained; raise it, or null for all"
            )
        x, y = translated_features(
            features,
            labels,
            {c: mean for c, (_, mean, _) in measured.items()},
            {c: mean for c, (_, mean, _) in self.class_statistics.items()},
        )
        return softmax_rows(x, y, self.weight_decay, self.iterations), float(np.linalg.norm(x, axis=1).max())


def translated_features(
    features: np.ndarray, labels: np.ndarray, new_means: dict[int, np.ndarray], means: dict[int, np.ndarray]
) -> tuple[np.ndarray, np.ndarray]:
    """The real features of the new classes (``new_means``: theirs, measured on all their data), then for each
    other class of ``means`` in ascending order pseudo-features: the features of the new class whose mean is
    nearest its own, translated by the difference of the means."""
    new = sorted(new_means)
    xs, ys = [features], [labels]
    for label in sorted(set(means) - set(new)):
        source = new[int(np.argmin([np.linalg.norm(means[label] - new_means[n]) for n in new]))]
        xs.append(features[labels == source] - new_means[source] + means[label])
        ys.append(np.full(int((labels == source).sum()), label))
    return np.concatenate(xs), np.concatenate(ys)


def softmax_rows(
    x: np.ndarray, y: np.ndarray, weight_decay: float, iterations: int
) -> dict[int, tuple[np.ndarray, float]]:
    """Per class of ``y``, the (weight, bias) of a multinomial logistic regression on ``x``, trained on the
    standardised features by full-batch L-BFGS from zero (L2 penalty ``weight_decay / 2 |W|^2`` on the weights),
    the standardisation folded back into the weights."""
    classes = np.unique(y)
    center, scale = x.mean(axis=0), x.std(axis=0)
    scale[scale <= 1e-12 * max(scale.max(), 1e-300)] = 1.0  # a constant feature: any weight does
    z = np.hstack([(x - center) / scale, np.ones((len(x), 1))])  # the last column: the bias's input
    onehot = np.eye(len(classes))[np.searchsorted(classes, y)]
    penalised = np.ones(z.shape[1])
    penalised[-1] = 0.0

    def loss_and_gradient(params: np.ndarray) -> tuple[float, np.ndarray]:
        logits = z @ params.T  # samples x classes
        logits -= logits.max(axis=1, keepdims=True)
        log_p = logits - np.log(np.exp(logits).sum(axis=1, keepdims=True))
        decay = 0.5 * weight_decay * float(np.sum(params**2 * penalised))
        gradient = (np.exp(log_p) - onehot).T @ z / len(z) + weight_decay * params * penalised
        return -float(np.sum(onehot * log_p)) / len(z) + decay, gradient

    params = lbfgs(loss_and_gradient, np.zeros((len(classes), z.shape[1])), iterations)
    weight = params[:, :-1] / scale
    bias = params[:, -1] - weight @ center
    return {int(c): (weight[i], float(bias[i])) for i, c in enumerate(classes)}


def lbfgs(
    loss_and_gradient: Callable[[np.ndarray], tuple[float, np.ndarray]],
    start: np.ndarray,
    iterations: int,
    history: int = 10,
    tolerance: float = 1e-9,
) -> np.ndarray:
    """The minimiser of a smooth convex function from ``start`` by L-BFGS (Nocedal & Wright 2006, Alg. 7.4/7.5)
    with a backtracking Armijo line search, at most ``iterations`` steps. Written out in numpy: building a
    ``torch.optim`` optimizer imports torch._dynamo, seconds on the driver for a millisecond problem."""
    params, (loss, gradient) = start, loss_and_gradient(start)
    steps: list[tuple[np.ndarray, np.ndarray, float]] = []  # (s, y, 1 / y.s), newest last
    for _ in range(iterations):
        if np.abs(gradient).max() <= tolerance:
            break
        direction = -gradient
        alphas = []
        for s, g, rho in reversed(steps):
            alpha = rho * np.sum(s * direction)
            direction = direction - alpha * g
            alphas.append(alpha)
        if steps:
            s, g, _ = steps[-1]
            direction = direction * (np.sum(s * g) / np.sum(g * g))
        for (s, g, rho), alpha in zip(steps, reversed(alphas)):
            direction = direction + (alpha - rho * np.sum(g * direction)) * s
        slope = np.sum(gradient * direction)
        if slope >= 0:  # not a descent direction (rounding): start the history afresh
            steps, direction, slope = [], -gradient, -np.sum(gradient * gradient)
        step = 1.0 if steps else min(1.0, 1.0 / np.abs(gradient).sum())
        while True:
            candidate = params + step * direction
            new_loss, new_gradient = loss_and_gradient(candidate)
            if new_loss <= loss + 1e-4 * step * slope or step < 1e-20:
                break
            step *= 0.5
        s, g = candidate - params, new_gradient - gradient
        if np.sum(s * g) > 1e-12:
            steps = [*steps[-(history - 1) :], (s, g, 1.0 / np.sum(s * g))]
        params, loss, gradient = candidate, new_loss, new_gradient
        if step < 1e-20:
            break
    return params
