"""A Flower ``Array`` over an ndarray already in memory, serialized only if asked for its bytes.

Flower's ``Array`` stores ``.npy`` bytes: building one from an ndarray runs
``np.save`` and every ``numpy()`` runs ``np.load``. Between our Grid and a
strategy in the same process nothing needs the bytes, and that round trip was
the largest cost a round paid on the driver (see benchmarks/README.md).
A :class:`HeldArray` is an ``Array`` to every strategy: ``numpy()`` returns a
fresh copy, as ``np.load`` would, and ``data`` gives the same ``.npy`` bytes
Flower would have stored, made the first time something reads them.
"""

from __future__ import annotations

import functools
from collections.abc import Iterable
from io import BytesIO

import numpy as np
from flwr.app import Array, ArrayRecord
from flwr.common.constant import SType


class HeldArray(Array):
    """An ``Array`` holding its ndarray; ``data`` (the ``.npy`` bytes) is made on first use."""

    def __init__(self, ndarray: np.ndarray) -> None:
        # Straight into __dict__: Array.__setattr__ would redo its dirty-state work per field.
        self.__dict__.update(
            _ndarray=ndarray, dtype=_dtype_name(ndarray.dtype), shape=tuple(ndarray.shape), stype=SType.NUMPY
        )

    @property
    def data(self) -> bytes:  # type: ignore[override]
        if "_data" not in self.__dict__:
            buffer = BytesIO()
            np.save(buffer, self.__dict__["_ndarray"], allow_pickle=False)
            self.__dict__["_data"] = buffer.getvalue()
        return self.__dict__["_data"]

    @data.setter
    def data(self, value: bytes) -> None:
        # Array.__setattr__ has already marked the object dirty; the bytes become the content.
        self.__dict__["_data"] = value
        self.__dict__["_ndarray"] = np.load(BytesIO(value), allow_pickle=False)

    def numpy(self) -> np.ndarray:
        return self.__dict__["_ndarray"].copy()

    def deflate(self) -> bytes:
        """Deflated as the plain ``Array`` it stands for, so Flower can inflate it (same object id)."""
        return self._plain().deflate()

    def __reduce__(self) -> tuple:
        """Pickled as the plain ``Array`` it stands for: a checkpointed strategy that keeps a record
        (FOT's round start, FedAdam's moments) loads through the allow-list of Flower's classes."""
        return self._plain().__reduce__()

    def _plain(self) -> Array:
        return Array(dtype=self.dtype, shape=self.shape, stype=self.stype, data=self.data)


@functools.cache
def _dtype_name(dtype: np.dtype) -> str:
    """``str(dtype)``, which numpy computes in Python (~6 us, 8 times per reply of a small CNN)."""
    return str(dtype)


def held_array_record(keys: Iterable[str], arrays: Iterable[np.ndarray]) -> ArrayRecord:
    """An ``ArrayRecord`` of :class:`HeldArray` (its constructor would copy each into a plain Array)."""
    record = ArrayRecord()
    for key, array in zip(keys, arrays, strict=True):
        record[key] = HeldArray(array)
    return record
