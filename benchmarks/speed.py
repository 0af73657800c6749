"""Speed benchmark: FedStream (Ray and in-process) against a bare PyTorch loop and Flower.

``python benchmarks/speed.py [--quick] [--workloads A B C] [--repeat N] [--no-probes]``

ResNet-18 per round, FedStream in-process against the bare loop, with and without
``data.augment=crop_flip`` (synthetic CIFAR-100-shaped images; about 7 minutes on 2 cores):
``python benchmarks/speed.py --workloads R18 R18aug --no-probes --no-sweep``

Each implementation runs the same workload (``benchmarks/workloads.py``) in a
process of its own, three times by default (``--quick``: once), in an order
that spreads drift over all of them (:func:`run`). This parent times each
process from start to exit and samples the memory of its whole process tree,
Ray's workers included (RSS every 50 ms, PSS every 0.5 s: :func:`tree_memory`);
the child reports when each round ended, its final accuracy and how many
samples it trained. The table and, as the last line, one JSON object with every
figure and ratio go to stdout. Last, unless ``--no-probes``, :func:`probe_overhead`
times the default class-incremental scenario with and without the
representation probes. Ratios compare implementations measured in this
same invocation, never numbers from another machine. An augmented workload
(``R18aug``) adds what its augmentation costs a round: its bare loop's warm
round over its unaugmented twin's (``R18``), where both ran, and a direct
timing of the augmentation on one round's training batches
(:func:`augmentation_cost`).
"""

from __future__ import annotations

import argparse
import itertools
import json
import os
import statistics
import subprocess
import sys
import tempfile
import time
from dataclasses import asdict, dataclass, field, replace
from pathlib import Path

import psutil
import torch

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

from benchmarks.workloads import (
    WEIGHTS_ENV,
    WEIGHTS_TOLERANCE,
    WORKLOADS,
    load_weights,
    max_difference,
    parse_report,
    shared_data,
)
from clients.augment import AUGMENTATIONS
from simulator.config import NO_AUGMENTATION
from simulator.seeding import Purpose, torch_generator

IMPLEMENTATIONS = {
    "fedstream_ray": ["benchmarks/run_fedstream.py", "{workload}", "ray"],
    "fedstream_local": ["benchmarks/run_fedstream.py", "{workload}", "local"],
    "bare_loop": ["benchmarks/run_bare.py", "{workload}"],
    "flower": ["benchmarks/run_flower.py", "{workload}"],
}
SAMPLE_S = 0.05  # memory sampling period
PSS_EVERY = 10  # PSS on every 10th sample
# Stateful methods: Flower's baseline trains plain SGD and keeps no client state, so it is left out.
STATEFUL = ["fedstream_ray", "fedstream_local", "bare_loop"]
SCALE = STATEFUL  # C: Flower's simulation is left out at 100,000 clients; the bare loop checks the weights
# ResNet-18 on 2 cores: FedStream's overhead per round over the floor, in one process each (Ray's two actors
# would train the round's two clients side by side, and Flower's baseline brings nothing new here).
LOCAL_VS_BARE = ["fedstream_local", "bare_loop"]
COMPARED = {
    "A": list(IMPLEMENTATIONS),
    "B": list(IMPLEMENTATIONS),
    "quick": list(IMPLEMENTATIONS),
    "tiny": list(IMPLEMENTATIONS),
    "C": SCALE,
    "C1k": SCALE,
    "A_ewc": STATEFUL,
    "tiny_ewc": STATEFUL,
    "R18": LOCAL_VS_BARE,
    "R18aug": LOCAL_VS_BARE,
    "tiny_r18aug": LOCAL_VS_BARE,
}
FULL = ["A", "B", "A_ewc", "C", "C1k"]
QUICK = ["quick", "A_ewc", "C", "C1k"]  # A_ewc whole: a run is mostly start-up, its ten rounds ~3 s
PROBED_SCENARIO = "scenario=digits_class_incremental"  # probe_overhead's
SWEEP_STRATEGIES = ("fedavg", "fedavgm", "fedadam", "fedyogi")  # sweep's: the default scenario x these x seeds
SWEEP_SEEDS = (0, 1, 2)


