"""The speed benchmark's harness on a tiny workload: it cannot rot unnoticed. Not timed."""

from __future__ import annotations

import json

import numpy as np
import pytest
import torch

from benchmarks import speed
from benchmarks.workloads import (
    DATA_ENV,
    WEIGHTS_ENV,
    WEIGHTS_TOLERANCE,
    WORKLOADS,
    load_weights,
    max_difference,
    parse_report,
    samples_of,
    shared_data,
)
from clients.augment import crop_flip
from simulator.jobs import task_change
from simulator.seeding import Purpose, torch_generator

pytestmark = pytest.mark.ray


def _measured(name: str) -> dict:
    """``speed.run`` on workload ``name``, checked: the same samples, a sane accuracy, the floor exact."""
    result = speed.run([name])
    measured = result["results"][name]
    assert set(measured) == set(speed.COMPARED[name])
    _, stream = shared_data(WORKLOADS[name])
    expected = samples_of(stream, WORKLOADS[name])
    assert {impl: m["samples"] for impl, m in measured.items()} == dict.fromkeys(measured, expected)
    assert result["same_samples"] == {name: True}
    # FedStream (both backends) ends with the bare loop's weights; Flower's aggregates in arrival order.
    differences = result["weights_max_abs_diff"][name]
    assert differences["fedstream_local"] <= 1e-6 and differences["fedstream_ray"] <= 1e-6, differences
    assert differences.get("flower", 0.0) <= 1e-5, differences
    for impl, m in measured.items():
        assert 0.1 <= m["accuracy"] <= 1.0, impl
        assert 0 < m["first_round_s"] <= m["end_to_end_s"], impl
        assert m["warm_round_s"] > 0 and m["peak_memory_mb"] > 50, impl
    # The same seeded cohorts and client method: the framework-free floor and FedStream agree exactly.
    assert measured["bare_loop"]["accuracy"] == measured["fedstream_local"]["accuracy"]
    return result


def test_all_four_implementations_train_the_same_samples_to_a_sane_accuracy():
    result = _measured("tiny")
    assert set(result["ratios"]) >= {
        "tiny.warm_round_ray_over_bare",
        "tiny.end_to_end_flower_over_ray",
        "tiny.memory_ray_over_flower",
        "tiny.end_to_end_flower_over_local",
    }


def test_ewc_crosses_task_boundaries_and_the_bare_loop_matches_fedstream():
    workload = WORKLOADS["tiny_ewc"]
    _, stream = shared_data(workload)
    last: dict[int, int] = {}
    left = 0  # jobs whose client left an earlier task: EWC estimates a Fisher, then carries it
    for server_round in range(1, workload.rounds + 1):
        for client in workload.cohort(server_round):
            task = stream.client_task(server_round, client)
            left += task_change(stream, client, task, last.get(client))[1] is not None
            last[client] = server_round
    assert left >= 5
    assert "tiny_ewc.warm_round_ray_over_bare" in _measured("tiny_ewc")["ratios"]


def test_resnet18_with_crop_flip_trains_the_same_samples_to_the_same_weights_in_fedstream_and_the_bare_loop(
    tmp_path, monkeypatch, capsys
):
    """R18's path, shrunk (tiny_r18aug: 2 clients of 8 16x16 images, 2 rounds), in this process: the bare
    loop builds the same ResNet-18, augments each batch from the client's own generator as FedStream's
    worker does, and loads batch norm's averaged counters rounded as the engine does."""
    from benchmarks import run_bare, run_fedstream

    monkeypatch.setenv(DATA_ENV, str(tmp_path))  # the images' .npz goes here
    name, threads = "tiny_r18aug", torch.get_num_threads()
    reports, weights = {}, {}
    try:
        for implementation, run in (
            ("bare_loop", lambda: run_bare.main(name)),
            ("fedstream_local", lambda: run_fedstream.main(name, "local")),
        ):
            monkeypatch.setenv(WEIGHTS_ENV, str(tmp_path / f"{implementation}.npz"))
            run()
            reports[implementation] = parse_report(capsys.readouterr().out)
            weights[implementation] = load_weights(str(tmp_path / f"{implementation}.npz"))
    finally:
        torch.set_num_threads(threads)  # both train on one thread, as an actor with one CPU does
    assert [p.name for p in tmp_path.glob("images-*.npz")] == ["images-v1-16-8-100-16-0.npz"]
    config, stream = shared_data(WORKLOADS[name])
    assert (config.model.name, config.data.augment, stream.x_train.shape[1:]) == ("resnet18", "crop_flip", (3, 16, 16))
    assert (
        reports["bare_loop"]["samples"] == reports["fedstream_local"]["samples"] == samples_of(stream, WORKLOADS[name])
    )
    assert len(weights["bare_loop"]) > 100  # ResNet-18's tensors, batch norm's statistics and counters included
    assert max_difference(weights["fedstream_local"], weights["bare_loop"]) <= WEIGHTS_TOLERANCE
    # The bare loop's batches are augmented, from the generator FedStream's worker draws from.
    context = run_bare.ClientMemory(config, stream).context(2, 1)
    x = torch.from_numpy(stream.x_train[:4])
    assert torch.equal(context.augment(x), crop_flip(x, torch_generator(config.seed, Purpose.AUGMENT, 2, 1)))
    assert not torch.equal(context.augment(x), x)


