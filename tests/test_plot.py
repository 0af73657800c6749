"""simulator.plot: reading and grouping run directories, seed bands, matrices, the forgetting
figure and its representation panel, the command line.

Run directories are written by hand here, so every expected number is known.
"""

from __future__ import annotations

import json
import math
import struct
import subprocess
from pathlib import Path
from typing import Any

import matplotlib.pyplot as plt
import numpy as np
import pytest
from helpers import fill_leaving, one_error_line, run_module, small_file_system, write_hydra_overrides

from simulator.plot import (
    Curve,
    PlotError,
    cka_figure,
    describe,
    forgetting_figure,
    group_band,
    heatmap_figure,
    mean_matrix,
    metric_curve,
    metric_label,
    overlay_figure,
    plot_forgetting,
    probe_records,
    read_accuracy_matrix,
    read_run,
    relabel,
    seed_band,
    spread_labels,
    task_segments,
)
from simulator.plot import main as plot_main
from simulator.runs import Run, find_runs, group_runs, shared_overrides

NAN = math.nan
HEAD_TASK = "acc_per_task"


def record(round_: int, task: int, acc_per_task: list[float | None], **more: Any) -> dict[str, Any]:
    seen = [a for a in acc_per_task if a is not None]
    return {
        "round": round_,
        "task": task,
        "wall_s": 0.1 * round_,
        "train_loss": 1.0 / round_,
        "acc_per_task": acc_per_task,
        "acc_seen": sum(seen) / len(seen),
        **more,
    }


# Two tasks, three rounds each: task 0 is learnt, then partly forgotten.
TWO_TASKS = [
    record(1, 0, [0.5, None]),
    record(2, 0, [0.7, None]),
    record(3, 0, [0.8, None]),
    record(4, 1, [0.6, 0.4]),
    record(5, 1, [0.5, 0.6]),
    record(6, 1, [0.4, 0.9]),
]


def probed(rec: dict[str, Any], probe: list[float | None], ncm: list[float | None] | None = None) -> dict[str, Any]:
    """``rec`` with a linear probe's accuracy per task and, if given, the NCM's."""
    more: dict[str, Any] = {
        "probe_acc_per_task": probe,
        "probe_acc_seen": float(np.mean([a for a in probe if a is not None])),
    }
    if ncm is not None:
        more |= {"ncm_acc_per_task": ncm, "ncm_acc_seen": float(np.mean([a for a in ncm if a is not None]))}
    return rec | more


# TWO_TASKS probed at each task's end (rounds 3 and 6): the encoder keeps more of task 0
# (probe 0.75, NCM 0.7 after task 1) than the head does (0.4).
PROBED_AT_TASK_ENDS = [
    *TWO_TASKS[:2],
    probed(TWO_TASKS[2], [0.85, None], [0.8, None]),
    *TWO_TASKS[3:5],
    probed(TWO_TASKS[5], [0.75, 0.92], [0.7, 0.88]),
]


def write_run(
    path: Path,
    records: list[dict[str, Any]],
    overrides: list[str] | None = None,
    strategy: str | None = None,
    matrix: list[list[float]] | None = None,
) -> Path:
    """A run directory as the engine and Hydra leave it, holding only what is given."""
    path.mkdir(parents=True)
    (path / "metrics.jsonl").write_text("".join(json.dumps(r) + "\n" for r in records))
    if overrides is not None:
        write_hydra_overrides(path, overrides)
    if strategy is not None:
        (path / ".hydra" / "config.yaml").write_text(
            "seed: 0\nscenario_name: ${hydra:runtime.choices.scenario}\n"
            f"strategy:\n  _target_: {strategy}\n  fraction_train: ${{fraction:10,20}}\n"
        )
    if matrix is not None:
        header = ",".join(f"task_{j}" for j in range(len(matrix[0])))
        rows = "".join(",".join(f"{a:.6f}" for a in row) + "\n" for row in matrix)
        (path / "accuracy_matrix.csv").write_text(header + "\n" + rows)
    return path


