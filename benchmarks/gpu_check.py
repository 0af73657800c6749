"""Actors sharing one GPU: ``python benchmarks/gpu_check.py [--cpu] [--workload cnn|r18] [--rounds N] ...``

``--workload cnn`` (the default) runs FedStream on the CNN workload (A: 5,000
MNIST images, 100 clients, 10 a round) with 1, 2 and 4 Ray actors sharing one
GPU (``engine.num_gpus_per_actor = 1/n``), and prints, per actor: its device,
the memory cap it set on the card (its share), the most GPU memory it held, and
the samples it trained per second of work.

``--workload r18`` runs the shape of the ResNet-18 CIFAR-100 protocols
(``scenarios/scenario/cifar100_glfc.yaml``: ResNet-18, CIFAR variant, on 3x32x32
images of 100 classes, batches of 128) on synthetic CIFAR-shaped images
(``benchmarks/workloads.py``'s ``Images``): 8 clients of 512 images, all 8 a
round, 3 local epochs, 3 rounds (``--rounds``), so a round trains 12,288
samples. For 1, 2 and 4 actors on one GPU (``--actors``), every combination of
``data.augment`` none and crop_flip (``--augment``), ``engine.amp`` off and bf16
(``--amp``) and ``engine.channels_last`` false and true (``--channels-last``):
24 runs, each actor count's on one pool of warm actors. One row per run: the
samples per second of its warm rounds (rounds 2..n, by the driver's clock: what
the run gets from the card, aggregation included), the actors' own samples per
second over their calls (their mean; round 1 included, and on the first run of
a pool its CUDA warm-up), and the most GPU memory an actor held. The full run
on one H100: about 3 to 4 minutes by an estimate, not yet a measurement (the
24 runs' 880,000 samples at 8,000 to 20,000 samples/s: 45 s to 2 minutes; per
run some 4 s of set-up, evaluation on the driver's CPU and aggregation; three
Ray starts)::

    python benchmarks/gpu_check.py --workload r18

With ``--cpu`` the same runs go without a GPU (the path this check is tested
on where no GPU is lent); r18's then shrinks to 4 clients of 8 images of
16x16, batches of 8, two rounds, a few seconds a run. The last line is the
table as JSON.
"""

from __future__ import annotations

import argparse
import itertools
import json
import sys
import tempfile
from dataclasses import replace
from pathlib import Path
from typing import Any

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

from benchmarks.cohort_strategy import FixedCohortFedAvg
from benchmarks.workloads import WORKLOADS, Workload
from simulator import backends
from simulator.config import NO_AUGMENTATION, compose_config
from simulator.engine import Experiment
from simulator.plugins import load_config

ACTORS = (1, 2, 4)
AUGMENT = (NO_AUGMENTATION, "crop_flip")
AMP = ("off", "bf16")
CHANNELS_LAST = ("false", "true")


def engine_overrides(actors: int, gpu: bool) -> list[str]:
    """``actors`` Ray actors of one CPU each, sharing one GPU if ``gpu``."""
    return [
        f"engine.num_actors={actors}",
        "engine.num_cpus_per_actor=1",
        f"engine.num_gpus_per_actor={1 / actors if gpu else 0}",
        "engine.backend=ray",
    ]


def check(actors: int, gpu: bool, rounds: int) -> list[dict]:
    """One run of the CNN workload with ``actors`` actors (sharing one GPU if ``gpu``); each actor's stats after it."""
    import ray

    workload = replace(WORKLOADS["A"], rounds=rounds)
    config = load_config(compose_config([*workload.overrides(), *engine_overrides(actors, gpu)]))
    strategy = FixedCohortFedAvg(workload.name, epochs=workload.epochs, fraction_evaluate=0.0)
    try:
        with tempfile.TemporaryDirectory() as run_dir:
            summary = Experiment(config, strategy, Path(run_dir), keep_warm=True).run()
        stats = ray.get([actor.stats.remote() for actor in backends._WARM.pool.actors])
    finally:
        backends._WARM.release()
    return [{"actors": actors, "actor": i, **s, "accuracy": summary["final_accuracy"]} for i, s in enumerate(stats)]


class RoundSamples(FixedCohortFedAvg):
    """The benchmark's FedAvg, noting the samples trained so far at each round's end (beside its clock)."""

    def __init__(self, workload: Workload) -> None:
        super().__init__(workload.name, epochs=workload.epochs, fraction_evaluate=0.0)
        self.workload = workload  # its rounds as run
        self.so_far: list[int] = []

    def aggregate_train(self, server_round: int, replies: Any) -> Any:
        result = super().aggregate_train(server_round, replies)
        self.so_far.append(self.samples)
        return result


def take_counters(host: Any) -> dict[str, Any]:
    """In an actor (``actor.__ray_call__``): its stats, the samples and busy seconds since the last take, then
    those and torch's peak GPU memory zeroed, so each run of a warm pool counts its own."""
    import torch

    stats = {**host.stats(), "trained": host.trained_samples, "busy_s": host.busy_s}
    host.trained_samples, host.busy_s = 0, 0.0
    if stats["device"].startswith("cuda"):
        torch.cuda.reset_peak_memory_stats()
    return stats