def test_an_augmented_workload_is_timed_against_its_unaugmented_twin_and_its_augmentation_directly():
    assert (speed.unaugmented("R18aug"), speed.unaugmented("R18"), speed.unaugmented("tiny_r18aug")) == (
        "R18",
        None,
        None,
    )
    assert set(speed.COMPARED["R18"]) == set(speed.COMPARED["R18aug"]) == {"fedstream_local", "bare_loop"}

    def row(implementation, workload, warm):
        return speed.combine(implementation, workload, [_run([warm], 2**20)])

    results = {
        w: {"fedstream_local": row("fedstream_local", w, 1.05 * warm), "bare_loop": row("bare_loop", w, warm)}
        for w, warm in (("R18", 8.0), ("R18aug", 8.2))
    }
    ratios = speed.ratios(results)
    assert ratios["R18.warm_round_local_over_bare"] == ratios["R18aug.warm_round_local_over_bare"] == 1.05
    assert ratios["R18aug.bare_round_over_R18"] == ratios["R18aug.local_round_over_R18"] == round(8.2 / 8.0, 3)
    assert "R18.bare_round_over_R18" not in ratios
    seconds = speed.augmentation_cost("tiny_r18aug", repeat=2)  # its 2 rounds of 2 batches of 8
    assert 0 < seconds < 1


def test_cohorts_are_seeded_sorted_and_distinct():
    workload = WORKLOADS["A"]
    cohort = workload.cohort(3)
    assert cohort == sorted(set(cohort)) and len(cohort) == workload.clients_per_round
    assert cohort == WORKLOADS["A"].cohort(3) and cohort != workload.cohort(4)


def _run(warm, peak_pss, accuracy=0.5, end_to_end=10.0):
    return speed.Run(end_to_end, 2.0, warm, peak_pss, 2 * peak_pss, accuracy, 100, 1.0)


def test_repeats_combine_into_pooled_median_rounds_and_the_highest_peak():
    row = speed.combine(
        "x", "A", [_run([1.0, 5.0, 6.0], 2**20 * 100, end_to_end=10.0), _run([2.0, 3.0], 2**20 * 300, end_to_end=14.0)]
    )
    assert (row.warm_round_s, row.peak_memory_mb, row.peak_rss_mb, row.end_to_end_s, row.runs) == (
        3.0,
        300.0,
        600.0,
        12.0,
        2,
    )
    assert speed.combine("x", "A", [_run([1.0], 1, accuracy=a) for a in (0.5, 0.7, 0.6)]).accuracy == 0.6
    with pytest.raises(RuntimeError, match="different samples"):
        speed.combine("x", "A", [_run([1.0], 1), speed.Run(1.0, 1.0, [1.0], 1, 1, 0.5, 99, 0.0)])


def test_probe_overhead_times_the_class_incremental_scenario_with_the_probes_on_and_off():
    extra = ("engine.backend=local", "stream.rounds_per_task=1", "client.epochs=1")
    overhead = speed.probe_overhead(1, extra)
    assert overhead["probes.end_to_end_on_s"] > 0 and overhead["probes.end_to_end_off_s"] > 0
    ratio = overhead["probes.end_to_end_on_s"] / overhead["probes.end_to_end_off_s"]
    assert overhead["probes.on_over_off"] == pytest.approx(ratio, abs=2e-3)


