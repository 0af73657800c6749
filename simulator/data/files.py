"""Datasets read from files the user already has, at ``data.path``; nothing is downloaded.

Every problem with the path or the files is a :class:`ConfigError` that names
``data.path``, the file and what was wrong with it. Inputs are divided by
``data.scale``; by default (null) by 255 only where the file stores uint8, the
pixel values of MNIST's and CIFAR's files, since other integers (digits stored
as 0..16, counts) need not be pixels.
"""

from __future__ import annotations

import gzip
import io
import logging
import math
import pickle
import tarfile
import zlib
from collections.abc import Callable
from pathlib import Path, PurePosixPath
from typing import IO, Any, ClassVar, NamedTuple

import numpy as np

from simulator.config import ConfigError, DataConfig
from simulator.data.dataset import Dataset, DatasetSource, scaled, split_dataset

# idx type codes (the third magic byte) and the big-endian dtypes they stand for.
_IDX_DTYPES = {0x08: ">u1", 0x09: ">i1", 0x0B: ">i2", 0x0C: ">i4", 0x0D: ">f4", 0x0E: ">f8"}
_CIFAR_PIXELS = 3 * 32 * 32
_UNSCALED = 10.0  # inputs beyond this after scaling look unscaled (pixels are 0..1, standardized data a few units)
log = logging.getLogger("fedstream")


def _existing_path(path: str | None, dataset: str, expected: str) -> Path:
    """``data.path`` as a Path, or a ConfigError saying what ``dataset`` expected there."""
    if path is None:
        raise ConfigError(
            f"data.path = None: data.dataset = {dataset!r} reads {expected}; "
            "set data.path=... in the scenario file or on the command line"
        )
    resolved = Path(path).expanduser()
    if not resolved.exists():
        raise ConfigError(
            f"data.path = {path!r}: {resolved.resolve()} does not exist (data.dataset = {dataset!r} reads {expected})"
        )
    return resolved


def _member(folder: Path, *names: str) -> Path:
    """The first of ``names`` present in ``folder``; a ConfigError naming the first if none is."""
    for name in names:
        if (folder / name).is_file():
            return folder / name
    wanted = " or ".join(repr(name) for name in names)
    raise ConfigError(f"data.path: {folder.resolve()} has no file {wanted}")


def _malformed(file: Path, reason: str) -> ConfigError:
    return ConfigError(f"data.path: malformed file {file}: {reason}")


def _labels(y: np.ndarray, file: Path, num_classes: int | None = None) -> np.ndarray:
    """``y`` as int64, checked to be integers in ``0 .. num_classes - 1`` (or just >= 0)."""
    if y.ndim != 1 or not np.issubdtype(y.dtype, np.integer):
        raise _malformed(file, f"labels must be a 1-d integer array, not {y.dtype} {y.shape}")
    largest = np.iinfo(np.int64).max if num_classes is None else num_classes - 1
    if len(y) and (y.min() < 0 or y.max() > largest):  # uint64 beyond int64 would wrap to negatives
        bound = f" and < {num_classes}" if num_classes is not None else " and < 2**63" if y.max() > largest else ""
        raise _malformed(file, f"labels must be >= 0{bound}, got {y.min()} .. {y.max()}")
    return y.astype(np.int64)


def _class_count(file: Path, *labels: np.ndarray) -> int:
    """The number of classes, the largest label plus one, once ``labels`` (all splits) look like class indices.

    Indices start at 0 and leave fewer of ``0 .. largest`` absent than present
    (a class may be absent: held out, or in another file). Ids (1-based, sparse
    codes, a hash) are refused before anything is allocated by the largest one.
    """
    every = np.concatenate(labels)
    low, high, distinct = int(every.min()), int(every.max()), len(np.unique(every))
    if low != 0 or high + 1 > 2 * distinct:
        raise _malformed(
            file,
            f"labels must be class indices 0 .. C-1 (C = largest label + 1; label 0 present, most of "
            f"0 .. C-1 present), but they are {low} .. {high}, {distinct} distinct over all splits; renumber "
            f"them, e.g. y = np.unique(labels, return_inverse=True)[1] over train and test labels together",
        )
    return high + 1


