"""Representation diagnostics at every task end: how collapsed the global encoder's features are,
and how far they have moved since each earlier task end.

- Neural collapse (Papyan, Han & Donoho 2020, PNAS, "Prevalence of neural collapse during the
  terminal phase of deep learning training"), on the features of the probe sample
  (:func:`simulator.probes.probe_sample`: the seen tasks' training data, the seeded sample the
  probes fit on that round, encoded once for both by :func:`simulator.probes.encoded_probe_sample`).
  With C classes, class means mu_c and their centre mu_G, every class weighted equally (Papyan
  et al.'s data sets are balanced, where this is their definition), so that the stream's class
  proportions do not tilt them:

  - ``nc1`` = tr(Sigma_W Sigma_B^+) / C, Sigma_W the mean of the classes' covariances, Sigma_B the
    mean of (mu_c - mu_G)(mu_c - mu_G)^T: the spread within classes along the directions that
    separate them; 0 at collapse;
  - ``nc2_equinorm``: std / mean of the norms ||mu_c - mu_G||; 0 where they are equal;
  - ``nc2_equiangular``: std over the pairs c < c' of the cosine between mu_c - mu_G and
    mu_c' - mu_G; 0 where the angles are equal;
  - ``nc2_max_angle``: mean over those pairs of |cos + 1/(C-1)|; 0 at a simplex equiangular tight
    frame, the angles as wide as C vectors allow.

  Null with fewer than two classes (and, like any value a record cannot hold, where features are
  degenerate: all class means at their centre). With two, NC2 is 0 whatever the features: two
  means centred on their midpoint are opposite and equally long.
- Linear CKA (Kornblith, Norouzi, Lee & Hinton 2019, ICML, "Similarity of Neural Network
  Representations Revisited") between the encoder's features at this task end and at every
  earlier one, on one fixed sample of the test data (every task's, at most about
  ``eval.cka_samples``, stratified by label and drawn once per run), so that every task end
  encodes the same inputs. 1 for features equal up to a rotation, a scale and a shift; lower the
  more the representation moved. The task-end record has ``cka_per_task`` (null for later tasks);
  at the end ``cka_matrix.csv`` (symmetric, ones on the diagonal) and, with two task ends or more,
  ``plots/cka.png``.

An encoder is gone by the next task end, so each task end's features of the fixed sample are
kept: in memory and in ``cka_features/task-NNNN.npz`` (float32, the model's own precision, beside
the sample's indices), written before that round's checkpoint. A resumed run reads back those of
the task ends its checkpoint recorded, and so computes every later CKA from the numbers an
uninterrupted run holds: the same ``cka_matrix.csv``, byte for byte.
"""

from __future__ import annotations

import math
from pathlib import Path
from typing import Any

import numpy as np

from simulator.config import ConfigError
from simulator.disk_writes import naming
from simulator.hooks import Hook, RoundView, RunSetup
from simulator.plain_npz import UnreadableArchive, read_npz, write_npz
from simulator.probes import encode, encoded_probe_sample, stratified_sample
from simulator.seeding import Purpose, rng
from simulator.streams import Stream

NEURAL_COLLAPSE = ("nc1", "nc2_equinorm", "nc2_equiangular", "nc2_max_angle")  # metrics.jsonl and summary.json
CKA_KEY = "cka_per_task"  # metrics.jsonl: the CKA with the features at the end of each task so far
FEATURES_DIR = "cka_features"  # in the run directory: the fixed sample's features at each task end


def neural_collapse(features: np.ndarray, labels: np.ndarray) -> dict[str, float]:
    """NC1 and NC2 of ``features`` (one row per sample) by class ``labels``, as the module says."""
    classes, class_of = np.unique(labels, return_inverse=True)
    if len(classes) < 2:
        return dict.fromkeys(NEURAL_COLLAPSE, math.nan)
    x = features.astype(np.float64)
    means = np.stack([x[class_of == c].mean(axis=0) for c in range(len(classes))])
    centred = means - means.mean(axis=0)
    # Sigma_B = centred^T centred / C = V diag(s^2 / C) V^T: its pseudo-inverse lives in the (at most C - 1)
    # directions V spans, so tr(Sigma_W Sigma_B^+) / C = sum over them of v^T Sigma_W v / s^2; no d x d matrix.
    _, s, vt = np.linalg.svd(centred, full_matrices=False)
    spans = s > s[0] * max(centred.shape) * np.finfo(np.float64).eps
    within = (x - means[class_of]) @ vt[spans].T  # each sample about its class mean, along those directions
    variances = np.mean([(within[class_of == c] ** 2).mean(axis=0) for c in range(len(classes))], axis=0)
    norms = np.linalg.norm(centred, axis=1)
    with np.errstate(invalid="ignore", divide="ignore"):
        unit = centred / norms[:, None]
        cosines = (unit @ unit.T)[np.triu_indices(len(classes), k=1)]
        return {
            "nc1": float(np.sum(variances / s[spans] ** 2)) if spans.any() else math.nan,
            "nc2_equinorm": float(norms.std() / norms.mean()),
            "nc2_equiangular": float(cosines.std()),
            "nc2_max_angle": float(np.abs(cosines + 1 / (len(classes) - 1)).mean()),
        }


