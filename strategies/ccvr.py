"""CCVR: Luo et al. 2021, "No Fear of Heterogeneity: Classifier Calibration for Federated Learning
with Non-IID Data" (NeurIPS).

After federated training, the classifier is what label skew biases most; CCVR
recalibrates it on virtual features. Here it runs at every task end (for a
static stream: once, after the last round), as a FedAvg whose ``on_task_end``
returns the calibrated global arrays, which clients then train from:

1. each present client sends, per class it holds, the count, mean and unbiased
   covariance of the global encoder's features on its data of the task
   (``clients/queries.py``);
2. the server pools them into each class's global mean and covariance (the
   exact pooled formula of the paper's Eq. 3-4); in a continual stream it
   keeps the statistics of earlier tasks' classes as they were last measured;
3. it draws ``virtual_per_class`` features per class from those Gaussians
   (seeded: the engine seeds the strategy's random state per round) and
   retrains the linear head (``head.weight``, ``head.bias``) on them by
   minibatch SGD from its current weights, the encoder untouched.

The paper does not fix the retraining optimiser; ``calibration_*`` defaults are
ours (public implementations use SGD with lr 0.001-0.1, 1-10 epochs).
"""

from __future__ import annotations

from typing import Any

import numpy as np
import torch
from flwr.app import ArrayRecord
from flwr.serverapp import Grid
from flwr.serverapp.strategy import FedAvg
from torch.nn import functional as F

from simulator.config import ConfigError
from simulator.held_array import held_array_record
from simulator.protocol import CLASS_FEATURE_STATISTICS, HEAD_BIAS, HEAD_WEIGHT
from strategies.class_statistics import pooled_statistics
from strategies.queries import ask_clients
from strategies.state import expect_keys, float_array

_VIRTUAL_FEATURES_LIMIT = 2 * 2**30  # bytes of virtual features a task end may draw