def _inputs(source: Path, scale: float | None, *splits: np.ndarray) -> list[np.ndarray]:
    """Each split as C-contiguous float32, divided by ``scale`` (None: 255 for uint8, else 1).

    One warning for all the splits (a dataset is loaded once) if any looks unscaled.
    """
    divisors = [scale if scale is not None else 255.0 if x.dtype == np.uint8 else 1.0 for x in splits]
    inputs = [scaled(x, divisor) for x, divisor in zip(splits, divisors)]
    extents = [max(float(x.max(initial=0.0)), -float(x.min(initial=0.0))) for x in inputs]
    worst = int(np.argmax(extents))
    largest = extents[worst]
    if _UNSCALED < largest < math.inf:  # NaN and infinities: load_dataset's error names them
        log.warning(
            "data.path: %s holds %s inputs up to %g after dividing by %g (data.scale = %s): they look "
            "unscaled, which slows or stalls training; set data.scale to their largest value (e.g. data.scale=%g)",
            source,
            splits[worst].dtype,
            largest,
            divisors[worst],
            "null" if scale is None else scale,
            largest * divisors[worst],
        )
    return inputs


def read_idx(file: Path) -> np.ndarray:
    """Parse an idx file (LeCun's MNIST format), gzipped if its name ends in ``.gz``.

    The format is two zero bytes, a type code, the number of dimensions, each
    dimension as a big-endian uint32, then the values, big-endian, row-major.
    """
    try:
        raw = gzip.decompress(file.read_bytes()) if file.suffix == ".gz" else file.read_bytes()
    except (gzip.BadGzipFile, EOFError) as error:
        raise _malformed(file, f"not a valid gzip file ({error})") from None
    if len(raw) < 4 or raw[0] != 0 or raw[1] != 0 or raw[2] not in _IDX_DTYPES:
        raise _malformed(file, f"bad idx magic number {raw[:4].hex() or '(empty)'}")
    ndim, header = raw[3], 4 + 4 * raw[3]
    if len(raw) < header:
        raise _malformed(file, f"idx header for {ndim} dimensions is cut short")
    dims = tuple(int(d) for d in np.frombuffer(raw, ">u4", ndim, offset=4))
    dtype = np.dtype(_IDX_DTYPES[raw[2]])
    expected = header + math.prod(dims) * dtype.itemsize
    if len(raw) != expected:
        raise _malformed(file, f"{len(raw)} bytes, but idx shape {dims} needs {expected}")
    return np.frombuffer(raw, dtype, offset=header).reshape(dims)


def _mnist_split(folder: Path, prefix: str) -> tuple[np.ndarray, np.ndarray]:
    """One split's images, as stored, with a channel axis, and its labels."""
    image_file = _member(folder, f"{prefix}-images-idx3-ubyte", f"{prefix}-images-idx3-ubyte.gz")
    label_file = _member(folder, f"{prefix}-labels-idx1-ubyte", f"{prefix}-labels-idx1-ubyte.gz")
    images, labels = read_idx(image_file), read_idx(label_file)
    if images.ndim != 3:
        raise _malformed(image_file, f"expected images of shape (N, H, W), got {images.shape}")
    if len(labels) != len(images):
        raise _malformed(label_file, f"{len(labels)} labels for {len(images)} images")
    return images[:, None], _labels(labels, label_file, 10)


def load_mnist(path: str | None, scale: float | None = None) -> Dataset:
    """MNIST (or anything in its layout) from the four idx files in a folder."""
    folder = _existing_path(path, "mnist", "a folder with the four MNIST idx files (or .gz)")
    return _idx_dataset("mnist", folder, scale)


# Where Debian's (and Ubuntu's) dataset-fashion-mnist package installs the four idx files.
FASHION_MNIST_PACKAGE = "/usr/share/datasets/fashion-mnist"


def load_fashion_mnist(path: str | None, scale: float | None = None) -> Dataset:
    """Fashion-MNIST (Xiao et al. 2017: 70,000 28x28 grey images of 10 kinds of clothing, MIT licence) from its
    four idx files, as distributed, in ``path`` or, where it is null, where Debian's package installs them."""
    folder = Path(path or FASHION_MNIST_PACKAGE).expanduser()
    if not folder.is_dir():
        raise ConfigError(
            f"data.path = {path!r}: no folder {folder} for data.dataset = 'fashion_mnist', which reads the four "
            "idx files train-images-idx3-ubyte.gz, train-labels-idx1-ubyte.gz, t10k-images-idx3-ubyte.gz and "
            "t10k-labels-idx1-ubyte.gz. Get them with Debian's or Ubuntu's package (apt-get install "
            f"dataset-fashion-mnist: they go to {FASHION_MNIST_PACKAGE}, where data.path = null looks), or "
            "download them from https://github.com/zalandoresearch/fashion-mnist (data/fashion) into a folder "
            "and set data.path to it"
        )
    return _idx_dataset("fashion_mnist", folder, scale)


