"""Every shipped scenario file validates and runs a couple of rounds on its data."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest
from helpers import ROOT, cifar_images, compose_run, read_metrics, run_experiment, write_idx_files, write_pickle
from PIL import Image

from simulator.data.embedded import load_digits, load_mnist5k

SCENARIOS = sorted(p.stem for p in (ROOT / "scenarios" / "scenario").glob("*.yaml"))


def mnist_folder(folder: Path) -> Path:
    """The 5,000 real MNIST images written as the four standard gzipped idx files."""
    data = load_mnist5k(0.2, np.random.default_rng(0))
    pixels = lambda x: np.round(x[:, 0] * 255).astype(np.uint8)  # noqa: E731
    files = {
        "train-images-idx3-ubyte": pixels(data.x_train),
        "train-labels-idx1-ubyte": data.y_train.astype(np.uint8),
        "t10k-images-idx3-ubyte": pixels(data.x_test),
        "t10k-labels-idx1-ubyte": data.y_test.astype(np.uint8),
    }
    write_idx_files(folder, files, gz=True)
    return folder


def cifar10_folder(folder: Path) -> Path:
    """A small CIFAR-10 python folder: five training batches and a test batch."""
    folder = folder / "cifar-10-batches-py"
    folder.mkdir()
    labels = lambda n, seed: np.random.default_rng(seed).integers(0, 10, n).tolist()  # noqa: E731
    for batch in range(1, 6):
        write_pickle(folder / f"data_batch_{batch}", cifar_images(200, batch), {b"labels": labels(200, batch)})
    write_pickle(folder / "test_batch", cifar_images(100, 9), {b"labels": labels(100, 9)})
    return folder


def npz_file(folder: Path) -> Path:
    digits = load_digits(0.2, np.random.default_rng(0))
    file = folder / "mine.npz"
    np.savez(file, x=digits.x_train[:, 0], y=digits.y_train, x_test=digits.x_test[:, 0], y_test=digits.y_test)
    return file


def cifar100_folder(folder: Path) -> Path:
    """A small cifar-100-python folder: 8 training and 2 test images of each of the 100 classes."""
    folder = folder / "cifar-100-python"
    folder.mkdir()
    for name, per_class, seed in (("train", 8, 1), ("test", 2, 2)):
        labels = [c for c in range(100) for _ in range(per_class)]
        write_pickle(folder / name, cifar_images(len(labels), seed), {b"fine_labels": labels})
    return folder


def tiny_imagenet_folder(folder: Path) -> Path:
    """A small tiny-imagenet-200 folder: 4 classes of 6 training and 2 validation JPEGs of random pixels."""
    root, wnids = folder / "tiny-imagenet-200", [f"n0{i:07d}" for i in range(4)]
    pixels = np.random.default_rng(0).integers(0, 256, (40, 64, 64, 3), dtype=np.uint8)
    (root / "val" / "images").mkdir(parents=True)
    (root / "wnids.txt").write_text("".join(f"{wnid}\n" for wnid in wnids))
    annotations = []
    for label, wnid in enumerate(wnids):
        (root / "train" / wnid / "images").mkdir(parents=True)
        for k in range(6):
            Image.fromarray(pixels[10 * label + k]).save(root / "train" / wnid / "images" / f"{wnid}_{k}.JPEG")
        for k in range(2):
            name = f"val_{2 * label + k}.JPEG"
            Image.fromarray(pixels[10 * label + 6 + k]).save(root / "val" / "images" / name)
            annotations.append(f"{name}\t{wnid}\t0\t0\t63\t63\n")
    (root / "val" / "val_annotations.txt").write_text("".join(annotations))
    return root


DATA_FILES = {
    "mnist_shards": mnist_folder,
    "cifar10": cifar10_folder,
    "npz": npz_file,
    "fashion_class_incremental": mnist_folder,  # Fashion-MNIST's files have MNIST's names and format
    "fashion_permuted": mnist_folder,
}
# The published protocols (ResNets, 100-200 classes): one round of each, shrunk as each file's comment
# says (a subset of the classes, fewer clients), on small files in their distributed formats.
PROTOCOLS = {
    "cifar100_target": (cifar100_folder, ["stream.class_incremental.tasks=[[0,1],[2,3]]"]),
    "cifar100_glfc": (
        cifar100_folder,
        ["stream.class_incremental.tasks=[[0,1,2],[3,4,5]]", "data.partition.classes_per_client=2"],
    ),
    "tinyimagenet_target": (tiny_imagenet_folder, ["stream.class_incremental.tasks=[[0,1],[2,3]]"]),
    "pmnist_fot": (mnist_folder, ["stream.permuted.num_tasks=2"]),
}
SMALL_EVALUATION = ["eval.probe_samples=500", "eval.max_clients=10"]  # probes on 4,000 images would take most
SMALL_DATA = {  # 1,000 images, not 50,000; 5,000, not 70,000
    "cifar10": ["data.partition.min_size=5"],
    "fashion_class_incremental": ["data.partition.min_size=2"],
}


@pytest.mark.parametrize("name", SCENARIOS)
def test_scenario_file_validates_and_says_what_it_simulates(name):
    run = compose_run([f"scenario={name}"])
    assert run.scenario == name
    text = (ROOT / "scenarios" / "scenario" / f"{name}.yaml").read_text()
    comment = [line for line in text.splitlines()[1:] if line.startswith("#")]
    assert len(comment) >= 3, f"{name}.yaml needs a comment block saying what it simulates"


def tiny_budget(name: str) -> tuple[list[str], int]:
    """Overrides that run every task of ``name``'s stream in a round or two, and the rounds."""
    kind = compose_run([f"scenario={name}"]).stream.kind
    if kind == "static":
        return ["rounds=2"], 2
    if kind == "label_shift":
        return ["rounds=3", "stream.label_shift.period=1"], 3
    fast = ["stream.rounds_per_task=1"]
    if kind == "class_incremental":
        fast += ["stream.class_incremental.min_rounds_per_task=1", "stream.class_incremental.max_rounds_per_task=2"]
    return fast, 5  # five tasks in every shipped task stream


