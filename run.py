"""Run a FedStream scenario: ``python run.py [scenario=NAME] [strategy=NAME] [key=value ...]``.

Hydra composes ``scenarios/config.yaml`` with the chosen scenario and strategy
files; the run directory (``hydra.run.dir``) receives metrics, the accuracy
matrix, the summary, TensorBoard logs, checkpoints and plots.

Exit codes: 0 done; 2 bad input (a config value, an override, a scenario file,
the data, a checkpoint to resume), with one ``error: ...`` paragraph naming the
key or file; 1 the run failed: a client (its traceback in the message), the
strategy's arrays (not the model's, or not finite; the message names it), a
strategy's own method, named with the round (``round 4: FOT.on_task_end raised ...``),
a strategy whose checkpointed state would not restore it, or a full disk
(``error: no space left on device writing FILE``, with nothing written to
``run.log``: it has no room either); 130 / 143 interrupted by SIGINT / SIGTERM,
with one line saying how to resume.

What a run directory holds when the run does not finish:

- An error composing the config (an unknown key or file, an override that does
  not parse) stops before Hydra makes the run directory: there is none.
- The run directory is the run's own (``simulator/run_guard.py``): a second
  live run into it, a fresh run over an old one (without ``overwrite=true``)
  and a symbolic link out of it are refused (exit 2) before this run writes
  anything there; ``.hydra/`` is written once the run holds the directory.
- Any later error leaves ``.hydra/`` and ``run.log`` marked: no
  ``summary.json``, and ``run.log`` ends with the ``error: ...`` paragraph,
  followed by the traceback for a client failure or any other error (a config
  error needs none).
- ``config_resolved.yaml``: the job's config with every ``${...}``
  interpolation resolved (``.hydra/config.yaml`` keeps them), written once the
  config passes its checks and the strategy builds, before the run starts
  (the engine may still refuse the run, e.g. for its data).
"""

from __future__ import annotations

import json
import logging
import os
import re
import shlex
import sys
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any

from simulator.interrupts import Interrupted, as_interrupted, exit_while_importing, signals_stop_at_once

if __name__ == "__main__":  # the imports below take a second or more: a signal meanwhile ends it with one line
    exit_while_importing()

import hydra
import hydra._internal.utils as hydra_utils
import yaml
from hydra.core.hydra_config import HydraConfig
from hydra.errors import HydraException, MissingConfigException, OverrideParseException
from hydra.types import RunMode
from omegaconf import DictConfig, OmegaConf
from omegaconf.errors import OmegaConfBaseException

from simulator.backends import ClientFailure
from simulator.config import SCENARIO_DIR, ConfigError, run_flags, valid_keys
from simulator.engine import Experiment
from simulator.plugins import load_config
from simulator.run_dir import RESOLVED_CONFIG, disk_full
from simulator.run_guard import OUTPUTS, RunDirectoryBusy, claim_run_directory
from strategies import build_strategy
from strategies.factory import strategy_arguments, strategy_class, unknown_argument

_task_started = False  # whether composition got as far as our task function
_sweep_failures: list[int] = []  # the exit codes of a sweep's failed jobs


@hydra.main(config_path=str(SCENARIO_DIR), config_name="config", version_base="1.3")
def main(cfg: DictConfig) -> float | None:
    """Validate, build the strategy, run, print the run directory and summary."""
    global _task_started
    _task_started = True
    hydra_cfg = HydraConfig.get()
    run_dir = Path(hydra_cfg.runtime.output_dir)
    sweep = hydra_cfg.mode == RunMode.MULTIRUN
    # The jobs of a sweep in this process share one Ray and its warm actors; a launcher that
    # runs jobs in other processes gets a Ray per job, as a single run does.
    keep_warm = sweep and hydra_cfg.launcher._target_.endswith(".BasicLauncher")
    try:
        resume, overwrite = run_flags(cfg)
        with claim_run_directory(run_dir, resume, overwrite):
            _save_hydra_files(run_dir, cfg, hydra_cfg)
            config = load_config(cfg)
            strategy = build_strategy(cfg.strategy)
            (run_dir / RESOLVED_CONFIG).write_text(OmegaConf.to_yaml(cfg, resolve=True))
            summary = Experiment(config, strategy, run_dir, resume=resume, keep_warm=keep_warm).run()
    except KeyboardInterrupt as error:  # a sweep stops too: the user asked the command to
        stop = as_interrupted(error)  # Ray's waits raise a signal's as a plain KeyboardInterrupt
        _to_log_file(str(stop))
        print(f"{stop}; {_after_interrupt(run_dir, hydra_cfg, stop)}", file=sys.stderr)
        sys.exit(stop.exit_code)
    except RunDirectoryBusy as error:  # the directory, its run.log included, is another live run's
        return _fail(str(error), 2, sweep)
    except ConfigError as error:
        _to_log_file(str(error))
        return _fail(str(error), 2, sweep)
    except ClientFailure as error:  # the client's own traceback is in the message
        _to_log_file(str(error), error)
        return _fail(str(error), 1, sweep)
    except Exception as error:  # a bug: Hydra prints the traceback and ends the command
        if message := disk_full(error):  # no bug: one line naming the file (run.log has no room either)
            return _fail(message, 1, sweep)
        _to_log_file(f"{type(error).__name__}: {error}", error)
        raise
    print(f"run directory: {run_dir}")
    print(json.dumps(summary, indent=2))
    return summary["final_accuracy"]