@dataclass(frozen=True)
class Measurement:
    """One implementation on one workload: over its repeats, the median times and the highest peaks."""

    implementation: str
    workload: str
    end_to_end_s: float
    first_round_s: float  # process start to the end of round 1
    warm_round_s: float  # median of rounds 2..n
    peak_memory_mb: float  # summed PSS of the process tree: what it takes from the machine
    peak_rss_mb: float  # summed RSS: shared pages counted once per process
    accuracy: float
    samples: int
    steal_percent: float  # CPU time the hypervisor gave to other guests meanwhile: a noisy neighbour
    runs: int
    # Median of rounds 2..n in CPU seconds of the reporting process: all the work of fedstream_local and the bare
    # loop (one torch thread each), so a busy host's other processes weigh on it less than on the wall clock;
    # the driver's alone for Ray and Flower, whose actors train.
    warm_round_cpu_s: float = float("nan")


@dataclass(frozen=True)
class Run:
    """What one process of one implementation measured."""

    end_to_end_s: float
    first_round_s: float
    warm_rounds_s: list[float]
    peak_pss: int
    peak_rss: int
    accuracy: float
    samples: int
    steal_percent: float
    warm_rounds_cpu_s: list[float] = field(default_factory=list)


def tree_memory(process: psutil.Process, proportional: bool) -> int:
    """Bytes ``process`` and its live descendants hold: summed RSS, or summed PSS if ``proportional``.

    RSS counts a shared page once in every process that maps it: the torch
    libraries in the driver and each actor, and Ray's object store in every
    process that reads it. PSS splits each shared page among its processes, so
    its sum is what the tree takes from the machine. It costs ~2 ms per process
    to read (smaps_rollup), against ~15 us for RSS.
    """
    total = 0
    for member in [process, *process.children(recursive=True)]:
        try:
            total += member.memory_full_info().pss if proportional else member.memory_info().rss
        except psutil.Error:
            pass
    return total


def measure(implementation: str, workload: str, weights_path: str | None = None) -> Run:
    """Run one implementation on one workload in a fresh process and measure it; it saves its final
    global weights at ``weights_path`` if given."""
    command = [sys.executable, *(a.format(workload=workload) for a in IMPLEMENTATIONS[implementation])]
    env = {**os.environ, **({WEIGHTS_ENV: weights_path} if weights_path else {})}
    # Files, not pipes: a chatty child never blocks on a full pipe.
    with tempfile.TemporaryFile(mode="w+") as stdout, tempfile.TemporaryFile(mode="w+") as stderr:
        started, steal_before = time.time(), psutil.cpu_times().steal
        child = subprocess.Popen(command, cwd=ROOT, stdout=stdout, stderr=stderr, text=True, env=env)
        process, peak_rss, peak_pss = psutil.Process(child.pid), 0, 0
        for sample in itertools.count():
            if child.poll() is not None:
                break
            peak_rss = max(peak_rss, tree_memory(process, proportional=False))
            if sample % PSS_EVERY == 0:  # less often: reading it takes CPU from the run
                peak_pss = max(peak_pss, tree_memory(process, proportional=True))
            time.sleep(SAMPLE_S)
        ended, stolen = time.time(), psutil.cpu_times().steal - steal_before
        stdout.seek(0)
        stderr.seek(0)
        out, err = stdout.read(), stderr.read()
    if child.returncode != 0:
        raise RuntimeError(f"{implementation} on {workload} exited with {child.returncode}:\n{err[-3000:]}")
    result = parse_report(out)
    ends = result["round_ends"]
    return Run(
        ended - started,
        ends[0] - started,
        [b - a for a, b in zip(ends, ends[1:])],
        peak_pss,
        peak_rss,
        result["accuracy"],
        result["samples"],
        100 * stolen / ((ended - started) * (psutil.cpu_count() or 1)),
        [b - a for a, b in zip(result["round_cpu"], result["round_cpu"][1:])],
    )


def combine(implementation: str, workload: str, runs: list[Run]) -> Measurement:
    """One row from an implementation's repeats: median times (warm rounds pooled), highest peaks.

    Every repeat trains the same samples. Accuracy is the median: Flower's
    simulation aggregates replies in arrival order, so its last bits may differ.
    """
    if len({r.samples for r in runs}) != 1:
        raise RuntimeError(f"{implementation} on {workload}: repeats trained different samples: {runs}")
    warm = [w for r in runs for w in r.warm_rounds_s]
    warm_cpu = [w for r in runs for w in r.warm_rounds_cpu_s]
    return Measurement(
        implementation,
        workload,
        round(statistics.median(r.end_to_end_s for r in runs), 3),
        round(statistics.median(r.first_round_s for r in runs), 3),
        round(statistics.median(warm), 4) if warm else float("nan"),
        round(max(r.peak_pss for r in runs) / 2**20, 1),
        round(max(r.peak_rss for r in runs) / 2**20, 1),
        round(statistics.median(r.accuracy for r in runs), 4),
        runs[0].samples,
        round(statistics.mean(r.steal_percent for r in runs), 1),
        len(runs),
        round(statistics.median(warm_cpu), 4) if warm_cpu else float("nan"),
    )