def run(name: str, overrides: list[str] | None, strategy: str | None = None) -> Run:
    """A run of TWO_TASKS at /runs/NAME, as read_run returns it."""
    return Run(Path("/runs") / name, TWO_TASKS, None if overrides is None else tuple(overrides), strategy)


# --- Reading --------------------------------------------------------------------------------


def test_a_multirun_directory_lists_its_runs_in_job_order(tmp_path):
    for name in ["10_seed=10", "2_seed=2", "0_seed=0"]:
        write_run(tmp_path / name, TWO_TASKS)
    (tmp_path / "notes").mkdir()  # no metrics.jsonl: not a run
    (tmp_path / "multirun.yaml").write_text("{}\n")

    assert [p.name for p in find_runs(tmp_path)] == ["0_seed=0", "2_seed=2", "10_seed=10"]
    assert find_runs(tmp_path / "2_seed=2") == [tmp_path / "2_seed=2"]


def test_a_path_without_runs_is_an_error_naming_it(tmp_path):
    (tmp_path / "empty").mkdir()
    for path in [tmp_path / "empty", tmp_path / "missing"]:
        with pytest.raises(PlotError, match=str(path)):
            find_runs(path)


def test_read_run_takes_the_overrides_and_the_strategy_class_from_hydra_files(tmp_path):
    path = write_run(
        tmp_path / "a", TWO_TASKS, ["strategy=fedadam", "seed=3"], strategy="flwr.serverapp.strategy.FedAdam"
    )
    bare = write_run(tmp_path / "b", TWO_TASKS)

    a = read_run(path)
    assert a.records == TWO_TASKS
    assert a.overrides == ("strategy=fedadam", "seed=3")
    assert a.strategy == "FedAdam"
    assert a.setting == ("strategy=fedadam",)
    assert read_run(bare) == Run(bare, TWO_TASKS, None, None)


def test_the_accuracy_matrix_is_read_with_unseen_cells_as_nan(tmp_path):
    path = write_run(tmp_path / "a", TWO_TASKS, matrix=[[0.8, NAN], [0.4, 0.9]])
    np.testing.assert_array_equal(read_accuracy_matrix(path), [[0.8, NAN], [0.4, 0.9]])
    with pytest.raises(PlotError, match="accuracy_matrix.csv"):
        read_accuracy_matrix(write_run(tmp_path / "unfinished", TWO_TASKS))


# --- Grouping ---------------------------------------------------------------------------------


def test_runs_that_differ_only_by_seed_form_one_group_named_by_its_strategy():
    runs = [
        run("0", ["seed=0", "strategy=fedavg", "rounds=6"], "FedAvg"),
        run("1", ["seed=0", "strategy=fedadam", "rounds=6"], "FedAdam"),
        run("2", ["rounds=6", "strategy=fedavg", "+seed=1"], "FedAvg"),  # other order, other seed
        run("3", ["seed=1", "strategy=fedadam", "rounds=6"], "FedAdam"),
    ]
    groups = group_runs(runs)

    assert [g.label for g in groups] == ["FedAvg", "FedAdam"]
    assert [[r.path.name for r in g.runs] for g in groups] == [["0", "2"], ["1", "3"]]
    assert shared_overrides(runs) == ["rounds=6"]


def test_a_resumed_run_and_a_value_spelt_otherwise_stay_in_their_group():
    # resume=true continues a killed run (its overrides then say so); False and false are one value.
    runs = [
        run("0", ["seed=0", "eval.probes=false"], "FOT"),
        run("1", ["seed=1", "eval.probes=False", "resume=true"], "FOT"),
    ]
    (group,) = group_runs(runs)

    assert [r.path.name for r in group.runs] == ["0", "1"]
    assert shared_overrides(runs) == ["eval.probes=false"]


def test_groups_of_one_strategy_are_named_by_the_overrides_they_do_not_share():
    runs = [
        run(str(i), [f"seed={i % 2}", "strategy=fedadam", f"strategy.eta={eta}"], "FedAdam")
        for i, eta in enumerate([0.1, 0.1, 0.01, 0.01])
    ]
    groups = group_runs(runs)

    assert [g.label for g in groups] == ["strategy.eta=0.1", "strategy.eta=0.01"]
    assert [len(g.runs) for g in groups] == [2, 2]