@pytest.mark.parametrize("name", [name for name in SCENARIOS if name not in PROTOCOLS])
@pytest.mark.slow
def test_scenario_runs_every_task_on_a_tiny_budget(tmp_path, name):
    budget, rounds = tiny_budget(name)
    overrides = [f"scenario={name}", "engine.backend=local", "client.epochs=1", *budget, *SMALL_EVALUATION]
    if name in DATA_FILES:
        overrides += [f"data.path={DATA_FILES[name](tmp_path)}", *SMALL_DATA.get(name, [])]
    summary = run_experiment(tmp_path / "run", overrides)
    records = read_metrics(tmp_path / "run")
    assert [r["round"] for r in records] == list(range(1, rounds + 1))
    assert all(np.isfinite(r["train_loss"]) for r in records)
    assert 0.0 <= summary["final_accuracy"] <= 1.0
    tasks = len(records[-1]["acc_all_tasks"])
    assert records[-1]["task"] == tasks - 1  # the last task was reached
    assert (tmp_path / "run" / "accuracy_matrix.csv").read_text().count("\n") == tasks + 1


@pytest.mark.parametrize("name", PROTOCOLS)
def test_each_protocol_runs_a_round_shrunk_as_its_file_says(tmp_path, name):
    write_files, shrink = PROTOCOLS[name]
    tiny = ["rounds=1", "client.epochs=1", "client.batch_size=16", "federation.num_clients=8"]
    tiny += ["federation.clients_per_round=2", "eval.probe_samples=50", "engine.backend=local"]
    overrides = [f"scenario={name}", f"data.path={write_files(tmp_path)}", *shrink, *tiny]
    summary = run_experiment(tmp_path / "run", overrides)
    (record,) = read_metrics(tmp_path / "run")
    assert np.isfinite(record["train_loss"]) and 0.0 <= summary["final_accuracy"] <= 1.0
    assert record["uplink_mb"] > 0  # two clients trained and sent their weights


def test_a_scenario_that_reads_files_says_how_to_give_the_path(tmp_path):
    with pytest.raises(Exception, match="set data.path="):
        run_experiment(tmp_path, ["scenario=cifar10", "engine.backend=local"])
