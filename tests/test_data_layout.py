"""A user's ``.npz`` as users store it: channels-last images, labels that are ids, images too small for a model."""

from __future__ import annotations

import tracemalloc
from pathlib import Path

import numpy as np
import pytest
from helpers import read_metrics, run_experiment, timeless_records, without_wall_time

import run as cli
from simulator.config import ConfigError, DataConfig
from simulator.data import load_dataset

SMALL_RUN = ["engine.backend=local", "rounds=1", "federation.num_clients=4", "federation.clients_per_round=2"]


def load(file: Path, seed: int = 0):
    return load_dataset(DataConfig(dataset="npz", path=str(file)), 4, seed)


def images(n: int, height: int, width: int, channels: int, seed: int = 0) -> np.ndarray:
    """``n`` random uint8 images, channels-last (N, H, W, C)."""
    return np.random.default_rng(seed).integers(0, 256, (n, height, width, channels), dtype=np.uint8)


def labels(n: int, num_classes: int = 4) -> np.ndarray:
    return np.arange(n) % num_classes


def layout_notes(caplog) -> list[str]:
    return [r.getMessage() for r in caplog.records if r.name == "fedstream" and "channels" in r.getMessage()]


def cli_error(args: list[str], capsys) -> str:
    """Run the command in this process; assert exit code 2 and one ``error:`` line, and return it."""
    code = cli.main_cli(args)
    captured = capsys.readouterr()
    output = captured.out + captured.err
    assert code == 2, output
    assert "Traceback" not in output, output
    errors = [line for line in captured.err.splitlines() if line.startswith("error: ")]
    assert len(errors) == 1, output
    return errors[0]


# ----- 1. channels-last images -----


@pytest.mark.parametrize("channels", [1, 3, 4])
def test_channels_last_images_are_transposed_to_channels_first_with_a_note(tmp_path, caplog, channels):
    last, last_test = images(24, 8, 6, channels), images(8, 8, 6, channels, seed=1)
    first, first_test = last.transpose(0, 3, 1, 2), last_test.transpose(0, 3, 1, 2)
    np.savez(tmp_path / "last.npz", x=last, y=labels(24), x_test=last_test, y_test=labels(8))
    np.savez(tmp_path / "first.npz", x=first, y=labels(24), x_test=first_test, y_test=labels(8))

    with caplog.at_level("WARNING", logger="fedstream"):
        transposed = load(tmp_path / "last.npz")
    as_stored = load(tmp_path / "first.npz")

    assert transposed.input_shape == as_stored.input_shape == (channels, 8, 6)
    np.testing.assert_array_equal(transposed.x_train, as_stored.x_train)
    np.testing.assert_array_equal(transposed.x_test, as_stored.x_test)
    np.testing.assert_array_equal(transposed.x_train * 255, first)
    assert transposed.x_train.flags.c_contiguous
    [note] = layout_notes(caplog)  # one note for the file, not one per split
    assert "data.path" in note and str(tmp_path / "last.npz") in note
    assert str((24, 8, 6, channels)) in note and str((24, channels, 8, 6)) in note
    assert "\n" not in note


def test_channels_last_is_split_by_class_like_channels_first(tmp_path):
    last = images(40, 6, 6, 3)
    np.savez(tmp_path / "last.npz", x=last, y=labels(40))
    np.savez(tmp_path / "first.npz", x=last.transpose(0, 3, 1, 2), y=labels(40))
    transposed, as_stored = load(tmp_path / "last.npz"), load(tmp_path / "first.npz")
    np.testing.assert_array_equal(transposed.x_train, as_stored.x_train)
    np.testing.assert_array_equal(transposed.x_test, as_stored.x_test)
    np.testing.assert_array_equal(transposed.y_test, as_stored.y_test)


