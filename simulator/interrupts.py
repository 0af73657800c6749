"""Ctrl-C and SIGTERM stop a run at the next safe point instead of wherever they land.

A command's signals go through three stages, whatever phase the run is in:

1. The first SIGINT or SIGTERM. Before the rounds begin (data loading, model
   building, Ray's start-up) there is nothing to save: :func:`signals_stop_at_once`
   raises :class:`Interrupted` (``last_round`` None) where it lands, and the
   backend's cleanup stops Ray if it had started. Once the rounds have begun,
   inside :func:`stop_requests`, it only records itself: the engine finishes
   the round it is in, has the hooks checkpoint it (where checkpoints are on),
   and raises :class:`Interrupted` with that round.
2. A second signal raises :class:`Interrupted` (``again``) at once, wherever it
   lands: in a round (no checkpoint of it), or in the cleanup after the first.
3. A third gets the operating system's default action: the process ends there
   and then (Ray's processes follow it: ``simulator/backends.py``'s watchdog).

``run.py`` turns :class:`Interrupted` into one line, with the command that
resumes the run where there is something to resume, and exit code 128 + the
signal (130, 143). :class:`Interrupted` is a KeyboardInterrupt, so no
``except Exception`` (a client's, a library's) swallows it, and a wait in Ray
(``ray.get``) ends for it: Ray re-raises it as a plain KeyboardInterrupt,
which :func:`as_interrupted` maps back to what the handler raised (any other
exception from a signal handler leaves ``ray.get`` waiting).
"""

from __future__ import annotations

import contextlib
import signal
import threading
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from typing import Any

SIGNALS = (signal.SIGINT, signal.SIGTERM)
_received: list[int] = []  # the signals the command has had, in order, while its handlers were ours
_raised: list[Interrupted] = []  # what those handlers raised


class Interrupted(KeyboardInterrupt):
    """The run stopped on ``signal_number``: after ``last_round`` (None: before the rounds began), or at
    once (``again``: the signal was not the first, so no round was finished for it)."""

    def __init__(self, signal_number: int, last_round: int | None, again: bool = False) -> None:
        name = signal.Signals(signal_number).name
        if again:
            what = f"interrupted again ({name}): stopped at once"
        elif last_round is None:
            what = f"interrupted before the rounds began ({name})"
        else:
            what = f"interrupted after round {last_round} ({name})"
        super().__init__(what)
        self.signal_number, self.last_round, self.again = signal_number, last_round, again

    @property
    def exit_code(self) -> int:
        return 128 + self.signal_number


def as_interrupted(error: KeyboardInterrupt) -> Interrupted:
    """The :class:`Interrupted` behind ``error``: itself, or, where a library re-raised it as a plain
    KeyboardInterrupt (Ray does), the last one our handlers raised; else one for a SIGINT."""
    if isinstance(error, Interrupted):
        return error
    return _raised[-1] if _raised else Interrupted(signal.SIGINT, None)


def _stop_now(number: int, frame: object) -> None:
    """The first signal before the rounds, or any second one: stop where it lands; a third: the default."""
    _received.append(number)
    if len(_received) > 1:
        _install(signal.SIG_DFL)
    _raised.append(Interrupted(number, None, again=len(_received) > 1))
    raise _raised[-1]


def _install(handler: Callable[[int, Any], Any] | int) -> None:
    for number in SIGNALS:
        signal.signal(number, handler)


@contextlib.contextmanager
def signals_stop_at_once() -> Iterator[None]:
    """A command's signals, staged as the module says (only in the main thread, where Python runs
    signal handlers); the handlers before it come back at the end (after :func:`exit_while_importing`'s:
    the default, so that a signal in the interpreter's exit, with its atexit cleanup, acts at once)."""
    if threading.current_thread() is not threading.main_thread():
        yield
        return
    previous = {number: signal.getsignal(number) for number in SIGNALS}
    _received.clear()
    _raised.clear()
    _install(_stop_now)
    try:
        yield
    finally:
        for number, handler in previous.items():
            signal.signal(number, signal.SIG_DFL if handler is _leave_while_importing else handler)


def exit_while_importing() -> None:
    """Until :func:`signals_stop_at_once`, while the command imports its modules (a second or more:
    torch, Ray): a signal prints the one line and ends the process with 128 + the signal."""
    _install(_leave_while_importing)


def _leave_while_importing(number: int, frame: object) -> None:
    import sys

    _install(signal.SIG_DFL)
    print(f"{Interrupted(number, None)}; nothing to resume", file=sys.stderr)
    raise SystemExit(128 + number)  # through the imports under way, which print no traceback for it


@dataclass
class StopRequest:
    """The signal received, if any."""

    signal_number: int | None = None


@contextlib.contextmanager
def stop_requests() -> Iterator[StopRequest]:
    """Record the first SIGINT or SIGTERM instead of acting on it (only in the main thread, where Python
    runs signal handlers); after it, a second one stops at once; the handlers before it come back at the
    end (under :func:`signals_stop_at_once`, its handlers, which then count this signal as the first)."""
    request = StopRequest()
    if threading.current_thread() is not threading.main_thread():
        yield request
        return
    previous = {number: signal.getsignal(number) for number in SIGNALS}

    def record(number: int, frame: object) -> None:
        request.signal_number = number
        _received.append(number)
        _install(_stop_now)

    _install(record)
    try:
        yield request
    finally:
        if len(_received) < 2:  # after a second signal the default stays: a third ends the cleanup at once
            for number, handler in previous.items():
                signal.signal(number, handler)
