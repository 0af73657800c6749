"""FedStream on a benchmark workload: ``python benchmarks/run_fedstream.py WORKLOAD ray|local``.

The whole product path: config, engine, Grid, backend, run directory (metrics,
TensorBoard, plot), with the workload's fixed cohorts (``FixedCohortFedAvg``).
"""

from __future__ import annotations

import sys
import tempfile
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from benchmarks.cohort_strategy import FinalGlobalWeights, FixedCohortFedAvg
from benchmarks.workloads import WORKLOADS, report, save_weights
from simulator.config import compose_config
from simulator.engine import Experiment
from simulator.plugins import load_config


def main(name: str, backend: str) -> None:
    workload = WORKLOADS[name]
    engine = [f"engine.backend={backend}", "engine.num_actors=2", "engine.num_cpus_per_actor=1"]
    final = f"eval.hooks=[{FinalGlobalWeights.__module__}.{FinalGlobalWeights.__name__}]"
    config = load_config(compose_config([*workload.overrides(), *engine, final]))
    strategy = FixedCohortFedAvg(workload.name, epochs=workload.epochs, fraction_evaluate=0.0)
    with tempfile.TemporaryDirectory() as run_dir:
        summary = Experiment(config, strategy, Path(run_dir)).run()
    save_weights(FinalGlobalWeights.arrays)
    report(strategy.clock, summary["final_accuracy"], strategy.samples)


if __name__ == "__main__":
    main(sys.argv[1], sys.argv[2])
