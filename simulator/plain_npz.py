"""The ``.npz`` archives a resume reads: written uncompressed, read back with every size bounded first.

``np.load`` inflates a deflated member whole before anyone can look at it, so
a 2 MB file may cost gigabytes. A resume reads files that may come from
someone else (docs/architecture.md, "Checkpoints"), so here a member is read
only if it is stored, not compressed; its ``.npy`` header declares a plain
dtype (no Python objects); and the header's shape accounts for exactly the
bytes the member holds. The bytes read then never exceed the file's size.
Everything the project writes for a resume (global arrays, a strategy's
state arrays, client states) goes through :func:`write_npz` and comes back
through :func:`read_npz`.
"""

from __future__ import annotations

import math
import zipfile
from collections.abc import Mapping
from pathlib import Path

import numpy as np
from numpy.lib import format as npy

_SUFFIX = ".npy"


class UnreadableArchive(ValueError):
    """An archive :func:`read_npz` refuses; the message says which member and why."""


def write_npz(path: Path, arrays: Mapping[str, np.ndarray]) -> None:
    """Write ``arrays`` to ``path`` uncompressed (``np.savez`` stores its members)."""
    np.savez(path, **arrays)


def read_npz(path: Path) -> dict[str, np.ndarray]:
    """The arrays in ``path`` by name, each writable; an UnreadableArchive if any member is not a plain stored array."""
    try:
        archive = zipfile.ZipFile(path)
    except (zipfile.BadZipFile, OSError) as error:
        raise UnreadableArchive(f"not an npz archive ({error})") from None
    arrays: dict[str, np.ndarray] = {}
    with archive:
        for member in archive.infolist():
            name = member.filename.removesuffix(_SUFFIX)
            if name == member.filename or name in arrays:
                raise UnreadableArchive(f"member {member.filename!r} is not a .npy array, or is there twice")
            try:
                arrays[name] = _read_member(archive, member)
            except (zipfile.BadZipFile, RuntimeError, NotImplementedError, EOFError, OSError) as error:
                raise UnreadableArchive(f"member {member.filename!r} cannot be read ({error})") from None
    return arrays


def _read_member(archive: zipfile.ZipFile, member: zipfile.ZipInfo) -> np.ndarray:
    if member.compress_type != zipfile.ZIP_STORED:
        raise UnreadableArchive(
            f"member {member.filename!r} is compressed: only stored arrays are read, "
            "as a compressed one could inflate to any size"
        )
    with archive.open(member) as stream:
        try:
            version = npy.read_magic(stream)
            read_header = npy.read_array_header_1_0 if version == (1, 0) else npy.read_array_header_2_0
            shape, fortran_order, dtype = read_header(stream)
        except ValueError as error:
            raise UnreadableArchive(f"member {member.filename!r} has no valid .npy header ({error})") from None
        if dtype.hasobject:
            raise UnreadableArchive(f"member {member.filename!r} holds Python objects, not plain numbers")
        size = math.prod(shape) * dtype.itemsize
        if stream.tell() + size != member.file_size:
            raise UnreadableArchive(
                f"member {member.filename!r}: its header declares {shape} {dtype} ({size} bytes), "
                f"its data holds {member.file_size - stream.tell()} bytes"
            )
        data = bytearray(stream.read(size))  # bounded: the member is stored, its size checked
    if len(data) != size:
        raise UnreadableArchive(f"member {member.filename!r} is truncated")
    flat = np.frombuffer(data, dtype)
    return flat.reshape(shape[::-1]).T if fortran_order else flat.reshape(shape)