def test_a_run_without_overrides_is_its_own_group_named_by_its_directory():
    runs = [run("baseline", None), run("0_seed=0", ["seed=0", "rounds=6"], "FedAvg"), run("other", None)]
    groups = group_runs(runs)

    # Strategies differ (None vs FedAvg), and the bare runs share no override.
    assert [g.label for g in groups] == ["baseline", "FedAvg rounds=6", "other"]
    assert [len(g.runs) for g in groups] == [1, 1, 1]


def test_a_single_run_is_a_group_of_one_named_by_its_strategy():
    (group,) = group_runs([run("x", ["scenario=split"], "FedAvg")])
    assert group.label == "FedAvg"
    assert len(group.runs) == 1


# --- Curves and bands -----------------------------------------------------------------------


def test_a_metric_curve_skips_null_values():
    curve = metric_curve(TWO_TASKS, "acc_per_task", task=1)
    assert curve.rounds.tolist() == [4, 5, 6]
    assert curve.values.tolist() == [0.4, 0.6, 0.9]

    records = [record(1, 0, [0.5], train_loss=None), record(2, 0, [0.6], train_loss=0.3)]
    assert metric_curve(records, "train_loss").rounds.tolist() == [2]
    assert metric_curve(records).values.tolist() == [0.5, 0.6]
    assert metric_curve(TWO_TASKS, "acc_per_task", task=5).rounds.size == 0


def test_an_unknown_or_list_metric_is_an_error_that_lists_the_metrics():
    with pytest.raises(PlotError, match=r"unknown metric 'acc'; .*acc_seen, .*train_loss"):
        metric_curve(TWO_TASKS, "acc")
    with pytest.raises(PlotError, match="--task"):
        metric_curve(TWO_TASKS, "acc_per_task")


def test_the_seed_band_is_the_mean_min_and_max_on_the_rounds_every_seed_has():
    curves = [
        Curve(np.array([1, 2, 3, 4]), np.array([0.1, 0.2, 0.3, 0.4])),
        Curve(np.array([2, 4, 6]), np.array([0.4, 0.6, 0.8])),
        Curve(np.array([2, 3, 4]), np.array([0.3, 0.5, 0.2])),
    ]
    band = seed_band(curves)

    assert band.rounds.tolist() == [2, 4]
    np.testing.assert_allclose(band.mean, [0.3, 0.4])
    np.testing.assert_allclose(band.low, [0.2, 0.2])
    np.testing.assert_allclose(band.high, [0.4, 0.6])
    with pytest.raises(PlotError, match="no evaluated round in common"):
        seed_band([Curve(np.array([1]), np.array([0.5])), Curve(np.array([2]), np.array([0.5]))])


def test_a_group_band_averages_its_runs_and_errors_name_the_run():
    other = [dict(r, acc_seen=r["acc_seen"] + 0.2) for r in TWO_TASKS[:4]]  # stopped at round 4
    (group,) = group_runs([run("a", ["seed=0"]), Run(Path("/runs/b"), other, ("seed=1",))])
    band = group_band(group)

    assert band.rounds.tolist() == [1, 2, 3, 4]
    np.testing.assert_allclose(band.mean, [0.6, 0.8, 0.9, 0.6])
    np.testing.assert_allclose(band.high - band.low, [0.2] * 4)
    with pytest.raises(PlotError, match=r"/runs/a: .* acc_per_task\[2\]"):
        group_band(group, "acc_per_task", task=2)


# --- Matrices, task boundaries, labels ------------------------------------------------------


def test_the_mean_matrix_ignores_nan_and_stays_nan_where_every_seed_is():
    matrices = [np.array([[0.8, NAN], [0.4, 0.9]]), np.array([[0.6, NAN], [NAN, 0.7]])]
    np.testing.assert_allclose(mean_matrix(matrices), [[0.7, NAN], [0.4, 0.8]])
    with pytest.raises(PlotError, match="different shapes"):
        mean_matrix([np.zeros((1, 1)), np.zeros((2, 2))])


