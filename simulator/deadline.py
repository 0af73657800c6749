"""A time limit on one client's work, so a blocking client fails the run instead of hanging it.

The limit is a real-time timer (``SIGALRM``) whose handler raises
:class:`ClientTimeout` in the code that runs the client, wherever it is
blocked in Python (a loop, a sleep). It works in a process's main thread,
where the local backend and Ray's actors run clients; elsewhere (a driver in a
thread) the client runs without a limit. A client blocked inside C code that
never returns to Python is left to the Ray backend's outer timeout.
"""

from __future__ import annotations

import contextlib
import signal
import threading
from collections.abc import Iterator


class ClientTimeout(BaseException):
    """A client ran past ``engine.client_timeout_s``.

    A BaseException, so a client's own ``except Exception`` cannot swallow it;
    the timer also fires again every second until the client gives up.
    """


@contextlib.contextmanager
def deadline(seconds: float | None, message: str) -> Iterator[None]:
    """Raise :class:`ClientTimeout` with ``message`` if the block runs longer than ``seconds``.

    Where a timer is already set (an outer watchdog, pytest-timeout), it is
    left alone and the block runs without a limit of its own.
    """
    if (
        seconds is None
        or threading.current_thread() is not threading.main_thread()
        or signal.getitimer(signal.ITIMER_REAL)[0] > 0
    ):
        yield
        return

    def expire(signum: int, frame: object) -> None:
        raise ClientTimeout(message)

    previous = signal.signal(signal.SIGALRM, expire)
    try:
        signal.setitimer(signal.ITIMER_REAL, seconds, 1.0)
        yield
    finally:
        try:
            signal.setitimer(signal.ITIMER_REAL, 0)
        finally:
            signal.signal(signal.SIGALRM, previous)
