"""Ctrl-C and SIGTERM in every phase of the real run.py, and SIGKILL of a Ray driver: one line, exit 128 +
the signal, no traceback, a second signal that stops at once, and no Ray process left behind."""

from __future__ import annotations

import os
import shlex
import signal
import time
from pathlib import Path

import psutil
import pytest
from helpers import USER_PYTHONPATH, run_command_line, start_run_py

from simulator.interrupts import Interrupted, signals_stop_at_once, stop_requests

NAME = {signal.SIGINT: "SIGINT", signal.SIGTERM: "SIGTERM"}


def _wait(process, condition, what: str, timeout_s: float = 120) -> None:
    deadline = time.monotonic() + timeout_s
    while not condition():
        assert process.poll() is None, f"the run ended before {what}: {process.stderr.read().decode()[-3000:]}"
        assert time.monotonic() < deadline, f"no {what} within {timeout_s} s"
        time.sleep(0.005)


def _handles(pid: int, number: int) -> bool:
    """Whether process ``pid`` has a handler of its own for signal ``number`` (SigCgt in /proc)."""
    status = Path(f"/proc/{pid}/status").read_text()
    caught = next(line.split()[1] for line in status.splitlines() if line.startswith("SigCgt:"))
    return bool(int(caught, 16) >> (number - 1) & 1)


def _messages(stderr: bytes) -> list[str]:
    """What the command said: stderr without its progress bar and blank lines."""
    lines = stderr.decode().replace("\r", "\n").splitlines()
    return [line for line in lines if line.strip() and not line.startswith("round:")]


def _tree(pid: int) -> list[psutil.Process]:
    try:
        return psutil.Process(pid).children(recursive=True)
    except psutil.NoSuchProcess:
        return []


def _alive(processes: list[psutil.Process]) -> list[psutil.Process]:
    """Those of ``processes`` still running (psutil checks the pid's start time: never a reused pid)."""
    alive = []
    for process in processes:
        try:
            if process.is_running() and process.status() != psutil.STATUS_ZOMBIE:
                alive.append(process)
        except psutil.NoSuchProcess:
            pass
    return alive


def _names(processes: list[psutil.Process]) -> list[str]:
    names = []
    for process in processes:
        try:
            names.append(" ".join(process.cmdline())[:80] or process.name())
        except psutil.Error:
            names.append(str(process.pid))
    return names


def _gone_within(processes: list[psutil.Process], seconds: float) -> list[str]:
    """Wait up to ``seconds`` for ``processes`` to end; the command lines of those that did not (killed now)."""
    deadline = time.monotonic() + seconds
    while _alive(processes) and time.monotonic() < deadline:
        time.sleep(0.05)
    left = _alive(processes)
    names = _names(left)
    for process in left:
        process.kill()
    return names


@pytest.mark.slow
@pytest.mark.parametrize("number", [signal.SIGINT, signal.SIGTERM], ids=["SIGINT", "SIGTERM"])
def test_a_signal_while_the_command_imports_its_modules_is_one_line_and_128_plus_the_signal(tmp_path, number):
    run = start_run_py(tmp_path / "run", ["engine.backend=local", "rounds=2"])
    _wait(run, lambda: _handles(run.pid, signal.SIGTERM), "run.py's first handler")  # torch's import follows
    run.send_signal(number)
    _, stderr = run.communicate(timeout=60)
    assert run.returncode == 128 + number
    assert _messages(stderr) == [f"interrupted before the rounds began ({NAME[number]}); nothing to resume"]


@pytest.mark.slow
@pytest.mark.parametrize("number", [signal.SIGINT, signal.SIGTERM], ids=["SIGINT", "SIGTERM"])
def test_a_signal_while_the_model_builds_stops_at_once_and_says_how_to_run_it_again(
    tmp_path, user_code, monkeypatch, number
):
    monkeypatch.setenv("FEDSTREAM_TEST_SENTINEL", str(tmp_path / "building"))
    run_dir = tmp_path / "run"
    run = start_run_py(
        run_dir,
        [
            "engine.backend=local",
            "rounds=2",
            "eval.probes=false",
            "eval.diagnostics=false",
            "model.name=slow_phases.slow_to_build",
        ],
    )
    _wait(run, (tmp_path / "building").exists, "the model's build")
    started = time.monotonic()
    run.send_signal(number)
    _, stderr = run.communicate(timeout=60)
    assert time.monotonic() - started < 20  # not the 60 s the build takes
    assert run.returncode == 128 + number
    (line,) = _messages(stderr)
    assert line.startswith(f"interrupted before the rounds began ({NAME[number]}); nothing to resume; run it again")
    assert f"error: interrupted before the rounds began ({NAME[number]})" in (run_dir / "run.log").read_text()
    command = shlex.split(line.split("run it again with: ")[1])
    assert command[:2] == ["python", "run.py"] and "overwrite=true" in command  # config_resolved.yaml is there
    assert run_command_line(command[2:], pythonpath=USER_PYTHONPATH).returncode == 0  # the model builds at once