def test_task_segments_end_half_a_round_after_each_tasks_last_evaluation():
    records = [record(r, t, [0.5]) for r, t in [(2, 0), (4, 0), (6, 1), (8, 1), (10, 2)]]
    assert task_segments(records) == [(0, 1.5, 4.5), (1, 4.5, 8.5), (2, 8.5, 10.5)]
    assert task_segments(TWO_TASKS[:3]) == [(0, 0.5, 3.5)]


def test_end_labels_are_spread_at_least_a_gap_apart_within_bounds():
    assert spread_labels([0.5, 0.1, 0.9], gap=0.1, low=0.0, high=1.0) == [0.5, 0.1, 0.9]
    np.testing.assert_allclose(spread_labels([0.52, 0.5, 0.5], gap=0.1, low=0.0, high=1.0), [0.7, 0.5, 0.6])
    np.testing.assert_allclose(spread_labels([1.0, 0.98, 0.0], gap=0.1, low=0.05, high=1.0), [1.0, 0.9, 0.05])


# --- Drawing and the command line -----------------------------------------------------------


def png_size(path: Path) -> tuple[int, int]:
    """Width and height of a PNG, after checking its signature."""
    data = path.read_bytes()
    assert data[:8] == b"\x89PNG\r\n\x1a\n"
    assert len(data) > 10_000  # lines, labels and text, not an empty canvas
    return struct.unpack(">II", data[16:24])


@pytest.mark.parametrize("records", [TWO_TASKS, TWO_TASKS[:3]], ids=["two tasks", "one task"])
def test_the_forgetting_plot_is_written(tmp_path, records):
    out = tmp_path / "plots" / "forgetting.png"
    plot_forgetting(records, out, title="split / FedAvg")
    assert png_size(out) == (840, 480)


@pytest.fixture
def figure():
    """:func:`forgetting_figure`, its figures closed after the test."""
    figures = []

    def build(records: list[dict[str, Any]]) -> plt.Figure:
        figures.append(forgetting_figure(records, title="split / FedAvg"))
        return figures[-1]

    yield build
    for fig in figures:
        plt.close(fig)


def data_lines(ax: plt.Axes) -> dict[str, tuple[list[float], list[float], str, str]]:
    """The axes' data lines by label (task boundaries have none): x, y, line style, colour."""
    return {
        line.get_label(): (line.get_xdata().tolist(), line.get_ydata().tolist(), line.get_linestyle(), line.get_color())
        for line in ax.lines
        if not line.get_label().startswith("_")
    }


def test_without_probes_the_forgetting_figure_is_the_head_panel_alone(figure):
    assert probe_records(TWO_TASKS) == []
    (ax,) = figure(TWO_TASKS).axes
    lines = data_lines(ax)
    assert list(lines) == ["task 0", "task 1"]
    assert lines["task 0"][:3] == ([1, 2, 3, 4, 5, 6], [0.5, 0.7, 0.8, 0.6, 0.5, 0.4], "-")
    assert lines["task 1"][:3] == ([4, 5, 6], [0.4, 0.6, 0.9], "-")
    assert ax.get_title() == "split / FedAvg"
    assert [t.get_text() for t in ax.texts] == ["task 0", "task 1"]  # end labels