def linear_cka(x: np.ndarray, y: np.ndarray) -> float:
    """Linear CKA of two representations of the same samples (rows): with columns centred,
    ||y^T x||_F^2 / (||x^T x||_F ||y^T y||_F), the feature-space form of Kornblith et al.'s
    HSIC(K, L) / sqrt(HSIC(K, K) HSIC(L, L)) for the linear kernels K = x x^T, L = y y^T."""
    x, y = x.astype(np.float64), y.astype(np.float64)
    x, y = x - x.mean(axis=0), y - y.mean(axis=0)
    with np.errstate(invalid="ignore", divide="ignore"):
        return float(np.linalg.norm(y.T @ x) ** 2 / (np.linalg.norm(x.T @ x) * np.linalg.norm(y.T @ y)))


def cka_sample(stream: Stream, seed: int, size: int) -> np.ndarray:
    """Indices into ``x_test`` that CKA compares every task end on: every task's test data, or a seeded
    stratified sample of about ``size`` of it."""
    indices = np.unique(np.concatenate([stream.task_test_indices(t) for t in range(stream.num_tasks)]))
    return stratified_sample(indices, stream.y_test[indices], size, rng(seed, Purpose.CKA_SAMPLE))


class Diagnostics(Hook):
    """Neural collapse and CKA at every task end. At the end ``cka_matrix.csv``, ``plots/cka.png`` (two task
    ends or more), and in the summary the last task end's neural collapse, ``cka_first_last`` (the first task
    end's features against the last's) and ``cka_consecutive_mean`` (each task end's against the one before,
    averaged; both null with one task end)."""

    def __init__(self, setup: RunSetup) -> None:
        """Draws the fixed sample; a resumed run reads back the features of the task ends it has recorded."""
        super().__init__(setup)
        self.sample = cka_sample(setup.stream, setup.config.seed, setup.config.eval.cka_samples)
        self.folder = setup.outputs.path / FEATURES_DIR
        ended = sorted({record["task"] for record in setup.outputs.records if CKA_KEY in record})
        self.features = {task: self._read(task) for task in ended}
        self.cka = np.zeros((0, 0))

    def at_task_end(self, view: RoundView) -> dict[str, Any]:
        stream, probed = self.setup.stream, encoded_probe_sample(view)
        record: dict[str, Any] = neural_collapse(probed.features, stream.y_train[probed.indices])
        now = encode(view.global_model(), stream.x_test[self.sample], self.setup.config.eval.batch_size)
        now = now.astype(np.float32)  # the model's own precision: what is kept is what is used
        self._write(view.task, now)
        self.features[view.task] = now
        record[CKA_KEY] = [
            linear_cka(now, self.features[task]) if task <= view.task else None for task in range(stream.num_tasks)
        ]
        return record

    def at_end(self, view: RoundView) -> dict[str, Any]:
        outputs = self.setup.outputs
        rows = outputs.task_end_matrix(CKA_KEY)  # row i: task i's end against tasks j <= i, NaN after
        lower = rows[:, : len(rows)]
        self.cka = np.tril(lower) + np.tril(lower, -1).T
        outputs.write_matrix(self.cka, "cka_matrix.csv")
        several = len(self.cka) > 1
        return {
            **{key: outputs.records[-1][key] for key in NEURAL_COLLAPSE},
            "cka_first_last": float(self.cka[-1, 0]) if several else None,
            "cka_consecutive_mean": float(np.diag(self.cka, -1).mean()) if several else None,
        }

    def finished(self, view: RoundView) -> None:
        """``plots/cka.png``, where there are task ends to compare (a figure costs most of a second)."""
        if len(self.cka) < 2:
            return
        from simulator.plot import plot_cka  # matplotlib loads only where a run finishes

        title = f"{self.setup.config.scenario} / {type(view.strategy).__name__}\nthe global encoder's features"
        plot_cka(self.cka, self.setup.outputs.path / "plots" / "cka.png", title)

    def _path(self, task: int) -> Path:
        return self.folder / f"task-{task:04d}.npz"

    def _write(self, task: int, features: np.ndarray) -> None:
        """Keep the features of the end of ``task``; a crash while writing loses nothing that a checkpoint
        recorded, as the round's checkpoint comes after."""
        with naming(self.folder):
            self.folder.mkdir(exist_ok=True)
        with naming(self._path(task)):
            write_npz(self._path(task), {"indices": self.sample, "features": features})

    def _read(self, task: int) -> np.ndarray:
        """The features kept at the end of ``task``, checked to be of this run's sample."""
        path = self._path(task)
        try:
            kept = read_npz(path)
        except UnreadableArchive as error:
            raise ConfigError(
                f"resume = true: {path}: {error}; the CKA of later task ends needs the features of task {task}'s end"
            ) from None
        features = kept.get("features")
        if (
            not np.array_equal(kept.get("indices"), self.sample)
            or features is None
            or features.dtype != np.float32
            or features.ndim != 2
            or len(features) != len(self.sample)
        ):
            raise ConfigError(
                f"resume = true: {path} does not hold float32 features of this run's {len(self.sample)} CKA samples"
            )
        return features