def ratios(results: dict[str, dict[str, Measurement]]) -> dict[str, float]:
    """The issue's target ratios, for every workload where both sides were measured."""
    out: dict[str, float] = {}
    for workload, by_impl in results.items():
        ray, local = by_impl.get("fedstream_ray"), by_impl.get("fedstream_local")
        bare, flower = by_impl.get("bare_loop"), by_impl.get("flower")
        if ray and bare:
            out[f"{workload}.warm_round_ray_over_bare"] = round(ray.warm_round_s / bare.warm_round_s, 3)
        if local and bare:
            out[f"{workload}.warm_round_local_over_bare"] = round(local.warm_round_s / bare.warm_round_s, 3)
            if local.warm_round_cpu_s > 0 and bare.warm_round_cpu_s > 0:  # NaN where not reported: False
                out[f"{workload}.warm_round_cpu_local_over_bare"] = round(
                    local.warm_round_cpu_s / bare.warm_round_cpu_s, 3
                )
            out[f"{workload}.end_to_end_local_over_bare"] = round(local.end_to_end_s / bare.end_to_end_s, 3)
        if ray and flower:
            out[f"{workload}.end_to_end_flower_over_ray"] = round(flower.end_to_end_s / ray.end_to_end_s, 3)
            out[f"{workload}.memory_ray_over_flower"] = round(ray.peak_memory_mb / flower.peak_memory_mb, 3)
        if local and flower:
            out[f"{workload}.end_to_end_flower_over_local"] = round(flower.end_to_end_s / local.end_to_end_s, 3)
    big, small = results.get("C", {}).get("fedstream_ray"), results.get("C1k", {}).get("fedstream_ray")
    if big and small:
        out["C.warm_round_100k_over_1k"] = round(big.warm_round_s / small.warm_round_s, 3)
        out["C.peak_memory_100k_mb"] = big.peak_memory_mb
    for workload, by_impl in results.items():  # an augmented workload against its unaugmented twin
        twin = unaugmented(workload)
        for implementation, label in (("bare_loop", "bare"), ("fedstream_local", "local")):
            augmented, plain = by_impl.get(implementation), results.get(twin or "", {}).get(implementation)
            if augmented and plain:
                out[f"{workload}.{label}_round_over_{twin}"] = round(augmented.warm_round_s / plain.warm_round_s, 3)
                if augmented.warm_round_cpu_s > 0 and plain.warm_round_cpu_s > 0:
                    ratio = augmented.warm_round_cpu_s / plain.warm_round_cpu_s
                    out[f"{workload}.{label}_round_cpu_over_{twin}"] = round(ratio, 3)
    return out


def unaugmented(name: str) -> str | None:
    """The workload that is ``name``'s but for ``data.augment`` (none), if ``name`` is augmented and it exists."""
    workload = WORKLOADS.get(name)
    if workload is None or workload.augment == NO_AUGMENTATION:
        return None
    return next(
        (other for other, w in WORKLOADS.items() if w == replace(workload, name=other, augment=NO_AUGMENTATION)),
        None,
    )


def augmentation_cost(name: str, repeat: int = 5) -> float:
    """Seconds workload ``name``'s ``data.augment`` takes on one round's training batches, on one torch
    thread as the implementations train: each round's cohort's batches as ``ClientMethod.run_epochs`` cuts
    them (the client's seeded order, ``batch_size``, every epoch), augmented from the client's generator;
    per round the fastest of ``repeat`` passes, and the median over the rounds."""
    workload = WORKLOADS[name]
    config, stream = shared_data(workload)
    augment = AUGMENTATIONS.resolve(config.data.augment)
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        per_round = []
        for server_round in range(1, workload.rounds + 1):
            batches = []  # (client, its batches)
            for client in workload.cohort(server_round):
                x = torch.from_numpy(stream.x_train[stream.train_indices(server_round, client)])
                order = torch_generator(config.seed, Purpose.CLIENT_TRAIN, server_round, client)
                positions = [torch.randperm(len(x), generator=order) for _ in range(workload.epochs)]
                batches.append((client, [x[p] for epoch in positions for p in epoch.split(workload.batch_size)]))
            fastest = float("inf")
            for _ in range(repeat):
                started = time.perf_counter()
                for client, xs in batches:
                    generator = torch_generator(config.seed, Purpose.AUGMENT, server_round, client)
                    for x in xs:
                        augment(x, generator)
                fastest = min(fastest, time.perf_counter() - started)
            per_round.append(fastest)
    finally:
        torch.set_num_threads(threads)
    return statistics.median(per_round)


