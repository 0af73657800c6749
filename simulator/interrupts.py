"""Ctrl-C and SIGTERM stop a run at the next safe point instead of wherever they land.

Inside :func:`stop_requests` the first SIGINT or SIGTERM only records itself;
the engine finishes the round it is in, has the hooks checkpoint it (where
checkpoints are on), and raises :class:`Interrupted`, which ``run.py`` turns
into one line with the command that resumes the run and exit code 128 + the
signal (130, 143). The first signal puts the previous handlers back, so a
second one acts at once (Ctrl-C: KeyboardInterrupt).
"""

from __future__ import annotations

import contextlib
import signal
import threading
from collections.abc import Iterator
from dataclasses import dataclass

SIGNALS = (signal.SIGINT, signal.SIGTERM)


class Interrupted(Exception):
    """The run stopped after ``last_round`` on ``signal_number``."""

    def __init__(self, signal_number: int, last_round: int) -> None:
        super().__init__(f"interrupted after round {last_round} ({signal.Signals(signal_number).name})")
        self.signal_number, self.last_round = signal_number, last_round

    @property
    def exit_code(self) -> int:
        return 128 + self.signal_number


@dataclass
class StopRequest:
    """The signal received, if any."""

    signal_number: int | None = None


@contextlib.contextmanager
def stop_requests() -> Iterator[StopRequest]:
    """Record the first SIGINT or SIGTERM instead of acting on it (only in the main thread, where Python
    runs signal handlers); the handlers before it come back after it, and at the end."""
    request = StopRequest()
    if threading.current_thread() is not threading.main_thread():
        yield request
        return
    previous = {number: signal.getsignal(number) for number in SIGNALS}

    def record(number: int, frame: object) -> None:
        request.signal_number = number
        for other, handler in previous.items():
            signal.signal(other, handler)

    for number in SIGNALS:
        signal.signal(number, record)
    try:
        yield request
    finally:
        for number, handler in previous.items():
            signal.signal(number, handler)