def _after_interrupt(run_dir: Path, hydra_cfg: DictConfig, stop: Interrupted) -> str:
    """What continues an interrupted run: this job's overrides, its directory, resume=true; where no
    checkpoint was written, why not, and (stopped before its rounds) the command that starts it again."""
    kept = [o for o in hydra_cfg.overrides.task if not o.startswith(("resume=", "overwrite=", "hydra.run.dir="))]
    saved = sorted(path.name for path in (run_dir / "checkpoints").glob("round-[0-9]*"))
    if saved:
        command = _command([*kept, f"hydra.run.dir={run_dir}", "resume=true"])
        return f"resume with: {command}" + (f" (from round {int(saved[-1][6:])})" if stop.again else "")
    if stop.last_round is not None:
        return "engine.checkpoint_every = 0: no checkpoint to resume from"
    fresh = ["overwrite=true"] if any((run_dir / name).exists() for name in OUTPUTS) else []
    return f"nothing to resume; run it again with: {_command([*kept, f'hydra.run.dir={run_dir}', *fresh])}"


def _command(arguments: list[str]) -> str:
    return "python run.py " + " ".join(shlex.quote(argument) for argument in arguments)


def _save_hydra_files(run_dir: Path, cfg: DictConfig, hydra_cfg: DictConfig) -> None:
    """``.hydra/config.yaml``, ``hydra.yaml`` and ``overrides.yaml``, as Hydra writes them, but only once this
    run holds its directory (``hydra.output_subdir`` is null: Hydra would write them over a live run's)."""
    folder = run_dir / ".hydra"
    folder.mkdir(exist_ok=True)
    OmegaConf.save(cfg, folder / "config.yaml")
    OmegaConf.save(OmegaConf.create({"hydra": hydra_cfg}), folder / "hydra.yaml")
    OmegaConf.save(hydra_cfg.overrides.task, folder / "overrides.yaml")


def _to_log_file(message: str, error: BaseException | None = None) -> None:
    """Write ``error: message`` and, given ``error``, its traceback to the job's log file (``run.log``) only.

    The console already gets the paragraph from :func:`_fail` (or Hydra's report);
    logging it to the ``fedstream`` logger would print it there twice.
    """
    trace = (type(error), error, error.__traceback__) if error else None
    record = logging.LogRecord("fedstream", logging.ERROR, __file__, 0, "error: %s", (message,), trace)
    for handler in logging.getLogger().handlers:
        if isinstance(handler, logging.FileHandler):
            handler.handle(record)


def _fail(message: str, code: int, sweep: bool = False) -> None:
    """Say what failed; end the command with ``code``, or, in a sweep, go on to the next job
    (the command ends with the worst code once every job has run)."""
    print(f"error: {message}", file=sys.stderr)
    if not sweep:
        sys.exit(code)
    _sweep_failures.append(code)