def test_channels_first_images_are_kept_without_a_note(tmp_path, caplog):
    first = images(12, 3, 8, 8)  # (N, 3, 8, 8): axis 3 is 8, not a channel count
    np.savez(tmp_path / "first.npz", x=first, y=labels(12))
    with caplog.at_level("WARNING", logger="fedstream"):
        ds = load(tmp_path / "first.npz")
    assert ds.input_shape == (3, 8, 8)
    assert not layout_notes(caplog)


def test_an_ambiguous_shape_is_read_channels_first_and_the_note_says_it_cannot_tell(tmp_path, caplog):
    x = images(12, 3, 8, 4)  # (N, 3, 8, 4): 3 channels of 8x4, or 4 channels of 3x8
    np.savez(tmp_path / "both.npz", x=x, y=labels(12))
    with caplog.at_level("WARNING", logger="fedstream"):
        ds = load(tmp_path / "both.npz")
    assert ds.input_shape == (3, 8, 4)
    np.testing.assert_array_equal(np.concatenate([ds.x_train, ds.x_test]).shape, (12, 3, 8, 4))
    [note] = layout_notes(caplog)
    assert "cannot tell" in note and str(tmp_path / "both.npz") in note and str((12, 3, 8, 4)) in note


def test_a_cnn_trains_on_channels_last_cifar_shaped_data_as_on_channels_first(tmp_path):
    x, x_test = images(48, 32, 32, 3), images(16, 32, 32, 3, seed=1)
    np.savez(tmp_path / "last.npz", x=x, y=labels(48), x_test=x_test, y_test=labels(16))
    first = {"x": x.transpose(0, 3, 1, 2), "x_test": x_test.transpose(0, 3, 1, 2)}
    np.savez(tmp_path / "first.npz", **first, y=labels(48), y_test=labels(16))
    runs = {}
    for name in ("last", "first"):
        overrides = ["scenario=npz", "data.dataset=npz", f"data.path={tmp_path / name}.npz", "model.name=cnn"]
        summary = run_experiment(tmp_path / name, [*overrides, *SMALL_RUN])
        assert summary["rounds"] == 1 and len(read_metrics(tmp_path / name)) == 1
        runs[name] = (without_wall_time(summary), timeless_records(tmp_path / name))
    assert runs["last"] == runs["first"]  # the same images, so the same seeded run


@pytest.mark.parametrize("channels", [3, 4])
def test_the_command_runs_a_cnn_on_channels_last_data(tmp_path, capsys, channels):
    file = tmp_path / "last.npz"
    np.savez(file, x=images(48, 32, 32, channels), y=labels(48))
    args = ["scenario=npz", f"data.path={file}", "model.name=cnn", *SMALL_RUN, f"hydra.run.dir={tmp_path / 'run'}"]
    code = cli.main_cli(args)
    output = capsys.readouterr()
    assert code == 0, output.out + output.err
    assert (tmp_path / "run" / "metrics.jsonl").read_text()


# ----- 2. a model that cannot take the data's shape -----


@pytest.mark.parametrize("shape", [(3, 3), (2, 8), (8, 3), (1, 2, 2)])
def test_a_cnn_on_images_too_small_to_pool_twice_exits_2_naming_the_model_and_shape(tmp_path, capsys, shape):
    x = np.random.default_rng(0).random((40, *shape)).astype(np.float32)
    np.savez(tmp_path / "small.npz", x=x, y=labels(40))
    args = ["scenario=npz", f"data.path={tmp_path / 'small.npz'}", "model.name=cnn", *SMALL_RUN]
    error = cli_error([*args, f"hydra.run.dir={tmp_path / 'run'}"], capsys)
    image = (1, *shape) if len(shape) == 2 else shape
    assert "model.name" in error and "cnn" in error and str(image) in error
    metrics = tmp_path / "run" / "metrics.jsonl"
    assert not metrics.exists() or not metrics.read_text()  # no round ran