def augmentation_costs(results: dict[str, dict[str, Measurement]]) -> dict[str, float]:
    """Per augmented workload: its augmentation's seconds a round (:func:`augmentation_cost`), and their
    share of its bare loop's warm round (in CPU seconds, where reported: the steadier measure)."""
    out: dict[str, float] = {}
    for workload, by_impl in results.items():
        if WORKLOADS[workload].augment == NO_AUGMENTATION:
            continue
        seconds = augmentation_cost(workload)
        out[f"{workload}.augment_s_per_round"] = round(seconds, 5)
        if bare := by_impl.get("bare_loop"):
            round_s = bare.warm_round_cpu_s if bare.warm_round_cpu_s > 0 else bare.warm_round_s
            out[f"{workload}.augment_share_of_bare_round"] = round(seconds / round_s, 5)
    return out


def same_samples(results: dict[str, dict[str, Measurement]]) -> dict[str, bool]:
    """Per workload: did every implementation train the same number of samples?"""
    return {w: len({m.samples for m in by_impl.values()}) == 1 for w, by_impl in results.items()}


def table(results: dict[str, dict[str, Measurement]]) -> str:
    width = max([9, *(len(w) + 1 for w in results)])  # the workload column
    header = (
        f"{'workload':{width}}{'implementation':17}{'end to end s':>13}{'1st round s':>12}{'warm round s':>13}"
        f"{'warm CPU s':>11}{'PSS MB':>8}{'RSS MB':>8}{'accuracy':>9}{'samples':>9}{'steal %':>8}"
    )
    rows = [header, "-" * len(header)]  # one row per implementation, over its repeats
    for by_impl in results.values():
        for m in by_impl.values():
            rows.append(
                f"{m.workload:{width}}{m.implementation:17}{m.end_to_end_s:13.2f}{m.first_round_s:12.2f}"
                f"{m.warm_round_s:13.4f}{m.warm_round_cpu_s:11.4f}{m.peak_memory_mb:8.0f}{m.peak_rss_mb:8.0f}"
                f"{m.accuracy:9.3f}{m.samples:9d}{m.steal_percent:8.1f}"
            )
    return "\n".join(rows)


def run(workloads: list[str], repeat: int = 1) -> dict:
    """Measure every implementation compared on each workload; print the table; return the JSON.

    With ``repeat`` > 1 the whole plan runs again, in reverse order every other
    time (A B C, C B A, A B C, ...), so that the host getting faster or slower
    during the benchmark weighs on every implementation alike. Whole runs differ
    too (the same C run measured 0.23 s and 0.30 s per round): with three, one
    slow run cannot decide a row's median.
    """
    plan = [(w, i) for w in workloads for i in COMPARED[w]]
    runs: dict[tuple[str, str], list[Run]] = {step: [] for step in plan}
    with tempfile.TemporaryDirectory() as weights_dir:
        weights = {step: f"{weights_dir}/{step[0]}-{step[1]}.npz" for step in plan}
        for repetition in range(repeat):
            for workload, implementation in plan if repetition % 2 == 0 else reversed(plan):
                print(
                    f"running {implementation} on {workload} ({repetition + 1}/{repeat}) ...",
                    file=sys.stderr,
                    flush=True,
                )
                step = (workload, implementation)
                runs[step].append(measure(implementation, workload, weights[step]))
        differences = weight_differences(workloads, weights)
    results = {w: {i: combine(i, w, runs[w, i]) for i in COMPARED[w]} for w in workloads}
    print(table(results))
    return {
        "results": {w: {i: asdict(m) for i, m in by.items()} for w, by in results.items()},
        "ratios": {**ratios(results), **augmentation_costs(results)},
        "same_samples": same_samples(results),
        "weights_max_abs_diff": differences,
        # FedStream's own: Flower's simulation aggregates in arrival order, so its last bits may differ.
        "same_weights": {
            w: all(d <= WEIGHTS_TOLERANCE for i, d in by.items() if i.startswith("fedstream"))
            for w, by in differences.items()
        },
    }


def weight_differences(workloads: list[str], weights: dict[tuple[str, str], str]) -> dict[str, dict[str, float]]:
    """Per workload and implementation, the largest difference of its final weights from the bare loop's."""
    differences: dict[str, dict[str, float]] = {}
    for workload in workloads:
        reference = load_weights(weights[workload, "bare_loop"])
        differences[workload] = {
            implementation: max_difference(load_weights(weights[workload, implementation]), reference)
            for implementation in COMPARED[workload]
            if implementation != "bare_loop"
        }
    return differences