def composition_error(error: BaseException) -> str | None:
    """One paragraph naming the file or key for an error Hydra raised composing the config; None if not one."""
    if isinstance(error, yaml.YAMLError):
        mark = getattr(error, "problem_mark", None)
        where = f"{mark.name}, line {mark.line + 1}, column {mark.column + 1}" if mark else "a config file"
        what = "; ".join(str(p) for p in (getattr(error, "context", None), getattr(error, "problem", None)) if p)
        return f"{where}: YAML syntax error: {what or error}"
    if isinstance(error, MissingConfigException):
        missing = error.missing_cfg_file or ""
        group, _, name = missing.rpartition("/")
        if group and error.options:
            return (
                f"{group}={name}: no {group} file {missing}.yaml in the config search path; "
                f"available: {', '.join(error.options)}"
            )
        return _paragraph(str(error))
    if isinstance(error, OverrideParseException):
        return f"cannot parse the override {error.override!r}: {_paragraph(error.message)}"
    if isinstance(error, HydraException):
        text = str(error)
        unknown = re.match(r"Could not override '([^']+)'", text)
        if unknown and "not in struct" in str(error.__cause__ or ""):
            return _unknown_key(unknown.group(1), getattr(error.__cause__, "parent_node", None))
        cause = f" ({_paragraph(str(error.__cause__))})" if error.__cause__ else ""
        return _paragraph(text) + cause
    if isinstance(error, OmegaConfBaseException):
        return _paragraph(str(error))
    return None


def _unknown_key(key: str, parent: Any) -> str:
    """An override of a key the composed config lacks: the valid keys (a strategy's: its constructor's arguments)."""
    if isinstance(parent, DictConfig) and "_target_" in parent:
        path, _, name = key.rpartition(".")
        try:
            problem = unknown_argument(parent._target_, key)
            arguments = strategy_arguments(parent._target_, path)
            class_name = strategy_class(parent._target_, path).__name__
        except ConfigError as error:  # the class itself is missing
            return str(error)
        if problem:
            return problem
        if arguments is not None and name in arguments:
            return f"{key}: {class_name} takes it, but the strategy file does not set it; add it with +{key}=..."
        if arguments is None:  # **kwargs along its whole chain: never claim it takes the key
            return (
                f"{key}: unknown key; the strategy file does not set it, and which arguments {class_name} "
                f"takes cannot be read (its constructor takes **kwargs); if it does take it, add it "
                f"with +{key}=..."
            )
        return (
            f"{key}: unknown key; the strategy file does not set it; valid keys: {', '.join(arguments)} "
            f"(read up {class_name}'s parents: its constructor takes **kwargs, so another key is refused "
            f"only when it is built; if it does take it, add it with +{key}=...)"
        )
    keys = [str(k) for k in parent.keys()] if isinstance(parent, DictConfig) else []
    keys = keys or valid_keys(key.rpartition(".")[0])
    return f"{key}: unknown key; valid keys: {', '.join(keys) or '(none)'}"


def _paragraph(text: str) -> str:
    """Hydra's multi-line message as one paragraph, without its hint to set HYDRA_FULL_ERROR."""
    lines = [line.strip() for line in text.splitlines() if line.strip() and "HYDRA_FULL_ERROR" not in line]
    return "; ".join(lines)


def _reporting(original: Callable[[Callable[[], Any]], Any]) -> Callable[[Callable[[], Any]], Any]:
    """Hydra's run_and_report, but a composition error is one ``error:`` paragraph and exit code 2."""

    def run_and_report(func: Callable[[], Any]) -> Any:
        try:
            return func()
        except Exception as error:
            message = None if _task_started else composition_error(error)
            if message is None or os.environ.get("HYDRA_FULL_ERROR") == "1":
                return original(lambda error=error: _raise(error))
            _fail(message, 2)

    return run_and_report


def _raise(error: BaseException) -> None:
    raise error


def main_cli(argv: Sequence[str]) -> int:
    """``python run.py *argv``, in this process: the exit code (messages as the command prints them)."""
    global _task_started
    _task_started = False
    _sweep_failures.clear()
    original, saved_argv = hydra_utils.run_and_report, sys.argv
    hydra_utils.run_and_report = _reporting(original)
    sys.argv = [str(Path(__file__).resolve()), *argv]
    try:
        with signals_stop_at_once():  # Ctrl-C, SIGTERM: one line and 130, 143 (simulator/interrupts.py)
            main()
    except KeyboardInterrupt as error:  # before our task began (Hydra composing the config)
        stop = as_interrupted(error)
        print(f"{stop}; nothing to resume", file=sys.stderr)
        return stop.exit_code
    except SystemExit as exit_:
        code = exit_.code
        if code is None or isinstance(code, int):
            return code or 0
        print(code, file=sys.stderr)
        return 1
    finally:
        hydra_utils.run_and_report, sys.argv = original, saved_argv
    return max(_sweep_failures, default=0)  # a sweep whose jobs failed ran the others, then says so


if __name__ == "__main__":
    sys.exit(main_cli(sys.argv[1:]))