def test_probes_add_a_representation_panel_of_head_probe_and_ncm_per_task(figure, tmp_path):
    head, right = figure(PROBED_AT_TASK_ENDS).axes

    # The left panel is the one drawn without probes.
    assert data_lines(head) == data_lines(figure(TWO_TASKS).axes[0])
    assert head.get_title() == "split / FedAvg"
    assert right.get_title() == "representation (global encoder)"
    assert (right.get_xlabel(), right.get_ylabel()) == ("round", "test accuracy")
    assert right.get_ylim() == head.get_ylim() and right.get_xlim() == head.get_xlim()

    colour = {task: data_lines(head)[f"task {task}"][3] for task in (0, 1)}
    assert colour[0] != colour[1]
    expected = {  # label: rounds, accuracies, line style, colour of the task in the left panel
        "task 0 head": ([3, 6], [0.8, 0.4], "-", colour[0]),
        "task 1 head": ([6], [0.9], "-", colour[1]),
        "task 0 linear probe": ([3, 6], [0.85, 0.75], "--", colour[0]),
        "task 1 linear probe": ([6], [0.92], "--", colour[1]),
        "task 0 nearest class mean": ([3, 6], [0.8, 0.7], ":", colour[0]),
        "task 1 nearest class mean": ([6], [0.88], ":", colour[1]),
    }
    assert data_lines(right) == expected
    assert all(
        line.get_marker() not in ("None", "", None) for line in right.lines if not line.get_label().startswith("_")
    )  # a one-point line still shows
    legend = right.get_legend()
    assert [t.get_text() for t in legend.get_texts()] == ["head", "linear probe", "nearest class mean"]
    assert [h.get_linestyle() for h in legend.legend_handles] == ["-", "--", ":"]
    # Task boundaries are marked on both panels: the dashed line between rounds 3 and 4.
    for ax in (head, right):
        assert [line.get_xdata()[0] for line in ax.lines if line.get_label().startswith("_")] == [3.5]

    out = tmp_path / "plots" / "forgetting.png"
    plot_forgetting(PROBED_AT_TASK_ENDS, out, title="split / FedAvg")
    assert png_size(out) == (1560, 480)


def test_probe_lines_are_drawn_only_at_the_rounds_that_were_probed(figure):
    # Probed at rounds 2 and 5; the NCM only at round 5, task 1's probe missing at round 5.
    records = [*TWO_TASKS]
    records[1] = probed(records[1], [0.65, None])
    records[4] = probed(records[4], [0.7, None], [0.55, 0.5])
    assert [r["round"] for r in probe_records(records)] == [2, 5]

    lines = data_lines(figure(records).axes[1])
    assert {label: xy[:2] for label, xy in lines.items()} == {
        "task 0 head": ([2, 5], [0.7, 0.5]),
        "task 1 head": ([5], [0.6]),
        "task 0 linear probe": ([2, 5], [0.65, 0.7]),
        "task 0 nearest class mean": ([5], [0.55]),
        "task 1 nearest class mean": ([5], [0.5]),
    }


def test_without_ncm_the_legend_names_only_the_drawn_styles(figure):
    records = [*TWO_TASKS[:5], probed(TWO_TASKS[5], [0.75, 0.92])]
    right = figure(records).axes[1]
    assert [t.get_text() for t in right.get_legend().get_texts()] == ["head", "linear probe"]
    assert {style for _, _, style, _ in data_lines(right).values()} == {"-", "--"}


def plot_cli(*args: str) -> subprocess.CompletedProcess:
    """``python -m simulator.plot ARGS``."""
    return run_module("simulator.plot", *args)


@pytest.fixture
def sweep(tmp_path) -> Path:
    """A multirun directory: FedAvg and FedAdam, two seeds each, two tasks."""
    root = tmp_path / "multirun"
    for job, (name, target) in enumerate([("fedavg", "FedAvg"), ("fedadam", "FedAdam")] * 2):
        seed = job // 2
        shifted = [dict(r, acc_seen=r["acc_seen"] + 0.05 * job) for r in TWO_TASKS]
        write_run(
            root / f"{job}_seed={seed},strategy={name}",
            shifted,
            [f"seed={seed}", f"strategy={name}"],
            f"flwr.serverapp.strategy.{target}",
            matrix=[[0.8, NAN], [0.4 + 0.1 * seed, 0.9]],
        )
    (root / "multirun.yaml").write_text("{}\n")
    return root


@pytest.mark.slow
def test_the_cli_overlays_groups_and_draws_heatmaps(sweep, tmp_path):
    modes = [([], "overlay.png"), (["--task", "0"], "task0.png"), (["--heatmap"], "heatmap.png")]
    for args, name in modes:
        out = tmp_path / "figures" / name
        result = plot_cli(str(sweep), "--out", str(out), *args)
        assert result.returncode == 0, result.stderr
        assert result.stdout.strip() == str(out)
        width, height = png_size(out)
        assert width >= 600 and height >= 300