def _signalled_twice_in_round_two(tmp_path: Path, monkeypatch, overrides: list[str], number: int) -> list[str]:
    """What a run whose round-2 clients sleep 20 s each said when ``number`` came twice in that round; it must
    have stopped at once, with 128 + ``number``."""
    monkeypatch.setenv("FEDSTREAM_TEST_SENTINEL", str(tmp_path / "round-2"))
    run = start_run_py(tmp_path / "run", [*overrides, "rounds=3", "client.method=slow_phases.SlowInRoundTwo"])
    _wait(run, (tmp_path / "round-2").exists, "round 2")
    started = time.monotonic()
    run.send_signal(number)  # the first: stop after round 2
    time.sleep(0.5)
    run.send_signal(number)  # the second: now
    _, stderr = run.communicate(timeout=60)
    assert time.monotonic() - started < 15
    assert run.returncode == 128 + number
    return _messages(stderr)


@pytest.mark.slow
def test_a_second_signal_in_a_round_stops_at_once_with_the_last_checkpoint_to_resume_from(
    tmp_path, user_code, monkeypatch
):
    overrides = ["engine.backend=local", "engine.checkpoint_every=1"]
    (line,) = _signalled_twice_in_round_two(tmp_path, monkeypatch, overrides, signal.SIGINT)
    assert line.startswith("interrupted again (SIGINT): stopped at once; resume with: python run.py ")
    assert line.endswith("resume=true (from round 1)")


@pytest.mark.ray
@pytest.mark.slow
def test_a_signal_while_ray_starts_stops_the_run_and_every_ray_process(tmp_path):
    run = start_run_py(tmp_path / "run", ["engine.backend=ray", "engine.num_actors=1", "rounds=2"])
    _wait(run, lambda: any(p.name() == "raylet" for p in _alive(_tree(run.pid))), "Ray's raylet")
    started = _tree(run.pid)
    run.send_signal(signal.SIGTERM)  # ray.init's own handler would make it exit code 15, and say nothing
    _, stderr = run.communicate(timeout=60)
    assert run.returncode == 143
    (line,) = _messages(stderr)
    assert line.startswith("interrupted before the rounds began (SIGTERM); nothing to resume; run it again with: ")
    assert _gone_within(started + _tree(run.pid), 5) == []


@pytest.mark.ray
@pytest.mark.slow
def test_a_second_signal_stops_a_ray_round_at_once(tmp_path, user_code, monkeypatch):
    """ray.get runs signal handlers only between its waits, and only for a KeyboardInterrupt does it stop."""
    overrides = ["engine.backend=ray", "engine.num_actors=1"]
    messages = _signalled_twice_in_round_two(tmp_path, monkeypatch, overrides, signal.SIGTERM)
    (line,) = [line for line in messages if line.startswith("interrupted")]  # Ray may say more
    assert line.startswith("interrupted again (SIGTERM): stopped at once; resume with: python run.py ")
    assert line.endswith("resume=true (from round 1)")


@pytest.mark.ray
@pytest.mark.slow
def test_after_a_sigkill_of_the_driver_no_ray_process_outlives_it_by_more_than_a_few_seconds(tmp_path):
    run = start_run_py(tmp_path / "run", ["engine.backend=ray", "engine.num_actors=1", "rounds=500"])
    metrics = tmp_path / "run" / "metrics.jsonl"
    _wait(run, lambda: metrics.exists() and metrics.read_text().strip(), "the first record")
    ray_processes = _tree(run.pid)
    names = " ".join(_names(ray_processes))
    assert "raylet" in names and "DashboardAgent" in names and "RuntimeEnvAgent" in names  # the raylet's agents
    os.kill(run.pid, signal.SIGKILL)  # the driver only, not its process group
    run.wait(timeout=30)
    assert _gone_within(ray_processes, 5) == []  # the agents alone would take 60 s


def test_after_a_second_signal_the_cleanup_leaves_the_default_action_to_a_third():
    with signals_stop_at_once():
        with pytest.raises(Interrupted, match="interrupted again"), stop_requests() as request:
            os.kill(os.getpid(), signal.SIGINT)  # the first: recorded, the round goes on
            assert request.signal_number == signal.SIGINT
            os.kill(os.getpid(), signal.SIGINT)  # the second: stops at once
            time.sleep(1)
        assert signal.getsignal(signal.SIGINT) is signal.SIG_DFL  # a third during cleanup ends the process
    assert signal.getsignal(signal.SIGINT) is signal.default_int_handler
