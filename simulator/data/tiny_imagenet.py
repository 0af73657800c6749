"""Tiny-ImageNet (200 classes of 64x64 colour images) from its folder as unzipped, at ``data.path``.

The official ``tiny-imagenet-200.zip`` unzips to ``tiny-imagenet-200/``: ``wnids.txt``
(the 200 WordNet ids, one a line: label ``i`` is line ``i``), ``train/<wnid>/images/*.JPEG``
(500 a class) and ``val/images/*.JPEG`` with ``val/val_annotations.txt`` (file name, wnid,
box, tab-separated), which is the test split here: ``test/`` has no labels and is not read.
"""

from __future__ import annotations

from collections import Counter
from pathlib import Path

import numpy as np
from PIL import Image
from tqdm import tqdm

from simulator.config import ConfigError
from simulator.data.dataset import Dataset
from simulator.data.files import FolderSource, _existing_path, _inputs, _malformed, _member

TINY_IMAGENET_URL = "http://cs231n.stanford.edu/tiny-imagenet-200.zip"
_EXPECTED = (
    f"the folder tiny-imagenet-200 (wnids.txt, train/, val/): download {TINY_IMAGENET_URL}, unzip it "
    "and pass data.path=.../tiny-imagenet-200"
)
_SIDE = 64


def _wnids(folder: Path) -> list[str]:
    """The class ids in label order, from ``wnids.txt``."""
    file = folder / "wnids.txt"
    if not file.is_file():
        raise ConfigError(
            f"data.path: {folder.resolve()} has no file 'wnids.txt'; data.dataset = 'tiny_imagenet' reads {_EXPECTED}"
        )
    wnids = file.read_text().split()
    if not wnids:
        raise _malformed(file, "no wnids: expected one class id (e.g. n01443537) a line")
    repeated = sorted(wnid for wnid, count in Counter(wnids).items() if count > 1)
    if repeated:
        raise _malformed(file, f"wnids listed more than once: {', '.join(repeated)}")
    return wnids


def _train_files(folder: Path, wnids: list[str]) -> tuple[list[Path], np.ndarray]:
    """Every ``train/<wnid>/images/*.JPEG``, class by class in ``wnids`` order, and their labels."""
    train = folder / "train"
    if not train.is_dir():
        raise ConfigError(f"data.path: {folder.resolve()} has no folder 'train' (train/<wnid>/images/*.JPEG)")
    files, labels = [], []
    for label, wnid in enumerate(wnids):
        images = sorted((train / wnid / "images").glob("*.JPEG"))
        if not images:
            raise ConfigError(
                f"data.path: {(train / wnid / 'images').resolve()} holds no .JPEG images for {wnid}, "
                f"line {label + 1} of wnids.txt"
            )
        files += images
        labels += [label] * len(images)
    return files, np.array(labels, dtype=np.int64)


def _val_files(folder: Path, wnids: list[str]) -> tuple[list[Path], np.ndarray]:
    """The images ``val/val_annotations.txt`` names, in its order, and their labels (its wnids' lines)."""
    annotations = _member(folder / "val", "val_annotations.txt")
    label_of = {wnid: label for label, wnid in enumerate(wnids)}
    files, labels = [], []
    for number, line in enumerate(annotations.read_text().splitlines(), start=1):
        if not line.strip():
            continue
        fields = line.split("\t")
        if len(fields) < 2:
            raise _malformed(annotations, f"line {number}: expected a file name, a wnid and a box, tab-separated")
        name, wnid = fields[0], fields[1]
        if wnid not in label_of:
            raise _malformed(annotations, f"line {number}: wnid {wnid!r} is not in wnids.txt")
        image = folder / "val" / "images" / name
        if not image.is_file():
            raise _malformed(annotations, f"line {number} names {name}, but there is no file {image}")
        files.append(image)
        labels.append(label_of[wnid])
    if not files:
        raise _malformed(annotations, "names no images")
    return files, np.array(labels, dtype=np.int64)


def _pixels(file: Path) -> np.ndarray:
    """One image as (3, 64, 64) uint8; a greyscale one (a few of the official ones are) is made RGB."""
    try:
        with Image.open(file) as image:
            if image.size != (_SIDE, _SIDE):
                width, height = image.size
                raise _malformed(file, f"{width}x{height} pixels; Tiny-ImageNet's images are {_SIDE}x{_SIDE}")
            rgb = np.asarray(image.convert("RGB"))
    except OSError as error:
        raise _malformed(file, f"not a readable image ({error})") from None
    return rgb.transpose(2, 0, 1)


def _decoded(files: list[Path], split: str) -> np.ndarray:
    """``files`` decoded into one (N, 3, 64, 64) uint8 array, with a progress bar (110,000 images take a while)."""
    images = np.empty((len(files), 3, _SIDE, _SIDE), dtype=np.uint8)
    for index, file in enumerate(tqdm(files, desc=f"tiny_imagenet {split}", unit="image", dynamic_ncols=True)):
        images[index] = _pixels(file)
    return images


def load_tiny_imagenet(path: str | None, scale: float | None = None) -> Dataset:
    """Tiny-ImageNet's train split and, as the test split, its labelled val split, as (N, 3, 64, 64).

    The val split is read first: a problem with it shows before the 100,000 training images are decoded.
    """
    folder = _existing_path(path, "tiny_imagenet", _EXPECTED)
    wnids = _wnids(folder)
    (train, y_train), (val, y_test) = _train_files(folder, wnids), _val_files(folder, wnids)
    x_test = _decoded(val, "val")
    x_train, x_test = _inputs(folder, scale, _decoded(train, "train"), x_test)
    return Dataset("tiny_imagenet", x_train, y_train, x_test, y_test, num_classes=len(wnids))


class TinyImageNetFiles(FolderSource):
    """Tiny-ImageNet's folder ``tiny-imagenet-200``, as unzipped, at ``data.path``."""

    section, reader = "tiny_imagenet", staticmethod(load_tiny_imagenet)