@pytest.mark.slow
def test_the_cli_exits_2_naming_a_path_without_runs_or_an_unknown_metric(sweep, tmp_path):
    missing = tmp_path / "no_such_run"
    result = plot_cli(str(sweep), str(missing), "--out", str(tmp_path / "x.png"))
    assert result.returncode == 2
    assert str(missing) in result.stderr

    result = plot_cli(str(sweep), "--metric", "accuracy", "--out", str(tmp_path / "x.png"))
    assert result.returncode == 2
    assert "unknown metric 'accuracy'" in result.stderr and str(sweep) in result.stderr
    assert not (tmp_path / "x.png").exists()


# --- Words for readers, bands, titles and labels --------------------------------------------


def test_metrics_are_named_in_words_and_unknown_keys_as_they_are():
    assert metric_label("acc_seen") == "accuracy on seen tasks"
    assert metric_label("train_loss") == "training loss"
    assert metric_label("client_acc_mean") == "mean client accuracy"
    assert metric_label("wall_s") == "wall time (s)"
    assert metric_label("uplink_mb") == "sent by clients so far (MiB)"
    assert metric_label("probe_acc_seen") == "accuracy on seen tasks (linear probe)"
    assert metric_label("ncm_acc_seen") == "accuracy on seen tasks (nearest class mean)"
    assert metric_label("acc_per_task", task=2) == "accuracy on task 2"
    assert metric_label("probe_acc_per_task", task=0) == "accuracy on task 0 (linear probe)"
    assert metric_label("my_metric") == "my_metric"
    assert metric_label("probe_thing") == "probe_thing"
    assert metric_label("my_list", task=1) == "my_list[1]"
    assert metric_label("nc1") == "within-class variability (NC1)"


def shifted(offset: float) -> list[dict[str, Any]]:
    """TWO_TASKS with ``offset`` added to acc_seen."""
    return [dict(r, acc_seen=r["acc_seen"] + offset) for r in TWO_TASKS]


# Three seeds of one setting, acc_seen offset by 0, 0.1 and 0.3: the mean is offset by 0.4/3,
# the sample standard deviation (ddof=1) is sqrt(((0.4/3)^2 + (0.1/3)^2 + (0.5/3)^2) / 2).
OFFSETS = [0.0, 0.1, 0.3]
MEAN_OFFSET = 0.4 / 3
SAMPLE_STD = math.sqrt(((0.4 / 3) ** 2 + (0.1 / 3) ** 2 + (0.5 / 3) ** 2) / 2)
ACC_SEEN = [r["acc_seen"] for r in TWO_TASKS]


def three_seeds() -> list[Run]:
    return [
        Run(Path(f"/runs/{seed}"), shifted(offset), (f"seed={seed}", "strategy=fot"), "FOT")
        for seed, offset in enumerate(OFFSETS)
    ]


def test_the_std_band_is_the_mean_plus_minus_the_sample_standard_deviation():
    curves = [Curve(np.array([1, 2]), np.array([0.5, 0.2]) + o) for o in OFFSETS]
    band = seed_band(curves, "std")
    np.testing.assert_allclose(band.mean, [0.5 + MEAN_OFFSET, 0.2 + MEAN_OFFSET])
    np.testing.assert_allclose(band.high - band.mean, [SAMPLE_STD] * 2)
    np.testing.assert_allclose(band.mean - band.low, [SAMPLE_STD] * 2)
    one = seed_band(curves[:1], "std")
    np.testing.assert_array_equal(one.low, one.high)


@pytest.fixture
def close_figures():
    """Figures handed to ``keep`` are closed after the test."""
    figures: list[plt.Figure] = []
    yield lambda fig: figures.append(fig) or fig
    for fig in figures:
        plt.close(fig)


def band_extent(ax: plt.Axes) -> tuple[list[float], list[float]]:
    """The lowest and highest y of the axes' one shaded band at each of its x, x ascending."""
    (shade,) = ax.collections
    vertices = shade.get_paths()[0].vertices
    xs = sorted(set(vertices[:, 0].tolist()))
    return ([vertices[vertices[:, 0] == x, 1].min() for x in xs], [vertices[vertices[:, 0] == x, 1].max() for x in xs])


