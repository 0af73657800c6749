"""A run directory is its run's own: through the real run.py, one live run at a time, no fresh run over an
old one without overwrite=true, nothing read, written or deleted through a link out of it; an interrupted
run stops after a checkpointed round and says how to resume it."""

from __future__ import annotations

import json
import os
import shlex
import signal
import time
from pathlib import Path

import pytest
from helpers import numbers_of, read_metrics, run_command_line, start_run_py

TINY = ["engine.backend=local", "rounds=2", "eval.probes=false", "engine.checkpoint_every=0"]


@pytest.mark.slow
def test_a_second_run_into_a_live_runs_directory_exits_2_naming_it_and_the_holder(tmp_path):
    run_dir = tmp_path / "run"
    first = start_run_py(run_dir, ["engine.backend=local", "rounds=400", "client.lr=0.04", "eval.every=50"])
    deadline = time.monotonic() + 60
    while not (run_dir / "metrics.jsonl").exists():
        assert first.poll() is None and time.monotonic() < deadline, "the first run ended before the second began"
        time.sleep(0.01)
    for overrides in ([], ["resume=true"]):  # a fresh run and a resume alike
        second = run_command_line([f"hydra.run.dir={run_dir}", "engine.backend=local", "rounds=400", *overrides])
        assert second.returncode == 2
        assert f"error: {run_dir}: another run (pid {first.pid}) is writing this run directory" in second.stderr
    assert first.wait(timeout=120) == 0
    assert [r["round"] for r in read_metrics(run_dir)] == list(range(50, 401, 50))  # every record, once
    assert "client.lr=0.04" in (run_dir / ".hydra" / "overrides.yaml").read_text()  # the first run's, intact
    assert "another run" not in (run_dir / "run.log").read_text()
    assert json.loads((run_dir / "summary.json").read_text())["rounds"] == 400
    assert not (run_dir / ".fedstream.lock").exists()  # released at the end


@pytest.mark.slow
def test_a_fresh_run_over_an_old_one_needs_overwrite_which_clears_it_tensorboard_included(tmp_path):
    run_dir = tmp_path / "run"
    assert run_command_line([f"hydra.run.dir={run_dir}", *TINY]).returncode == 0
    events = sorted((run_dir / "tb").iterdir())
    again = run_command_line([f"hydra.run.dir={run_dir}", *TINY, "client.lr=0.04"])
    assert again.returncode == 2
    assert f"error: {run_dir}: holds a run's outputs (metrics.jsonl, summary.json" in again.stderr
    assert "pass resume=true to continue it or overwrite=true to replace it" in again.stderr
    assert "client.lr=0.04" not in (run_dir / ".hydra" / "overrides.yaml").read_text()  # the old run untouched
    assert sorted((run_dir / "tb").iterdir()) == events
    replaced = run_command_line([f"hydra.run.dir={run_dir}", *TINY, "client.lr=0.04", "overwrite=true"])
    assert replaced.returncode == 0
    assert "overwrite=true removed the previous run's" in replaced.stdout
    new_events = list((run_dir / "tb").iterdir())
    assert len(new_events) == 1 and new_events[0] not in events  # TensorBoard shows the new run alone
    assert [r["round"] for r in read_metrics(run_dir)] == [1, 2]
    assert run_command_line([f"hydra.run.dir={run_dir}", *TINY, "overwrite=maybe"]).returncode == 2


@pytest.mark.parametrize("linked", ["client_state", "summary.json", "checkpoints"])
def test_a_link_out_of_the_run_directory_is_refused_and_its_target_untouched(tmp_path, linked):
    run_dir, outside = tmp_path / "run", tmp_path / "elsewhere"
    run_dir.mkdir()
    outside.mkdir()
    (outside / "keep.txt").write_text("mine")
    target = outside if linked != "summary.json" else outside / "keep.txt"
    (run_dir / linked).symlink_to(target)
    result = run_command_line([f"hydra.run.dir={run_dir}", *TINY])
    assert result.returncode == 2
    assert f"error: {run_dir / linked}: a symbolic link out of the run directory" in result.stderr
    assert sorted(p.name for p in outside.iterdir()) == ["keep.txt"]
    assert (outside / "keep.txt").read_text() == "mine"


def test_a_lock_left_by_a_killed_run_is_taken_over_with_a_warning(tmp_path):
    run_dir = tmp_path / "run"
    run_dir.mkdir()
    (run_dir / ".fedstream.lock").write_text("999999")  # its flock went with its process
    result = run_command_line([f"hydra.run.dir={run_dir}", *TINY])
    assert result.returncode == 0
    assert "took over the lock of pid 999999" in result.stdout + (run_dir / "run.log").read_text()


# Long enough for a signal to land mid-run; a record every 25 rounds, a checkpoint every 50.
INTERRUPTED = ["engine.backend=local", "rounds=150", "eval.every=25", "engine.checkpoint_every=50", "eval.probes=false"]


@pytest.fixture(scope="module")
def uninterrupted(tmp_path_factory: pytest.TempPathFactory) -> Path:
    whole = tmp_path_factory.mktemp("whole")
    assert run_command_line([f"hydra.run.dir={whole}", *INTERRUPTED]).returncode == 0
    return whole


@pytest.mark.slow
@pytest.mark.parametrize(("signal_number", "code"), [(signal.SIGINT, 130), (signal.SIGTERM, 143)])
def test_an_interrupt_stops_after_a_checkpointed_round_and_its_resume_command_finishes_the_same_run(
    tmp_path, uninterrupted, signal_number, code
):
    common, whole = INTERRUPTED, uninterrupted
    run_dir = tmp_path / "run"
    interrupted = start_run_py(run_dir, common)
    deadline = time.monotonic() + 60
    metrics = run_dir / "metrics.jsonl"
    while not (metrics.exists() and metrics.read_text().strip()):  # the first record, round 25: in the rounds
        assert interrupted.poll() is None and time.monotonic() < deadline
        time.sleep(0.01)
    os.killpg(interrupted.pid, signal_number)
    _, stderr = interrupted.communicate(timeout=60)
    assert interrupted.returncode == code
    (line,) = [line for line in stderr.decode().splitlines() if line.startswith("interrupted after round")]
    last = int(line.split()[3])
    assert last < 150 and (run_dir / "checkpoints" / f"round-{last:06d}").is_dir()  # the round it stopped after
    command = shlex.split(line.split("resume with: ")[1])
    assert command[:2] == ["python", "run.py"] and f"hydra.run.dir={run_dir}" in command and "resume=true" in command
    assert run_command_line(command[2:]).returncode == 0
    assert numbers_of(run_dir) == numbers_of(whole)
