"""FedProx's Synthetic(alpha, beta) data: one group of samples per client.

Li et al., "Federated Optimization in Heterogeneous Networks" (MLSys 2020),
after Shamir et al. (2014). Group k has its own softmax model and its own
input mean. As in the paper's generator, ``alpha`` and ``beta`` are the
standard deviations of the group-level draws:

    u_k ~ N(0, alpha^2),  B_k ~ N(0, beta^2)
    W_k[c, j], b_k[c] ~ N(u_k, 1),  v_k[j] ~ N(B_k, 1)
    x ~ N(v_k, diag(j^-1.2)),  y = argmax(W_k x + b_k)   (the softmax's argmax)

``beta`` moves the groups' inputs apart. ``alpha`` changes no sample: u_k
shifts every class's logit by the same amount, which cancels in the argmax
(true of the paper's generator too). The groups' models still differ, through
their own N(0, 1) draws.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

import numpy as np

from simulator.config import DataConfig
from simulator.data.dataset import Dataset, DatasetSource


@dataclass(frozen=True)
class SyntheticSettings:
    """``data.synthetic.*``: FedProx's Synthetic(alpha, beta), one group per client."""

    alpha: float = 1.0  # how much the clients' models differ
    beta: float = 1.0  # how much the clients' inputs differ
    dim: int = 60
    num_classes: int = 10
    mean_samples: int = 100  # mean samples per client (lognormal sizes)

    def problems(self) -> list[tuple[str, str]]:
        checks = [
            ("alpha", self.alpha >= 0, "must be >= 0"),
            ("beta", self.beta >= 0, "must be >= 0"),
            ("dim", self.dim >= 1, "must be >= 1"),
            ("num_classes", self.num_classes >= 2, "must be >= 2"),
            ("mean_samples", self.mean_samples >= 2, "must be >= 2"),
        ]
        return [(key, reason) for key, ok, reason in checks if not ok]


SIZE_SIGMA = 1.0  # log-scale spread of the group sizes
MIN_SAMPLES = 5  # every group gets at least this many samples, so at least one to train on


def group_sizes(num_groups: int, mean_samples: int, rng: np.random.Generator) -> np.ndarray:
    """Lognormal sample counts with mean ``mean_samples``, at least ``MIN_SAMPLES`` each."""
    mu = np.log(mean_samples) - SIZE_SIGMA**2 / 2  # E[lognormal(mu, sigma)] = exp(mu + sigma^2 / 2)
    sizes = np.round(rng.lognormal(mu, SIZE_SIGMA, num_groups)).astype(np.int64)
    return np.maximum(sizes, MIN_SAMPLES)


def make_synthetic(
    settings: SyntheticSettings, num_clients: int, test_fraction: float, rng: np.random.Generator
) -> Dataset:
    """Synthetic(settings.alpha, settings.beta) with ``num_clients`` groups.

    ``round(test_fraction * size)`` samples of each group (never all of them)
    go to the global test set; ``groups_train`` records each training sample's
    group, for the ``natural`` partition.
    """
    k, c, d = num_clients, settings.num_classes, settings.dim
    u = rng.normal(0.0, settings.alpha, k)
    b_mean = rng.normal(0.0, settings.beta, k)
    # float32 throughout, like the inputs: mixing in float64 would upcast every product. The weights are
    # drawn in float32 too: at 100,000 clients, 60 million float64 draws took most of the load's 30 s.
    weights = rng.standard_normal((k, c, d), dtype=np.float32)
    weights += u[:, None, None].astype(np.float32)
    biases = (u[:, None] + rng.standard_normal((k, c))).astype(np.float32)
    means = (b_mean[:, None] + rng.standard_normal((k, d))).astype(np.float32)
    input_sd = np.arange(1, d + 1, dtype=np.float32) ** -0.6  # sqrt of Sigma's diagonal j^-1.2

    sizes = group_sizes(k, settings.mean_samples, rng)
    groups = np.repeat(np.arange(k), sizes)
    x = rng.standard_normal((len(groups), d), dtype=np.float32)  # the bulk of the time
    x *= input_sd
    x += means[groups]

    # A loop over groups: gathering each sample's W_k instead would take N x C x D memory.
    starts = np.cumsum(sizes) - sizes
    y = np.empty(len(groups), dtype=np.int64)
    for g, (start, stop) in enumerate(zip(starts.tolist(), (starts + sizes).tolist())):
        y[start:stop] = np.argmax(x[start:stop] @ weights[g].T + biases[g], axis=1)

    # Samples within a group are i.i.d., so its first ones are as good a test sample as any.
    num_test = np.minimum(np.round(sizes * test_fraction).astype(np.int64), sizes - 1)
    is_test = np.arange(len(groups)) - starts[groups] < num_test[groups]
    return Dataset(
        name="synthetic",
        x_train=x[~is_test],
        y_train=y[~is_test],
        x_test=x[is_test],
        y_test=y[is_test],
        num_classes=c,
        groups_train=groups[~is_test],
    )


class Synthetic(DatasetSource):
    """Generated: one group of samples per client (``data.synthetic.*``)."""

    Settings = SyntheticSettings
    section = "synthetic"

    @classmethod
    def load(cls, data: DataConfig, settings: Any, num_clients: int, generator: np.random.Generator) -> Dataset:
        return make_synthetic(settings, num_clients, data.test_fraction, generator)