def check_r18(workload: Workload, actors: int, gpu: bool, augment: str, amp: str, channels_last: str) -> dict:
    """One run of ``workload`` with these settings on the warm pool of ``actors`` actors (started if none is
    warm): its warm rounds' samples per second, and its actors' own."""
    import ray

    settings = [f"engine.amp={amp}", f"engine.channels_last={channels_last}"]
    overrides = [*replace(workload, augment=augment).overrides(), *engine_overrides(actors, gpu), *settings]
    config = load_config(compose_config(overrides))
    strategy = RoundSamples(workload)
    with tempfile.TemporaryDirectory() as run_dir:
        summary = Experiment(config, strategy, Path(run_dir), keep_warm=True).run()
    pool = backends._WARM.pool
    assert pool is not None, "the run left no warm pool"
    stats = ray.get([actor.__ray_call__.remote(take_counters) for actor in pool.actors])
    ends, so_far = strategy.clock.ends, strategy.so_far
    warm_s = ends[-1] - ends[0]
    per_actor = [s["trained"] / s["busy_s"] if s["busy_s"] else 0.0 for s in stats]
    return {
        "actors": actors,
        "augment": augment,
        "amp": amp,
        "channels_last": channels_last == "true",
        "round_samples_per_s": round((so_far[-1] - so_far[0]) / warm_s, 1) if warm_s > 0 else 0.0,
        "actor_samples_per_s": round(sum(per_actor) / len(per_actor), 1),
        "per_actor_samples_per_s": [round(v, 1) for v in per_actor],
        "per_actor_samples": [s["trained"] for s in stats],
        "peak_gpu_mb": max(s["peak_gpu_mb"] for s in stats),
        "gpu_memory_cap": stats[0]["gpu_memory_cap"],
        "devices": sorted({s["device"] for s in stats}),
        "pids": [s["pid"] for s in stats],
        "samples": so_far[-1],
        "accuracy": summary["final_accuracy"],
    }


def r18_rows(args: argparse.Namespace) -> list[dict]:
    """Every combination asked for, for each actor count on its own warm pool."""
    workload = WORKLOADS["r18_cpu" if args.cpu else "r18_gpu"]
    workload = replace(workload, rounds=args.rounds or workload.rounds)
    rows = []
    try:
        for actors in args.actors or ACTORS:
            for augment, amp, channels_last in itertools.product(args.augment, args.amp, args.channels_last):
                print(
                    f"running r18: {actors} actor(s), augment={augment}, amp={amp}, channels_last={channels_last} ...",
                    file=sys.stderr,
                    flush=True,
                )
                rows.append(check_r18(workload, actors, not args.cpu, augment, amp, channels_last))
    finally:
        backends._WARM.release()
    return rows


def print_r18(rows: list[dict]) -> None:
    print(
        f"{'actors':>6} {'augment':>9} {'amp':>4} {'ch.last':>7} {'round samples/s':>15} {'actor samples/s':>15} "
        f"{'peak GPU MB':>11} {'cap':>6} {'device':>6} {'accuracy':>8}"
    )
    for r in rows:
        cap = "-" if r["gpu_memory_cap"] is None else f"{r['gpu_memory_cap']:.3f}"
        print(
            f"{r['actors']:>6} {r['augment']:>9} {r['amp']:>4} {str(r['channels_last']).lower():>7} "
            f"{r['round_samples_per_s']:>15.1f} {r['actor_samples_per_s']:>15.1f} {r['peak_gpu_mb']:>11.1f} "
            f"{cap:>6} {','.join(r['devices']):>6} {r['accuracy']:>8.3f}"
        )


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--cpu", action="store_true", help="no GPU: the same runs on the CPU (r18: a tiny shape)")
    parser.add_argument("--workload", choices=("cnn", "r18"), default="cnn", help="what the actors train")
    parser.add_argument("--rounds", type=int, help="rounds per run (default: cnn 10, r18 3, r18 with --cpu 2)")
    parser.add_argument("--actors", type=int, nargs="+", help=f"actor counts (default: {' '.join(map(str, ACTORS))})")
    parser.add_argument("--augment", nargs="+", choices=AUGMENT, default=list(AUGMENT), help="r18: data.augment")
    parser.add_argument("--amp", nargs="+", choices=AMP, default=list(AMP), help="r18: engine.amp")
    parser.add_argument(
        "--channels-last",
        nargs="+",
        choices=CHANNELS_LAST,
        default=list(CHANNELS_LAST),
        help="r18: engine.channels_last",
    )
    args = parser.parse_args(argv)
    if args.workload == "r18" and args.rounds is not None and args.rounds < 2:
        parser.error(f"--rounds {args.rounds}: r18 needs at least 2 (the first round is warm-up)")
    if args.workload == "r18":
        rows = r18_rows(args)
        print_r18(rows)
        print(json.dumps(rows))
        return
    rounds = args.rounds or WORKLOADS["A"].rounds
    rows = [row for actors in args.actors or ACTORS for row in check(actors, not args.cpu, rounds)]
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