# The gpu_check tests share one Ray (each run still starts its actors): it is not theirs to shut down.
def test_gpu_check_reports_each_actors_device_memory_and_throughput_on_the_cpu_path(
    monkeypatch, capsys, ray_with_three_cpus
):
    from benchmarks import gpu_check

    monkeypatch.setattr(gpu_check, "ACTORS", (1, 2))
    gpu_check.main(["--cpu", "--rounds", "1"])
    rows = json.loads(capsys.readouterr().out.strip().splitlines()[-1])
    assert [(r["actors"], r["actor"]) for r in rows] == [(1, 0), (2, 0), (2, 1)]
    assert len({r["pid"] for r in rows if r["actors"] == 2}) == 2  # two actor processes
    assert all(r["device"] == "cpu" and r["samples_per_s"] > 0 and r["peak_gpu_mb"] == 0.0 for r in rows)


def test_gpu_check_times_resnet18_per_setting_on_one_warm_pool_on_the_cpu_path(capsys, ray_with_three_cpus):
    from benchmarks import gpu_check

    # The r18 shape shrunk for the CPU (4 clients of 8 16x16 images, 2 rounds); two settings, one actor.
    argv = ["--cpu", "--workload", "r18", "--actors", "1", "--augment", "crop_flip", "--amp", "off", "bf16"]
    gpu_check.main([*argv, "--channels-last", "true"])
    out = capsys.readouterr().out.strip().splitlines()
    rows = json.loads(out[-1])
    assert out[0].split()[:4] == ["actors", "augment", "amp", "ch.last"] and len(out) == 4  # header, 2 rows, JSON
    assert [(r["actors"], r["augment"], r["amp"], r["channels_last"]) for r in rows] == [
        (1, "crop_flip", "off", True),
        (1, "crop_flip", "bf16", True),
    ]
    assert rows[0]["pids"] == rows[1]["pids"] and len(rows[0]["pids"]) == 1  # the second run: the warm actor
    for r in rows:
        assert r["devices"] == ["cpu"] and r["peak_gpu_mb"] == 0.0 and r["gpu_memory_cap"] is None
        assert r["round_samples_per_s"] > 0 and r["actor_samples_per_s"] > 0
        # Each run counts its own samples (4 clients x 8 images x 2 rounds), though its actors trained the one before.
        assert r["samples"] == sum(r["per_actor_samples"]) == 64


def test_the_weight_check_flags_an_aggregate_perturbed_past_the_tolerance(tmp_path):
    rng = np.random.default_rng(0)
    bare = [rng.normal(size=(4, 3)).astype(np.float32), rng.normal(size=3).astype(np.float32)]
    perturbed = [bare[0].copy(), bare[1] + np.float32(1e-5)]
    files = {}
    for implementation, arrays in (("bare_loop", bare), ("fedstream_local", bare), ("fedstream_ray", perturbed)):
        files["tiny", implementation] = str(tmp_path / f"{implementation}.npz")
        np.savez(files["tiny", implementation], *arrays)
    files["tiny", "flower"] = files["tiny", "fedstream_local"]
    differences = speed.weight_differences(["tiny"], files)["tiny"]
    assert differences["fedstream_local"] == 0.0 and differences["flower"] == 0.0
    assert (
        differences["fedstream_ray"] == pytest.approx(1e-5, rel=0.1)
        and differences["fedstream_ray"] > WEIGHTS_TOLERANCE
    )


def test_the_sweep_workload_times_a_multirun_separate_runs_and_flower_runs_of_the_same_jobs():
    timings = speed.sweep(("fedavg",), (0,), extra=("rounds=2",))  # one job: each way starts Ray once
    assert timings["sweep.jobs"] == 1
    assert min(timings["sweep.multirun_s"], timings["sweep.separate_s"], timings["sweep.flower_s"]) > 0
    assert timings["sweep.separate_over_multirun"] == pytest.approx(
        timings["sweep.separate_s"] / timings["sweep.multirun_s"], abs=2e-3
    )
