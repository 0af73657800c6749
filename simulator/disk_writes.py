"""Writing the run's files: an error of a full disk (or quota) named by the file it was writing.

A failed ``write`` or ``flush`` raises an OSError that names no file; the run
directory's writers and the plot tool wrap their writes in :func:`naming`, so
the command's one ``error:`` line can say which file did not fit.
"""

from __future__ import annotations

import contextlib
import errno
from collections.abc import Iterator
from pathlib import Path

DISK_FULL = (errno.ENOSPC, errno.EDQUOT)  # a write the disk (or the user's quota) has no room for


@contextlib.contextmanager
def naming(path: Path) -> Iterator[None]:
    """Raise an OSError of the block that names no file (a write to a full disk names none) naming ``path``."""
    try:
        yield
    except OSError as error:
        if error.filename is not None or error.errno is None:
            raise
        raise OSError(error.errno, error.strerror, str(path)) from error