def test_a_cnn_on_vectors_exits_2_naming_the_model_and_shape(tmp_path, capsys):
    np.savez(tmp_path / "vectors.npz", x=np.zeros((40, 6), np.float32), y=labels(40))
    args = ["scenario=npz", f"data.path={tmp_path / 'vectors.npz'}", "model.name=cnn", *SMALL_RUN]
    error = cli_error([*args, f"hydra.run.dir={tmp_path / 'run'}"], capsys)
    assert "model.name" in error and "cnn" in error and "(6,)" in error


# ----- 3. labels that are not 0 .. C-1 -----

LABEL_IDS = {
    "1-based": (np.arange(1, 11).repeat(4), "1 .. 10, 10 distinct"),
    "sparse ids": (np.array([3, 7, 42] * 10), "3 .. 42, 3 distinct"),
    "a huge label": (np.array([0, 1] * 10 + [2**40]), f"0 .. {2**40}, 3 distinct"),
    "one huge id": (np.array([2**40] * 10 + [2**40 + 1] * 10), f"{2**40} .. {2**40 + 1}, 2 distinct"),
}


@pytest.mark.parametrize("name", list(LABEL_IDS))
def test_labels_that_are_ids_not_class_indices_are_refused(tmp_path, name):
    y, found = LABEL_IDS[name]
    file = tmp_path / "ids.npz"
    np.savez(file, x=np.zeros((len(y), 3), np.float32), y=y)
    tracemalloc.start()
    try:
        with pytest.raises(ConfigError, match="data.path") as error:
            load(file)
        peak = tracemalloc.get_traced_memory()[1]
    finally:
        tracemalloc.stop()
    message = str(error.value)
    assert str(file) in message and found in message
    assert "0 .. C-1" in message and "C = largest label + 1" in message
    assert peak < 50 * 2**20  # nothing the size of the largest label is allocated


def test_label_ids_split_between_train_and_test_are_counted_together(tmp_path):
    file = tmp_path / "ids.npz"
    np.savez(file, x=np.zeros((6, 3)), y=[1, 2, 1, 2, 1, 2], x_test=np.zeros((2, 3)), y_test=[40, 41])
    with pytest.raises(ConfigError, match="1 .. 41, 4 distinct"):
        load(file)


def test_negative_labels_are_still_refused_as_before(tmp_path):
    file = tmp_path / "negative.npz"
    np.savez(file, x=np.zeros((6, 3)), y=[-1, 0, 1, -1, 0, 1])
    with pytest.raises(ConfigError, match=r"data.path.*labels must be >= 0, got -1 \.\. 1"):
        load(file)


def test_uint64_labels_beyond_int64_are_refused_not_wrapped(tmp_path):
    file = tmp_path / "uint64.npz"
    np.savez(file, x=np.zeros((4, 3)), y=np.array([0, 1, 0, 2**63 + 5], dtype=np.uint64))
    with pytest.raises(ConfigError, match="data.path"):
        load(file)


@pytest.mark.parametrize(
    "y",
    [
        [0, 1, 3, 4] * 5,  # a class absent (held out, or only in another file): still indices
        [0, 2] * 10,  # two of 0 .. 2
        [0, 1, 2, 3, 9, 9, 0, 1, 2, 3] * 2,  # five of ten
    ],
)
def test_class_indices_with_some_classes_absent_are_kept(tmp_path, y):
    file = tmp_path / "gaps.npz"
    np.savez(file, x=np.zeros((len(y), 3), np.float32), y=np.array(y))
    ds = load(file)
    assert ds.num_classes == max(y) + 1


def test_the_command_refuses_label_ids_with_exit_2(tmp_path, capsys):
    file = tmp_path / "ids.npz"
    np.savez(file, x=np.zeros((40, 3), np.float32), y=np.arange(1, 11).repeat(4))
    error = cli_error(["scenario=npz", f"data.path={file}", *SMALL_RUN, f"hydra.run.dir={tmp_path / 'run'}"], capsys)
    assert "data.path" in error and str(file) in error and "1 .. 10, 10 distinct" in error
