"""The .npz reader a resume uses: plain stored arrays come back exactly; anything else is refused, unread."""

from __future__ import annotations

import io
import zipfile

import numpy as np
import pytest

from simulator.plain_npz import UnreadableArchive, read_npz, write_npz


def test_arrays_come_back_exactly_and_writable(tmp_path):
    arrays = {
        "weights": np.arange(6, dtype=np.float32).reshape(2, 3),
        "fortran": np.asfortranarray(np.arange(6).reshape(2, 3)),
        "scalar": np.array(2.5),
        "empty": np.zeros((0, 4)),
    }
    write_npz(tmp_path / "a.npz", arrays)
    read = read_npz(tmp_path / "a.npz")
    assert read.keys() == arrays.keys()
    for name, array in arrays.items():
        assert read[name].dtype == array.dtype and np.array_equal(read[name], array)
        assert read[name].flags.writeable


def _archive(path, member: str, data: bytes, compression: int = zipfile.ZIP_STORED) -> None:
    with zipfile.ZipFile(path, "w", compression) as archive:
        archive.writestr(member, data)


def _npy(array: np.ndarray) -> bytes:
    buffer = io.BytesIO()
    np.lib.format.write_array(buffer, array, allow_pickle=True)
    return buffer.getvalue()


@pytest.mark.parametrize(
    ("member", "data", "compression", "refusal"),
    [
        ("a.npy", _npy(np.zeros(1000)), zipfile.ZIP_DEFLATED, "is compressed"),
        ("a.npy", _npy(np.array([{"x": 1}], dtype=object)), zipfile.ZIP_STORED, "holds Python objects"),
        (
            "a.npy",
            _npy(np.zeros(10))[:-8],
            zipfile.ZIP_STORED,
            r"declares \(10,\) float64 \(80 bytes\), its data holds 72",
        ),
        ("a.npy", b"not an array at all", zipfile.ZIP_STORED, "no valid .npy header"),
        ("a.txt", b"hello", zipfile.ZIP_STORED, "is not a .npy array"),
    ],
    ids=["deflated", "objects", "header larger than data", "no header", "not npy"],
)
def test_anything_but_a_stored_plain_array_is_refused(tmp_path, member, data, compression, refusal):
    _archive(tmp_path / "a.npz", member, data, compression)
    with pytest.raises(UnreadableArchive, match=refusal):
        read_npz(tmp_path / "a.npz")


def test_a_damaged_member_or_a_file_that_is_no_archive_is_refused(tmp_path):
    write_npz(tmp_path / "a.npz", {"weights": np.arange(1000.0)})
    data = bytearray((tmp_path / "a.npz").read_bytes())
    data[len(data) // 2] ^= 0xFF  # inside the array's data: its CRC no longer matches
    (tmp_path / "a.npz").write_bytes(bytes(data))
    with pytest.raises(UnreadableArchive, match="member 'weights.npy' cannot be read"):
        read_npz(tmp_path / "a.npz")
    (tmp_path / "b.npz").write_bytes(b"PK but not a zip")
    with pytest.raises(UnreadableArchive, match="not an npz archive"):
        read_npz(tmp_path / "b.npz")