def _idx_dataset(name: str, folder: Path, scale: float | None) -> Dataset:
    """The train and t10k splits of the idx files in ``folder``, scaled."""
    (x_train, y_train), (x_test, y_test) = _mnist_split(folder, "train"), _mnist_split(folder, "t10k")
    x_train, x_test = _inputs(folder, scale, x_train, x_test)
    return Dataset(name, x_train, y_train, x_test, y_test, num_classes=10)


class _CifarLayout(NamedTuple):
    folder: str  # the folder's name in the official python version
    archive: str  # the official archive's name; it holds the folder
    train: list[str]
    test: str
    label_key: bytes
    num_classes: int


class _ArraysOnlyUnpickler(pickle.Unpickler):
    """Resolves only what a CIFAR batch names: numpy's array and dtype (and how Python 2 pickled strings), so
    unpickling a crafted file calls nothing else (os.system, ...)."""

    _ALLOWED = {
        ("numpy", "ndarray"),
        ("numpy", "dtype"),
        ("numpy.core.multiarray", "_reconstruct"),
        ("numpy._core.multiarray", "_reconstruct"),
        ("_codecs", "encode"),
    }

    def find_class(self, module: str, name: str) -> Any:
        if (module, name) not in self._ALLOWED:
            raise pickle.UnpicklingError(f"refused global {module}.{name}: a CIFAR batch holds only numpy arrays")
        return super().find_class(module, name)


def _unpickled(handle: IO[bytes], file: Path) -> Any:
    """The object pickled in ``handle``, by :class:`_ArraysOnlyUnpickler`: a crafted file runs no code.

    ``encoding="bytes"``: the official batches were pickled by Python 2, whose strings (the dict's keys) come
    back as bytes.
    """
    try:
        return _ArraysOnlyUnpickler(handle, encoding="bytes").load()
    except (pickle.UnpicklingError, EOFError, ValueError) as error:
        raise _malformed(file, f"not a CIFAR pickle ({error})") from None


def _cifar_arrays(batch: Any, file: Path, layout: _CifarLayout) -> tuple[np.ndarray, np.ndarray]:
    """A batch's images as (N, 3, 32, 32), pixels as stored, and labels, from its b"data" (N x 3072 uint8)."""
    if not isinstance(batch, dict) or b"data" not in batch or layout.label_key not in batch:
        raise _malformed(file, f"expected a dict with keys b'data' and {layout.label_key!r}")
    data, labels = np.asarray(batch[b"data"]), np.asarray(batch[layout.label_key])
    if data.ndim != 2 or data.shape[1] != _CIFAR_PIXELS or len(labels) != len(data):
        got = f"{data.shape} and {len(labels)}"
        raise _malformed(file, f"expected N x {_CIFAR_PIXELS} pixels and N labels, got {got}")
    # Each row is the red, then green, then blue 32x32 plane: channel-first as is.
    return data.reshape(-1, 3, 32, 32), _labels(labels, file, layout.num_classes)


def _folder_batches(folder: Path, names: list[str]) -> list[tuple[Path, Any]]:
    """Each batch ``names`` in ``folder`` (CIFAR's python version, unpacked), unpickled, with its file."""
    batches = []
    for name in names:
        file = _member(folder, name)
        with file.open("rb") as handle:
            batches.append((file, _unpickled(handle, file)))
    return batches


def _archive_batches(archive: Path, layout: _CifarLayout, names: list[str]) -> list[tuple[Path, Any]]:
    """Each batch ``names`` of the folder ``layout.folder`` in a tar archive (CIFAR's .tar.gz, as downloaded),
    unpickled, with its path in the archive (``archive/folder/name``, for messages).

    One pass over the archive, in its order: a gzipped tar reads backwards only by decompressing from the
    start again. Members are read in memory; nothing is extracted to disk.
    """
    wanted = {PurePosixPath(layout.folder, name): name for name in names}
    found: dict[str, tuple[Path, Any]] = {}
    try:
        if not tarfile.is_tarfile(archive):
            raise _malformed(archive, f"neither a folder nor a tar archive (CIFAR's {layout.archive!r})")
        with tarfile.open(archive) as tar:
            for member in tar:
                name = wanted.get(PurePosixPath(member.name))
                handle = tar.extractfile(member) if name is not None else None
                if handle is not None:  # read whole: an archive cut short is then not taken for a bad pickle
                    file = archive / member.name
                    found[name] = (file, _unpickled(io.BytesIO(handle.read()), file))
    except (tarfile.TarError, EOFError, zlib.error) as error:
        raise _malformed(archive, f"cut short or corrupt ({error})") from None
    missing = [f"{layout.folder}/{name}" for name in names if name not in found]
    if missing:
        raise ConfigError(f"data.path: the archive {archive.resolve()} has no file {missing[0]!r}")
    return [found[name] for name in names]