def test_the_overlay_shades_the_band_asked_for_and_says_which(close_figures):
    (group,) = group_runs(three_seeds())
    mean = np.array(ACC_SEEN) + MEAN_OFFSET
    for band, low, high, shading in [
        ("std", mean - SAMPLE_STD, mean + SAMPLE_STD, "± one standard deviation"),
        ("minmax", np.array(ACC_SEEN), np.array(ACC_SEEN) + 0.3, "min..max"),
    ]:
        fig = close_figures(overlay_figure([group], band=band))
        (ax,) = fig.axes
        np.testing.assert_allclose(band_extent(ax), [low, high])
        np.testing.assert_allclose(data_lines(ax)["FOT  (3 seeds)"][1], mean)
        assert fig.legends[0].get_title().get_text() == f"mean over seeds, shaded {shading}"


def test_titles_name_what_differs_in_words_and_the_shared_overrides_below(close_figures):
    runs = [
        run(f"{i}", [f"seed={i}", f"strategy={s}", f"client.method={m}", "rounds=6"], c)
        for i, (s, c, m) in enumerate([("fedavg", "FedAvg", "sgd"), ("fot", "FOT", "replay")])
    ]
    groups = group_runs(runs)
    assert [g.label for g in groups] == ["FedAvg client.method=sgd", "FOT client.method=replay"]
    assert describe(groups, "training loss") == ("training loss by strategy, client method\nrounds=6")

    (ax,) = close_figures(overlay_figure(groups, "train_loss")).axes
    assert ax.get_ylabel() == "training loss"
    assert ax.get_title() == "training loss by strategy, client method\nrounds=6"
    (ax,) = close_figures(overlay_figure(groups, HEAD_TASK, task=1, title="Split digits")).axes
    assert (ax.get_ylabel(), ax.get_title()) == ("accuracy on task 1", "Split digits")

    heads = group_runs([run(str(i), [f"model.head={h}"], "FedAvg") for i, h in enumerate(["linear", "etf"])])
    assert describe(heads, "accuracy matrix") == "accuracy matrix by head"


def test_the_cka_figure_annotates_each_pair_of_task_ends(close_figures):
    fig = close_figures(cka_figure(np.array([[1.0, 0.8], [0.8, 1.0]]), title="run"))
    ax = fig.axes[0]
    assert sorted(text.get_text() for text in ax.texts) == ["0.80", "0.80", "1.00", "1.00"]
    assert (ax.get_xlabel(), ax.get_ylabel(), ax.get_title()) == ("end of task j", "end of task i", "run")


def test_labels_replace_the_group_names_one_per_group_in_order(close_figures, tmp_path):
    groups = relabel(
        group_runs([run("a", ["seed=0", "strategy=fedavg"], "FedAvg"), run("b", ["seed=0", "strategy=fot"], "FOT")]),
        ["plain averaging", "orthogonal"],
    )
    assert [g.label for g in groups] == ["plain averaging", "orthogonal"]
    fig = close_figures(overlay_figure(groups))
    assert [t.get_text() for t in fig.legends[0].get_texts()] == ["plain averaging", "orthogonal"]
    with pytest.raises(
        PlotError,
        match=r"1 --label for 2 groups \(plain averaging; "
        r"orthogonal\)",
    ):
        relabel(groups, ["one"])

    for name in "ab":
        write_run(tmp_path / name, TWO_TASKS, matrix=[[0.8, NAN], [0.4, 0.9]])
    fig = close_figures(
        heatmap_figure(relabel(group_runs([read_run(tmp_path / n) for n in "ab"]), ["A", "B"]), title="R")
    )
    assert fig.get_suptitle() == "R"
    assert [ax.get_title() for ax in fig.axes[:2]] == ["A", "B"]


@pytest.mark.slow
def test_the_cli_takes_band_title_and_labels_and_exits_2_on_a_wrong_label_count(sweep, tmp_path):
    out = tmp_path / "std.png"
    result = plot_cli(
        str(sweep),
        "--out",
        str(out),
        "--band",
        "std",
        "--title",
        "Digits",
        "--label",
        "averaging",
        "--label",
        "adaptive",
    )
    assert result.returncode == 0, result.stderr
    assert png_size(out)[0] >= 600

    result = plot_cli(str(sweep), "--out", str(tmp_path / "x.png"), "--label", "only one")
    assert result.returncode == 2
    assert "1 --label for 2 groups (FedAvg; FedAdam): give one per group" in result.stderr
    assert not (tmp_path / "x.png").exists()