class CCVR(FedAvg):
    """FedAvg with its linear head recalibrated on virtual features at every task end."""

    def __init__(
        self,
        *args: Any,
        virtual_per_class: int = 100,
        calibration_lr: float = 0.01,
        calibration_epochs: int = 10,
        calibration_batch_size: int = 64,
        **kwargs: Any,
    ) -> None:
        super().__init__(*args, **kwargs)
        for key, value in (
            ("virtual_per_class", virtual_per_class),
            ("calibration_epochs", calibration_epochs),
            ("calibration_batch_size", calibration_batch_size),
        ):
            if not isinstance(value, int) or isinstance(value, bool) or value < 1:
                raise ConfigError(f"strategy.{key} = {value!r}: expected an integer >= 1")
        if isinstance(calibration_lr, bool) or not isinstance(calibration_lr, (int, float)) or calibration_lr <= 0:
            raise ConfigError(f"strategy.calibration_lr = {calibration_lr!r}: expected a number > 0")
        self.virtual_per_class = virtual_per_class
        self.calibration_lr = calibration_lr
        self.calibration_epochs = calibration_epochs
        self.calibration_batch_size = calibration_batch_size
        self.class_statistics: dict[int, tuple[int, np.ndarray, np.ndarray]] = {}  # class -> (count, mean, cov)

    def check_arrays(self, arrays: ArrayRecord) -> None:
        """Refuse, before any work, global arrays without a linear head to recalibrate, or virtual features
        that could not fit in memory at the first task end."""
        if HEAD_WEIGHT not in arrays or HEAD_BIAS not in arrays:
            raise ConfigError(
                "strategy=ccvr recalibrates the global model's linear head (head.weight and "
                "head.bias), which the global arrays do not hold: use model.head=linear and a "
                "client method that shares the head"
            )
        classes, dim = arrays[HEAD_WEIGHT].shape
        needed = self.virtual_per_class * classes * dim * 8  # float64 features, all classes at once
        if needed > _VIRTUAL_FEATURES_LIMIT:
            raise ConfigError(
                f"strategy.virtual_per_class = {self.virtual_per_class}: {classes} classes x {dim} features would "
                f"take {needed / 2**30:.1f} GiB of virtual features at each task end (at most "
                f"{_VIRTUAL_FEATURES_LIMIT // 2**30} GiB); lower it"
            )

    def checkpoint_state(self) -> dict[str, Any]:
        """The class statistics measured so far (simulator.protocol.StatefulStrategy)."""
        labels = sorted(self.class_statistics)
        return {
            "classes": labels,
            "counts": [self.class_statistics[c][0] for c in labels],
            "means": [self.class_statistics[c][1] for c in labels],
            "covariances": [self.class_statistics[c][2] for c in labels],
        }

    def restore_state(self, state: dict[str, Any], arrays: ArrayRecord) -> None:
        expect_keys(state, {"classes", "counts", "means", "covariances"}, "CCVR's state")
        classes, dim = arrays[HEAD_WEIGHT].shape
        parts = [state[key] for key in ("classes", "counts", "means", "covariances")]
        if len({len(part) for part in parts}) != 1:
            raise ValueError("classes, counts, means and covariances differ in length")
        for label, count, mean, covariance in zip(*parts):
            if not (isinstance(label, int) and 0 <= label < classes and isinstance(count, int) and count >= 1):
                raise ValueError(f"class {label!r} with count {count!r}: expected a class < {classes} and a count >= 1")
            mean = float_array(mean, (dim,), f"the mean of class {label}")
            covariance = float_array(covariance, (dim, dim), f"the covariance of class {label}")
            self.class_statistics[label] = (count, mean, covariance)

    def on_task_end(self, task: int, arrays: ArrayRecord, grid: Grid) -> ArrayRecord:
        """The global arrays with the head retrained on virtual features of every class seen so far."""
        self.class_statistics.update(pooled_statistics(ask_clients(grid, arrays, CLASS_FEATURE_STATISTICS)))
        features, labels = self._virtual_features()
        weight, bias = self._calibrated(arrays[HEAD_WEIGHT].numpy(), arrays[HEAD_BIAS].numpy(), features, labels)
        updated = {k: v for k, v in zip(arrays.keys(), arrays.to_numpy_ndarrays())}
        updated[HEAD_WEIGHT], updated[HEAD_BIAS] = weight, bias
        return held_array_record(list(updated), list(updated.values()))

    def _virtual_features(self) -> tuple[np.ndarray, np.ndarray]:
        """``virtual_per_class`` draws from each class's Gaussian (np.random: seeded by the engine)."""
        features, labels = [], []
        for label, (_, mean, covariance) in sorted(self.class_statistics.items()):
            features.append(
                np.random.multivariate_normal(mean, covariance, self.virtual_per_class, check_valid="ignore")
            )
            labels.append(np.full(self.virtual_per_class, label))
        return np.concatenate(features), np.concatenate(labels)

    def _calibrated(
        self, weight: np.ndarray, bias: np.ndarray, features: np.ndarray, labels: np.ndarray
    ) -> tuple[np.ndarray, np.ndarray]:
        """The head retrained by minibatch SGD with cross-entropy on ``features`` (encoder frozen)."""
        w = torch.tensor(weight, requires_grad=True)
        b = torch.tensor(bias, requires_grad=True)
        x, y = torch.tensor(features, dtype=w.dtype), torch.from_numpy(labels)
        order = torch.from_numpy(
            np.concatenate([np.random.permutation(len(y)) for _ in range(self.calibration_epochs)])
        )
        for batch in order.split(self.calibration_batch_size):
            loss = F.cross_entropy(x[batch] @ w.T + b, y[batch])
            grad_w, grad_b = torch.autograd.grad(loss, (w, b))
            with torch.no_grad():
                w -= self.calibration_lr * grad_w
                b -= self.calibration_lr * grad_b
        return w.detach().numpy(), b.detach().numpy()