def _cifar_split(batches: list[tuple[Path, Any]], layout: _CifarLayout) -> tuple[np.ndarray, np.ndarray]:
    """The batches' images and labels, concatenated in order."""
    xs, ys = zip(*(_cifar_arrays(batch, file, layout) for file, batch in batches))
    return np.concatenate(xs), np.concatenate(ys)


def _load_cifar(name: str, path: str | None, layout: _CifarLayout, scale: float | None) -> Dataset:
    """CIFAR's python version from its folder or, where ``path`` is a file, from the archive it comes in."""
    expected = f"the {layout.folder!r} folder (CIFAR's python version) or the archive {layout.archive!r} holding it"
    source = _existing_path(path, name, expected)
    names = [*layout.train, layout.test]
    batches = _archive_batches(source, layout, names) if source.is_file() else _folder_batches(source, names)
    (x_train, y_train), (x_test, y_test) = _cifar_split(batches[:-1], layout), _cifar_split(batches[-1:], layout)
    x_train, x_test = _inputs(source, scale, x_train, x_test)
    return Dataset(name, x_train, y_train, x_test, y_test, layout.num_classes)


def load_cifar10(path: str | None, scale: float | None = None) -> Dataset:
    """CIFAR-10 from the ``cifar-10-batches-py`` folder or ``cifar-10-python.tar.gz``, as (N, 3, 32, 32)."""
    train = [f"data_batch_{i}" for i in range(1, 6)]
    layout = _CifarLayout("cifar-10-batches-py", "cifar-10-python.tar.gz", train, "test_batch", b"labels", 10)
    return _load_cifar("cifar10", path, layout, scale)


def load_cifar100(path: str | None, scale: float | None = None) -> Dataset:
    """CIFAR-100 (fine labels) from the ``cifar-100-python`` folder or ``cifar-100-python.tar.gz``, as
    (N, 3, 32, 32)."""
    layout = _CifarLayout("cifar-100-python", "cifar-100-python.tar.gz", ["train"], "test", b"fine_labels", 100)
    return _load_cifar("cifar100", path, layout, scale)


_CHANNELS = (1, 3, 4)  # grey, RGB, RGBA: the channel counts a 4-d image array's layout is told by


def _npz_inputs(x: np.ndarray, file: Path) -> np.ndarray:
    """(N, D) or (N, C, H, W), as stored: (N, H, W) gets a channel axis; the layout is checked apart."""
    if x.ndim not in (2, 3, 4):
        raise _malformed(file, f"inputs must be (N, D), (N, H, W), (N, C, H, W) or (N, H, W, C), got {x.shape}")
    if not (np.issubdtype(x.dtype, np.integer) or np.issubdtype(x.dtype, np.floating)):
        raise _malformed(file, f"inputs must be integers or floats, not {x.dtype}")
    if x.ndim == 3:
        x = x[:, None]
    return x


def _channels_first(file: Path, *splits: np.ndarray) -> list[np.ndarray]:
    """4-d ``splits`` as (N, C, H, W), read by the training inputs' shape; one note for them all.

    Channels-last (N, H, W, C), axis 3 in 1, 3 or 4 and axis 1 not, is transposed
    (a view: scaling copies it C-contiguous). Both axes in 1, 3, 4 cannot be told
    apart: read channels-first, as before, and said so.
    """
    stored = splits[0].shape
    if len(stored) != 4 or stored[3] not in _CHANNELS:
        return list(splits)
    if stored[1] in _CHANNELS:
        log.warning(
            "data.path: %s holds inputs of shape %s, which cannot tell channels-first (N, C, H, W) from "
            "channels-last (N, H, W, C): read as channels-first, %s; store them transposed if they are (N, H, W, C)",
            file,
            stored,
            stored,
        )
        return list(splits)
    transposed = [x.transpose(0, 3, 1, 2) if x.ndim == 4 else x for x in splits]
    log.warning(
        "data.path: %s holds channels-last inputs (N, H, W, C) of shape %s: transposed to (N, C, H, W), %s",
        file,
        stored,
        transposed[0].shape,
    )
    return transposed