# --- Command-line arguments it cannot take: one error line naming them, before any work ---------


def plot_fails(capsys, *args: str | Path) -> str:
    """The one ``error:`` line of ``python -m simulator.plot ARGS`` (in this process), which exits 2."""
    with pytest.raises(SystemExit) as exit_:
        plot_main([str(a) for a in args])
    assert exit_.value.code == 2
    return one_error_line(capsys.readouterr().err)


@pytest.mark.parametrize(
    "out, names",
    [
        ("runs.xyz", ["argument --out", "runs.xyz", "'.xyz'", ".png", ".pdf"]),
        ("runs", ["argument --out", "runs", "no image format", ".png"]),
        ("", ["argument --out", "''", "an image file"]),
        ("folder", ["argument --out", "folder", "a folder"]),
        ("notes.txt/runs.png", ["argument --out", "notes.txt", "a file, not a folder"]),
        ("a" * 300 + ".png", ["argument --out", "File name too long"]),
    ],
)
def test_an_out_it_cannot_write_exits_2_naming_it_and_reads_no_run(tmp_path, capsys, monkeypatch, out, names):
    run = write_run(tmp_path / "run", TWO_TASKS)
    (tmp_path / "folder").mkdir()
    (tmp_path / "notes.txt").write_text("notes\n")
    monkeypatch.chdir(tmp_path)
    read = []
    monkeypatch.setattr("simulator.plot.read_run", lambda path: read.append(path))
    line = plot_fails(capsys, run, "--out", out)
    assert all(name in line for name in names), line
    assert not read  # refused before any run is read
    assert sorted(p.name for p in tmp_path.iterdir()) == ["folder", "notes.txt", "run"]


def test_a_run_dir_that_is_a_file_or_a_name_too_long_exits_2_naming_it(tmp_path, capsys):
    run = write_run(tmp_path / "run", TWO_TASKS)
    line = plot_fails(capsys, run / "metrics.jsonl", "--out", tmp_path / "x.png")
    assert f"{run / 'metrics.jsonl'}: a file, not a run directory; give its folder {run}" in line, line
    line = plot_fails(capsys, tmp_path / ("a" * 300), "--out", tmp_path / "x.png")
    assert "File name too long" in line, line
    assert not (tmp_path / "x.png").exists()


def test_a_negative_task_exits_2_naming_the_option(tmp_path, capsys):
    run = write_run(tmp_path / "run", TWO_TASKS)
    line = plot_fails(capsys, run, "--task", "-1", "--out", tmp_path / "x.png")
    assert "argument --task: '-1': expected a task index, 0 or more" in line, line


@pytest.mark.parametrize(
    "text, says",
    [
        (b'{"round": 1, "task": 0, "acc_seen": \xff}\n', "not one JSON object a line"),
        (b"[1, 2]\n", "line 1 is not a JSON object"),
        (b'{"task": 0, "acc_seen": 0.5}\n', "line 1 has no whole-number 'round'"),
    ],
)
def test_a_metrics_file_it_cannot_read_exits_2_naming_it(tmp_path, capsys, text, says):
    run = write_run(tmp_path / "run", TWO_TASKS)
    (run / "metrics.jsonl").write_bytes(text)
    line = plot_fails(capsys, run, "--out", tmp_path / "x.png")
    assert f"{run / 'metrics.jsonl'}: {says}" in line, line


def test_a_full_disk_under_out_exits_with_one_error_line_naming_the_file(tmp_path, capsys):
    """On a 64 KiB file system of its own (a tmpfs: mounting one needs root, so skipped where refused)."""
    run = write_run(tmp_path / "run", TWO_TASKS)
    with small_file_system(tmp_path / "disk", "64k") as disk:
        fill_leaving(disk, 4096)
        line = plot_fails(capsys, run, "--out", disk / "runs.png")
    assert line.endswith(f"error: argument --out: no space left on device writing {disk / 'runs.png'}"), line
