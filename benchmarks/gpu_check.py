"""Actors sharing one GPU: ``python benchmarks/gpu_check.py [--cpu] [--rounds N]``.

Runs FedStream on the CNN workload (A: 5,000 MNIST images, 100 clients, 10 a
round) with 1, 2 and 4 Ray actors sharing one GPU (``engine.num_gpus_per_actor
= 1/n``), and prints, per actor: its device, the memory cap it set on the card
(its share), the most GPU memory it held, and the samples it trained per second
of work. With ``--cpu`` the same runs go without a GPU (the path this check is
tested on where no GPU is lent). The last line is the table as JSON.
"""

from __future__ import annotations

import argparse
import json
import sys
import tempfile
from dataclasses import replace
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

from benchmarks.cohort_strategy import FixedCohortFedAvg
from benchmarks.workloads import WORKLOADS
from simulator import backends
from simulator.config import compose_config
from simulator.engine import Experiment
from simulator.plugins import load_config

ACTORS = (1, 2, 4)


def check(actors: int, gpu: bool, rounds: int) -> list[dict]:
    """One run with ``actors`` actors (sharing one GPU if ``gpu``); each actor's stats after it."""
    import ray

    workload = replace(WORKLOADS["A"], rounds=rounds)
    engine = [
        f"engine.num_actors={actors}",
        "engine.num_cpus_per_actor=1",
        f"engine.num_gpus_per_actor={1 / actors if gpu else 0}",
        "engine.backend=ray",
    ]
    config = load_config(compose_config([*workload.overrides(), *engine]))
    strategy = FixedCohortFedAvg(workload.name, epochs=workload.epochs, fraction_evaluate=0.0)
    try:
        with tempfile.TemporaryDirectory() as run_dir:
            summary = Experiment(config, strategy, Path(run_dir), keep_warm=True).run()
        stats = ray.get([actor.stats.remote() for actor in backends._WARM.pool.actors])
    finally:
        backends._WARM.release()
    return [{"actors": actors, "actor": i, **s, "accuracy": summary["final_accuracy"]} for i, s in enumerate(stats)]


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--cpu", action="store_true", help="no GPU: the same runs on the CPU")
    parser.add_argument("--rounds", type=int, default=WORKLOADS["A"].rounds, help="rounds per run")
    args = parser.parse_args(argv)
    rows = [row for actors in ACTORS for row in check(actors, not args.cpu, args.rounds)]
    print(f"{'actors':>6} {'actor':>5} {'device':>8} {'cap':>6} {'peak GPU MB':>11} {'samples/s':>10} {'accuracy':>8}")
    for r in rows:
        cap = "-" if r["gpu_memory_cap"] is None else f"{r['gpu_memory_cap']:.3f}"
        print(
            f"{r['actors']:>6} {r['actor']:>5} {r['device']:>8} {cap:>6} {r['peak_gpu_mb']:>11.1f} "
            f"{r['samples_per_s']:>10.1f} {r['accuracy']:>8.3f}"
        )
    print(json.dumps(rows))


if __name__ == "__main__":
    main()