def load_npz(path: str | None, test_fraction: float, rng: np.random.Generator, scale: float | None = None) -> Dataset:
    """Arrays ``x``, ``y`` and optionally ``x_test``, ``y_test`` from a ``.npz`` file.

    Inputs are (N, D) vectors, (N, H, W) single-channel images, or 4-d images,
    channels-first (N, C, H, W) or channels-last (N, H, W, C). A 4-d ``x`` whose
    last axis is 1, 3 or 4 and whose axis 1 is not is channels-last and is
    transposed to (N, C, H, W), with a warning naming both shapes; where both
    axes are 1, 3 or 4 (e.g. (N, 3, 8, 4)) it cannot be told and is read
    channels-first, with a warning saying so. ``x_test`` is read as ``x`` is.

    Labels are class indices ``0 .. C-1``, ``C`` (``num_classes``) the largest
    label in either split plus one: label 0 must occur, and most of ``0 .. C-1``
    (a class may be absent, e.g. held out of this file). Labels that are ids
    (1-based, sparse codes, a huge hash) are refused with a ConfigError giving
    their range and number of distinct values, not renumbered: a renumbering
    would silently change which output is which class. Without a test split,
    ``test_fraction`` of each class is held out.
    """
    file = _existing_path(path, "npz", "a .npz file with arrays x, y (and maybe x_test, y_test)")
    try:
        with np.load(file, allow_pickle=False) as archive:
            arrays = dict(archive)
    except (OSError, ValueError, TypeError) as error:
        raise _malformed(file, f"not a .npz archive of arrays ({error})") from None
    has_test = "x_test" in arrays or "y_test" in arrays
    suffixes = ["", "_test"] if has_test else [""]
    keys = [xy + suffix for suffix in suffixes for xy in ("x", "y")]
    missing = [key for key in keys if key not in arrays]
    if missing:
        raise _malformed(file, f"missing arrays {missing}; it has {sorted(arrays)}")
    xs = [_npz_inputs(arrays[f"x{suffix}"], file) for suffix in suffixes]
    ys = [_labels(arrays[f"y{suffix}"], file) for suffix in suffixes]
    xs = _channels_first(file, *xs)
    input_shape = xs[0].shape[1:]
    for x, y in zip(xs, ys):
        if len(x) != len(y):
            raise _malformed(file, f"{len(x)} inputs but {len(y)} labels")
        if x.shape[1:] != input_shape:
            raise _malformed(file, f"test inputs {x.shape[1:]} differ from train {input_shape}")
    if len(ys[0]) == 0:
        raise _malformed(file, "x and y hold no samples")
    num_classes = _class_count(file, *ys)
    splits = list(zip(_inputs(file, scale, *xs), ys))
    if num_classes < 2:
        raise _malformed(file, f"labels hold {num_classes} class; a classifier needs at least 2 classes")
    if not has_test:
        return split_dataset("npz", *splits[0], num_classes, test_fraction, rng)
    (x_train, y_train), (x_test, y_test) = splits
    return Dataset("npz", x_train, y_train, x_test, y_test, num_classes)


class FolderSource(DatasetSource):
    """A dataset in its standard files under ``data.path``, read by ``reader(path, scale)``."""

    reads_files = True
    reader: ClassVar[Callable[[str | None, float | None], Dataset]]

    @classmethod
    def load(cls, data: DataConfig, settings: Any, num_clients: int, generator: np.random.Generator) -> Dataset:
        return cls.reader(data.path, data.scale)


class MNISTFiles(FolderSource):
    """MNIST idx files (or any in its layout) in the folder ``data.path``."""

    section, reader = "mnist", staticmethod(load_mnist)


class FashionMNISTFiles(FolderSource):
    """Fashion-MNIST's idx files in ``data.path``; null: where Debian's dataset-fashion-mnist installs them."""

    section, reader = "fashion_mnist", staticmethod(load_fashion_mnist)


class CIFAR10Files(FolderSource):
    """The CIFAR-10 python pickles in ``data.path``: the folder, or the .tar.gz it is distributed in."""

    section, reader = "cifar10", staticmethod(load_cifar10)


class CIFAR100Files(FolderSource):
    """The CIFAR-100 python pickles in ``data.path``: the folder, or the .tar.gz it is distributed in."""

    section, reader = "cifar100", staticmethod(load_cifar100)


class NpzFile(DatasetSource):
    """A user's ``.npz`` at ``data.path``."""

    section, reads_files = "npz", True

    @classmethod
    def load(cls, data: DataConfig, settings: Any, num_clients: int, generator: np.random.Generator) -> Dataset:
        return load_npz(data.path, data.test_fraction, generator, data.scale)