def probe_overhead(repeat: int, extra: tuple[str, ...] = ()) -> dict[str, float]:
    """What the representation probes add to the default class-incremental scenario, end to end.

    ``python run.py scenario=digits_class_incremental`` (Ray, the defaults) with
    ``eval.probes`` on and off, alternating which goes first; the median process
    time of each and their ratio (the issue's target: at most 1.10).
    """
    seconds: dict[bool, list[float]] = {True: [], False: []}
    for repetition in range(repeat):
        for probes in (True, False) if repetition % 2 == 0 else (False, True):
            print(
                f"running run.py {PROBED_SCENARIO} eval.probes={probes} ({repetition + 1}/{repeat}) ...",
                file=sys.stderr,
                flush=True,
            )
            with tempfile.TemporaryDirectory() as run_dir:
                command = [
                    sys.executable,
                    "run.py",
                    PROBED_SCENARIO,
                    f"eval.probes={str(probes).lower()}",
                    f"hydra.run.dir={run_dir}",
                    *extra,
                ]
                started = time.time()
                subprocess.run(command, cwd=ROOT, check=True, capture_output=True)
                seconds[probes].append(time.time() - started)
    on, off = statistics.median(seconds[True]), statistics.median(seconds[False])
    return {
        "probes.end_to_end_on_s": round(on, 3),
        "probes.end_to_end_off_s": round(off, 3),
        "probes.on_over_off": round(on / off, 3),
    }


def sweep(
    strategies: tuple[str, ...] = SWEEP_STRATEGIES, seeds: tuple[int, ...] = SWEEP_SEEDS, extra: tuple[str, ...] = ()
) -> dict[str, float]:
    """The default scenario x ``strategies`` x ``seeds``, three ways, end to end (process start to exit):

    one FedStream ``--multirun`` (its jobs share one Ray and warm actors), one
    ``run.py`` per job, and one Flower ``run_simulation`` per job
    (``benchmarks/run_flower_sweep.py``). The issue's targets: the multirun at
    least 5x faster than the Flower runs and 2x faster than the separate ones.
    """
    jobs = [(strategy, seed) for strategy in strategies for seed in seeds]

    def timed(commands: list[list[str]]) -> float:
        started = time.time()
        for command in commands:
            subprocess.run([sys.executable, *command], cwd=ROOT, check=True, capture_output=True)
        return time.time() - started

    print(f"running the sweep of {len(jobs)} jobs three ways ...", file=sys.stderr, flush=True)
    with tempfile.TemporaryDirectory() as out:
        multirun = timed(
            [
                [
                    "run.py",
                    "--multirun",
                    f"strategy={','.join(strategies)}",
                    f"seed={','.join(map(str, seeds))}",
                    f"hydra.sweep.dir={out}/multirun",
                    *extra,
                ]
            ]
        )
        separate = timed(
            [["run.py", f"strategy={s}", f"seed={seed}", f"hydra.run.dir={out}/{s}-{seed}", *extra] for s, seed in jobs]
        )
    flower = timed([["benchmarks/run_flower_sweep.py", s, str(seed), *extra] for s, seed in jobs])
    return {
        "sweep.jobs": len(jobs),
        "sweep.multirun_s": round(multirun, 2),
        "sweep.separate_s": round(separate, 2),
        "sweep.flower_s": round(flower, 2),
        "sweep.flower_over_multirun": round(flower / multirun, 3),
        "sweep.separate_over_multirun": round(separate / multirun, 3),
    }


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--quick", action="store_true", help="a smaller workload, A_ewc and C, once each")
    parser.add_argument("--workloads", nargs="+", choices=sorted(COMPARED), help="which workloads to run")
    parser.add_argument("--repeat", type=int, help="runs of each implementation (default: 3, --quick: 1)")
    parser.add_argument(
        "--no-probes",
        action="store_true",
        help="skip timing the representation probes on the class-incremental scenario",
    )
    parser.add_argument(
        "--no-sweep", action="store_true", help="skip the sweep workload (12 jobs, three ways: about 10 minutes)"
    )
    args = parser.parse_args(argv)
    workloads = args.workloads or (QUICK if args.quick else FULL)
    repeat = args.repeat or (1 if args.quick else 3)
    if repeat < 1:
        parser.error(f"--repeat {repeat}: must be at least 1")
    result = run(workloads, repeat)
    if not args.no_probes:
        result["ratios"].update(probe_overhead(repeat))
    if not args.no_sweep:
        result["ratios"].update(sweep())
    print(json.dumps(result))


if __name__ == "__main__":
    main()
