"""Malformed input, as a hostile user gives it: one ``error:`` paragraph naming the key or file, exit code 2.

Every case in :data:`CASES` runs through ``run.py``'s entry function in this
process (the exit code and the message the command gives), and a few of them
through the real command too. Each must exit with code 2, name the key or file
in one paragraph on stderr, print no traceback, end within :data:`LIMIT_S`,
and leave Ray unstarted: none of these checks needs Ray.
"""

from __future__ import annotations

import errno
import os
import re
import signal
import subprocess
import sys
from contextlib import contextmanager
from pathlib import Path
from typing import NamedTuple

import numpy as np
import psutil
import pytest
import ray
from helpers import ROOT, fill_leaving, small_file_system

import run as cli
from simulator.run_dir import disk_full

LIMIT_S = 60  # a case that runs longer hangs (most take well under a second)


class Case(NamedTuple):
    args: list[str]  # run.py's arguments; {files} is the folder of malformed files
    names: list[str]  # what the message must contain: the key, the file, the reason


NPZ = ["scenario=npz", "data.path={files}/%s"]  # a user's .npz file (the scenario's clients: 20)


def npz(name: str, *names: str) -> Case:
    return Case([NPZ[0], NPZ[1] % name], ["data.path", f"{name}", *names])


def user(name: str, *names: str) -> Case:
    """A scenario file of the user's, found through hydra.searchpath."""
    return Case([f"scenario={name}", "hydra.searchpath=[file://{files}/user]"], list(names))


CASES: dict[str, Case] = {
    # Composition: Hydra's own errors, before our code sees a config.
    "unknown scenario": Case(["scenario=nope"], ["scenario=nope", "digits", "permuted_digits"]),
    "unknown strategy": Case(["strategy=fedsgd"], ["strategy=fedsgd", "fedavg", "krum"]),
    "unknown federation key": Case(
        ["federation.clients_per_rnd=5"], ["federation.clients_per_rnd", "clients_per_round"]
    ),
    "unknown partition key": Case(["data.partition.alph=1"], ["data.partition.alph", "alpha"]),
    "unknown synthetic key": Case(["data.synthetic.dimm=3"], ["data.synthetic.dimm", "dim"]),
    "unknown data key": Case(["data.pth=x"], ["data.pth", "path"]),
    "unknown engine key": Case(["engine.backnd=local"], ["engine.backnd", "backend"]),
    "unknown eval key": Case(["eval.evry=2"], ["eval.evry", "every"]),
    "unknown model key": Case(["model.nme=cnn"], ["model.nme", "name"]),
    "unknown stream key": Case(["stream.knd=static"], ["stream.knd", "kind"]),
    "unknown client key": Case(["client.lrr=0.1"], ["client.lrr", "unknown key", "lr"]),
    "unknown strategy key": Case(["strategy.fraction_trian=0.5"], ["strategy.fraction_trian", "fraction_train"]),
    "unknown strategy argument": Case(["+strategy.fraction_trian=0.5"], ["strategy._target_", "fraction_trian"]),
    "unknown top-level key": Case(["+foo=1"], ["foo: unknown key", "rounds"]),
    "misspelt rounds": Case(["+round=20"], ["round: unknown key"]),
    "unknown section": Case(["+optimizer.lr=1"], ["optimizer: unknown key"]),
    "override without value": Case(["foo"], ["'foo'"]),
    "override cut short": Case(["rounds=[1"], ["'rounds=[1'"]),
    "dangling interpolation": Case(["rounds=${nope}"], ["rounds", "nope"]),
    "unknown resolver": Case(["client.lr=${oops:1}"], ["client.lr", "oops"]),
    # A user's scenario file (hydra.searchpath).
    "yaml flow not closed": user("unclosed", "unclosed.yaml", "line", "YAML"),
    "yaml bad indentation": user("indented", "indented.yaml", "line", "YAML"),
    "yaml tab": user("tabbed", "tabbed.yaml", "YAML"),
    "scenario extends a missing one": user("extends_missing", "scenario/no_such_base"),
    "scenario misspells round and seeds": user("misspelt", "round: unknown key"),
    "scenario section is a number": user("section_number", "user/scenario/section_number.yaml", "federation = 5"),
    "scenario names a missing strategy": user("missing_strategy", "strategy/fedsgd"),
    "unknown scenario in searchpath": Case(
        ["scenario=nope", "hydra.searchpath=[file://{files}/user]"], ["scenario=nope", "unclosed"]
    ),
    # Wrong types.
    "rounds a word": Case(["rounds=abc"], ["rounds = 'abc'", "expected int"]),
    "seed a fraction": Case(["seed=1.5"], ["seed = 1.5", "expected int"]),
    "seed negative": Case(["seed=-1"], ["seed = -1"]),
    "resume maybe": Case(["resume=maybe"], ["resume = 'maybe'", "expected bool"]),
    "epochs a fraction": Case(["client.epochs=1.5"], ["client.epochs = 1.5", "expected int"]),
    "num_clients a word": Case(["federation.num_clients=abc"], ["federation.num_clients", "expected int"]),
    "federated maybe": Case(["eval.federated=maybe"], ["eval.federated = 'maybe'", "expected bool"]),
    "tasks a number": Case(
        ["stream.kind=class_incremental", "stream.class_incremental.tasks=5"],
        ["stream.class_incremental.tasks = 5", "expected a list"],
    ),
    "tasks of words": Case(
        ["stream.kind=class_incremental", "stream.class_incremental.tasks=[[a]]"],
        ["stream.class_incremental.tasks[0][0]", "expected int"],
    ),
    "section replaced by a number": Case(["federation=5"], ["federation"]),
    "backend a bool": Case(["engine.backend=true"], ["engine.backend = True", "expected str"]),
    "ray_address a list": Case(["engine.ray_address=[1]"], ["engine.ray_address", "expected str or null"]),
    # Impossible values.
    "rounds zero": Case(["rounds=0"], ["rounds = 0", "at least 1"]),
    "rounds negative": Case(["rounds=-3"], ["rounds = -3"]),
    "lr zero": Case(["client.lr=0"], ["client.lr = 0.0", "> 0"]),
    "lr negative": Case(["client.lr=-0.1"], ["client.lr = -0.1"]),
    "momentum one": Case(["client.momentum=1.0"], ["client.momentum = 1.0", "[0, 1)"]),
    "weight decay negative": Case(["client.weight_decay=-1"], ["client.weight_decay"]),
    "batch size zero": Case(["client.batch_size=0"], ["client.batch_size = 0"]),
    "eval every zero": Case(["eval.every=0"], ["eval.every = 0"]),
    "eval batch zero": Case(["eval.batch_size=0"], ["eval.batch_size = 0"]),
    "client test size zero": Case(["eval.client_test_size=0"], ["eval.client_test_size = 0"]),
    "max clients zero": Case(["eval.max_clients=0"], ["eval.max_clients = 0"]),
    "no clients": Case(["federation.num_clients=0"], ["federation.num_clients = 0"]),
    "nobody per round": Case(["federation.clients_per_round=0"], ["federation.clients_per_round = 0"]),
    "more per round than clients": Case(["federation.clients_per_round=21"], ["federation.clients_per_round = 21"]),
    "test fraction one": Case(["data.test_fraction=1.0"], ["data.test_fraction = 1.0"]),
    "test fraction zero": Case(["data.test_fraction=0"], ["data.test_fraction = 0.0"]),
    "dirichlet alpha zero": Case(["data.partition.alpha=0"], ["data.partition.alpha = 0.0"]),
    "min size negative": Case(["data.partition.min_size=-1"], ["data.partition.min_size = -1"]),
    "more classes per client than classes": Case(
        ["data.partition.kind=classes", "data.partition.classes_per_client=11"], ["data.partition.classes_per_client"]
    ),
    "shards zero": Case(["data.partition.shards_per_client=0"], ["data.partition.shards_per_client = 0"]),
    "synthetic one class": Case(
        ["scenario=synthetic", "data.synthetic.num_classes=1"], ["data.synthetic.num_classes = 1"]
    ),
    "rounds per task zero": Case(["stream.rounds_per_task=0"], ["stream.rounds_per_task = 0"]),
    "no tasks": Case(["stream.kind=permuted", "stream.permuted.num_tasks=0"], ["stream.permuted.num_tasks = 0"]),
    "nobody at the start": Case(
        ["stream.kind=class_incremental", "stream.class_incremental.initial_clients=0"],
        ["stream.class_incremental.initial_clients = 0.0"],
    ),
    "everyone stays behind": Case(
        ["stream.kind=class_incremental", "stream.class_incremental.keep_old=1"],
        ["stream.class_incremental.keep_old = 1.0"],
    ),
    "label prior alpha zero": Case(
        ["stream.kind=label_shift", "stream.label_shift.alpha=0"], ["stream.label_shift.alpha = 0.0"]
    ),
    "period zero": Case(["stream.kind=label_shift", "stream.label_shift.period=0"], ["stream.label_shift.period = 0"]),
    "hidden zero": Case(["model.hidden=0"], ["model.hidden = 0"]),
    "feature dim negative": Case(["model.feature_dim=-1"], ["model.feature_dim = -1"]),
    "amp unknown": Case(["engine.amp=fp8"], ["engine.amp = 'fp8'", "expected 'off' or 'bf16'"]),
    "normalize not a bool": Case(["data.normalize=maybe"], ["data.normalize"]),
    "augment typo": Case(["data.augment=crop_flp"], ["data.augment = 'crop_flp'", "valid: crop_flip"]),
    "query samples zero": Case(["strategy=fot", "strategy.query_samples=0"], ["strategy.query_samples = 0"]),
    "hidden huge": Case(["model.hidden=100000000000"], ["model.hidden = 100000000000", "between 1 and 65536"]),
    "feature dim huge": Case(
        ["model.feature_dim=100000000000"], ["model.feature_dim = 100000000000", "between 1 and 65536"]
    ),
    "etf dim huge": Case(
        ["model.head=etf", "model.etf.dim=100000000000"], ["model.etf.dim = 100000000000", "between 2 and 65536"]
    ),
    "etf dim 1e11": Case(["model.head=etf", "model.etf.dim=1e11"], ["model.etf.dim = 100000000000.0", "expected int"]),
    "no actors": Case(["engine.num_actors=0"], ["engine.num_actors = 0"]),
    "no cpus per actor": Case(["engine.num_cpus_per_actor=0"], ["engine.num_cpus_per_actor = 0.0"]),
    "gpus negative": Case(["engine.num_gpus_per_actor=-0.5"], ["engine.num_gpus_per_actor = -0.5"]),
    "threads zero": Case(["engine.torch_threads=0"], ["engine.torch_threads = 0"]),
    "checkpoint every negative": Case(["engine.checkpoint_every=-1"], ["engine.checkpoint_every = -1"]),
    "state memory negative": Case(["engine.client_state_memory_mb=-1"], ["engine.client_state_memory_mb = -1.0"]),
    "timeout zero": Case(["engine.client_timeout_s=0"], ["engine.client_timeout_s = 0.0"]),
    "restarts negative": Case(["engine.max_actor_restarts=-1"], ["engine.max_actor_restarts = -1"]),
    # Numbers past what Ray, torch or the OS timer take: refused by the config check, not blamed on a client.
    "timeout past the timer": Case(
        ["engine.client_timeout_s=1e10"], ["engine.client_timeout_s = 10000000000.0", "at most 1000000 s", "null"]
    ),
    "restarts past Ray's 32 bits": Case(
        ["engine.max_actor_restarts=2147483648"], ["engine.max_actor_restarts = 2147483648", "between 0 and 1000000"]
    ),
    "restarts past 64 bits": Case(
        ["engine.max_actor_restarts=10000000000000000000"], ["engine.max_actor_restarts = 10000000000000000000"]
    ),
    "actors huge": Case(
        ["engine.num_actors=100000000000"], ["engine.num_actors = 100000000000", "between 1 and 100000"]
    ),
    "cpus per actor huge": Case(
        ["engine.num_cpus_per_actor=1e11"], ["engine.num_cpus_per_actor = 100000000000.0", "and 1024"]
    ),
    "cpus per actor below Ray's unit": Case(
        ["engine.num_cpus_per_actor=0.00001"], ["engine.num_cpus_per_actor = 1e-05", "between 0.0001"]
    ),
    "gpus per actor below Ray's unit": Case(
        ["engine.num_gpus_per_actor=0.00001"], ["engine.num_gpus_per_actor = 1e-05", "at least 0.0001"]
    ),
    "virtual features too many": Case(
        ["strategy=ccvr", "strategy.virtual_per_class=100000000"],
        ["strategy.virtual_per_class = 100000000", "GiB of virtual features"],
    ),
    "calibration lr a boolean": Case(
        ["strategy=ccvr", "strategy.calibration_lr=true"], ["strategy.calibration_lr = True", "expected a number > 0"]
    ),
    "threads huge": Case(["engine.torch_threads=10000000000"], ["engine.torch_threads = 10000000000", "and 1024"]),
    "on_nonfinite ignore": Case(["engine.on_nonfinite=ignore"], ["engine.on_nonfinite = 'ignore'", "'drop'"]),
    # Non-finite numbers.
    "lr inf": Case(["client.lr=inf"], ["client.lr = inf", "finite"]),
    "lr nan": Case(["client.lr=nan"], ["client.lr = nan", "finite"]),
    "max angle nan": Case(
        ["stream.kind=rotated", "stream.rotated.max_angle=nan"], ["stream.rotated.max_angle = nan", "finite"]
    ),
    "settings of another stream kind": Case(
        ["stream.kind=permuted", "stream.rotated.max_angle=45"], ["stream.rotated", "another stream", "stream.permuted"]
    ),
    "stream setting misspelt": Case(
        ["stream.kind=permuted", "stream.permuted.num_task=3"], ["stream.permuted.num_task", "unknown key", "num_tasks"]
    ),
    "alpha nan": Case(["data.partition.alpha=nan"], ["data.partition.alpha = nan"]),
    "test fraction -inf": Case(["data.test_fraction=-inf"], ["data.test_fraction = -inf"]),
    "timeout inf": Case(["engine.client_timeout_s=inf"], ["engine.client_timeout_s = inf"]),
    # Unknown names.
    "unknown dataset": Case(["data.dataset=imagenet"], ["data.dataset = 'imagenet'", "digits"]),
    "unknown partition": Case(["data.partition.kind=zipf"], ["data.partition.kind", "dirichlet"]),
    "unknown stream kind": Case(["stream.kind=spiral"], ["stream.kind", "static"]),
    "unknown label shift mode": Case(
        ["stream.kind=label_shift", "stream.label_shift.mode=sideways"], ["stream.label_shift.mode", "abrupt"]
    ),
    "partition section misspelt": Case(["+data.partitoin.kind=iid"], ["data.partitoin", "did you mean data.partition"]),
    "head that is no head": Case(
        ["model.head=torch.nn.Linear"], ["model.head = 'torch.nn.Linear'", "Head(feature_dim"]
    ),
    "unknown model": Case(["model.name=resnet"], ["model.name", "mlp", "cnn"]),
    "model of the wrong signature": Case(
        ["model.name=wrong_models.two_arguments"],
        ["model.name = 'wrong_models.two_arguments'", "takes (input_shape, num_classes)", "model_config)"],
    ),
    "model with keyword-only arguments": Case(
        ["model.name=wrong_models.keyword_only"], ["model.name = 'wrong_models.keyword_only'", "num_classes, config)"]
    ),
    "unknown method": Case(["client.method=adam"], ["client.method", "sgd", "fedprox"]),
    "method module missing": Case(["client.method=no_such_module.Method"], ["client.method", "no_such_module"]),
    "unknown backend": Case(["engine.backend=gpu"], ["engine.backend = 'gpu'", "'local'"]),
    "strategy class missing": Case(
        ["strategy._target_=no_such_module.Strategy"], ["strategy._target_", "no_such_module"]
    ),
    "strategy not a strategy": Case(["strategy._target_=collections.OrderedDict"], ["strategy._target_", "Strategy"]),
    "class of an unknown task": Case(
        ["stream.kind=class_incremental", "stream.class_incremental.tasks=[[0,1],[1,99]]"],
        ["stream.class_incremental.tasks", "99"],
    ),
    # Client method settings.
    "method section misspelt": Case(
        ["client.method=replay", "+client.replya.buffer_size=10"], ["client.replya", "client.replay"]
    ),
    "method setting misspelt": Case(
        ["client.method=replay", "+client.replay.bufer_size=10"], ["client.replay.bufer_size", "buffer_size"]
    ),
    "method setting impossible": Case(
        ["client.method=ewc", "client.ewc.gamma=2"], ["client.ewc.gamma = 2.0", "[0, 1]"]
    ),
    "method setting wrong type": Case(
        ["client.method=lwf", "client.lwf.temperature=hot"], ["client.lwf.temperature", "expected float"]
    ),
    "method setting non-finite": Case(
        ["client.method=fedprox", "client.fedprox.proximal_mu=nan"], ["client.fedprox.proximal_mu = nan"]
    ),
    # Sampling that waits forever or trains nobody.
    "fraction train two": Case(["strategy.fraction_train=2.0"], ["strategy.fraction_train = 2.0", "wait forever"]),
    "fraction evaluate two": Case(
        ["strategy.fraction_evaluate=2.0", "eval.federated=true"], ["strategy.fraction_evaluate = 2.0"]
    ),
    "fraction and minimum zero": Case(
        ["strategy.fraction_train=0", "strategy.min_train_nodes=0"], ["strategy.fraction_train = 0"]
    ),
    "samples no client": Case(
        ["strategy.fraction_train=0.01", "strategy.min_train_nodes=0"], ["strategy.min_train_nodes = 0", "no client"]
    ),
    "minimum above clients": Case(["strategy.min_train_nodes=21"], ["strategy.min_train_nodes = 21", "wait forever"]),
    "available above clients": Case(["strategy.min_available_nodes=50"], ["strategy.min_available_nodes = 50"]),
    "fraction train nan": Case(["strategy.fraction_train=nan"], ["strategy.fraction_train = nan"]),
    # Where Ray would run: checks that need no Ray cluster.
    "ray address refused": Case(
        ["engine.ray_address=127.0.0.1:1"], ["engine.ray_address = '127.0.0.1:1'", "cannot reach"]
    ),
    "ray address no port": Case(["engine.ray_address=somewhere"], ["engine.ray_address = 'somewhere'", "host:port"]),
    "ray address unknown host": Case(
        ["engine.ray_address=no-such-host.invalid:6379"], ["engine.ray_address", "no-such-host.invalid"]
    ),
    "more gpus than the machine": Case(
        ["engine.num_gpus_per_actor=64"], ["engine.num_gpus_per_actor = 64", "128 GPUs"]
    ),
    # Data files.
    "npz missing": npz("no_such.npz", "does not exist"),
    "npz a folder": npz("user", "not a .npz"),
    "npz not a zip": npz("text.npz", "not a .npz"),
    "npz without x": npz("no_x.npz", "missing arrays ['x']"),
    "npz x_test without y_test": npz("no_y_test.npz", "y_test"),
    "npz lengths differ": npz("lengths.npz", "50 inputs but 49 labels"),
    "npz NaN inputs": npz("nan.npz", "NaN"),
    "npz inf inputs": npz("inf.npz", "infinite"),
    "npz string inputs": npz("strings.npz", "inputs"),
    "npz complex inputs": npz("complex.npz", "inputs"),
    "npz 1-d inputs": npz("flat.npz", "(N, D)"),
    "npz float labels": npz("float_labels.npz", "integer"),
    "npz negative labels": npz("negative_labels.npz", ">= 0"),
    "npz label 2**40": npz("huge_label.npz", f"0 .. {2**40}", "class indices"),
    "npz test label 2**40": npz("huge_test_label.npz", f"0 .. {2**40}", "class indices"),
    "npz pickled object": npz("objects.npz", "not a .npz"),
    "npz test shape differs": npz("test_shape.npz", "differ from train"),
    "npz empty": npz("empty.npz", "no samples"),
    "npz one class": npz("one_class.npz", "2 classes"),
    "npz without path": Case(["scenario=npz"], ["data.path = None"]),
    "mnist folder missing": Case(["data.dataset=mnist", "data.path=/no/such/folder"], ["data.path", "/no/such/folder"]),
    "mnist folder empty": Case(
        ["data.dataset=mnist", "data.path={files}/empty_dir"], ["data.path", "empty_dir", "train-images"]
    ),
    "mnist bad magic": Case(
        ["data.dataset=mnist", "data.path={files}/bad_mnist"], ["train-images-idx3-ubyte", "magic"]
    ),
    "mnist bad gzip": Case(
        ["data.dataset=mnist", "data.path={files}/bad_gzip"], ["train-images-idx3-ubyte.gz", "gzip"]
    ),
    "cifar garbage batch": Case(["data.dataset=cifar10", "data.path={files}/bad_cifar"], ["data_batch_1", "CIFAR"]),
    # Resuming.
    "resume without checkpoint": Case(["resume=true", "hydra.run.dir={files}/empty_dir"], ["checkpoints"]),
    "resume from garbage": Case(["resume=true", "hydra.run.dir={files}/garbage_run"], ["checkpoints"]),
}

# A handful also through the real command: the same code and message, and no Ray left behind.
SUBPROCESS = [
    "yaml flow not closed",
    "unknown federation key",
    "unknown top-level key",
    "ray address refused",
    "more gpus than the machine",
]

USER_SCENARIOS = {
    "unclosed": "# @package _global_\ndefaults:\n  - /scenario/digits\nrounds: [1\n",
    "indented": "# @package _global_\nrounds: 1\n  seed: 2\n",
    "tabbed": "# @package _global_\nfederation:\n\tnum_clients: 5\n",
    "extends_missing": "# @package _global_\ndefaults:\n  - /scenario/no_such_base\n",
    "misspelt": "# @package _global_\ndefaults:\n  - /scenario/digits\nround: 20\nseeds: 3\n",
    "section_number": "# @package _global_\ndefaults:\n  - /scenario/digits\nfederation: 5\n",
    "missing_strategy": "# @package _global_\ndefaults:\n  - /scenario/digits\n  - override /strategy: fedsgd\n",
}


def _write_files(root: Path) -> None:
    rng = np.random.default_rng(0)
    x, y = rng.random((50, 4)).astype(np.float32), np.arange(50) % 2
    (root / "user" / "scenario").mkdir(parents=True)
    for name, text in USER_SCENARIOS.items():
        (root / "user" / "scenario" / f"{name}.yaml").write_text(text)
    (root / "text.npz").write_text("not a zip archive\n")
    np.savez(root / "no_x.npz", y=y)
    np.savez(root / "no_y_test.npz", x=x, y=y, x_test=x)
    np.savez(root / "lengths.npz", x=x, y=y[:49])
    nan, inf = x.copy(), x.copy()
    nan[7, 2], inf[3, 1] = np.nan, np.inf
    np.savez(root / "nan.npz", x=nan, y=y)
    np.savez(root / "inf.npz", x=inf, y=y)
    np.savez(root / "strings.npz", x=np.array([["a"] * 4] * 50), y=y)
    np.savez(root / "complex.npz", x=x.astype(np.complex64), y=y)
    np.savez(root / "flat.npz", x=x[:, 0], y=y)
    np.savez(root / "float_labels.npz", x=x, y=y.astype(np.float32))
    np.savez(root / "negative_labels.npz", x=x, y=y - 1)
    np.savez(root / "huge_label.npz", x=x, y=np.where(np.arange(50) == 7, 2**40, y))
    np.savez(root / "huge_test_label.npz", x=x, y=y, x_test=x[:5], y_test=np.array([0, 1, 2**40, 0, 1]))
    np.savez(root / "objects.npz", x=np.array([{"a": 1}] * 50, dtype=object), y=y)
    np.savez(root / "test_shape.npz", x=x, y=y, x_test=x[:, :3], y_test=y)
    np.savez(root / "empty.npz", x=x[:0], y=y[:0])
    np.savez(root / "one_class.npz", x=x, y=np.zeros(50, dtype=np.int64))
    (root / "empty_dir").mkdir()
    (root / "bad_mnist").mkdir()
    for split in ("train", "t10k"):
        (root / "bad_mnist" / f"{split}-images-idx3-ubyte").write_bytes(b"\x12\x34\x56\x78" * 4)
        (root / "bad_mnist" / f"{split}-labels-idx1-ubyte").write_bytes(b"\x12\x34\x56\x78" * 4)
    (root / "bad_gzip").mkdir()
    for name in ("train-images-idx3-ubyte.gz", "train-labels-idx1-ubyte.gz"):
        (root / "bad_gzip" / name).write_bytes(b"not gzip")
    (root / "bad_cifar").mkdir()
    (root / "bad_cifar" / "data_batch_1").write_bytes(b"garbage, not a pickle")
    checkpoints = root / "garbage_run" / "checkpoints"
    checkpoints.mkdir(parents=True)
    for name in ("last.pkl", "manifest.json", "round_000001.npz"):
        (checkpoints / name).write_bytes(b"\x00garbage")


@pytest.fixture(scope="module")
def files(tmp_path_factory) -> Path:
    root = tmp_path_factory.mktemp("malformed")
    _write_files(root)
    return root


# In this process Hydra's log file and .hydra/ folder are left out: a third faster, and not under test.
QUIET = ["hydra/job_logging=disabled", "hydra/hydra_logging=disabled", "hydra.output_subdir=null"]


def _args(case: Case, files: Path, run_dir: Path) -> list[str]:
    args = [arg.replace("{files}", str(files)) for arg in case.args]
    if not any(arg.startswith("hydra.run.dir=") for arg in args):
        args.append(f"hydra.run.dir={run_dir}")
    return args


@contextmanager
def _time_limit(seconds: int):
    def hang(*_):
        raise TimeoutError(f"still running after {seconds} s: it hangs")

    previous = signal.signal(signal.SIGALRM, hang)
    signal.alarm(seconds)
    try:
        yield
    finally:
        signal.alarm(0)
        signal.signal(signal.SIGALRM, previous)


def _check_message(case: Case, code: int, stderr: str, stdout: str) -> None:
    output = stdout + stderr
    assert code == 2, output
    assert "Traceback" not in output, output
    errors = [line for line in stderr.splitlines() if line.startswith("error: ")]
    assert len(errors) == 1, output  # one paragraph
    for name in case.names:
        assert name in errors[0], f"{name!r} not in {errors[0]!r}"
    assert not ray.is_initialized()


def test_there_are_at_least_80_cases():
    assert len(CASES) >= 80 and set(SUBPROCESS) <= set(CASES)


@pytest.mark.parametrize("name", list(CASES))
def test_malformed_input_exits_2_naming_the_key_or_file(name, files, tmp_path, capsys, user_code):
    case = CASES[name]
    with _time_limit(LIMIT_S):
        code = cli.main_cli([*_args(case, files, tmp_path / "run"), *QUIET])
    captured = capsys.readouterr()
    _check_message(case, code, captured.err, captured.out)
    metrics = tmp_path / "run" / "metrics.jsonl"
    assert not metrics.exists() or not metrics.read_text()  # no round ran


def _left_behind(marker: str) -> list[str]:
    """Processes still alive that inherited ``marker`` from the command (Ray's raylet and GCS would)."""
    left = []
    for process in psutil.process_iter(["name"]):
        try:
            if process.environ().get("FEDSTREAM_FUZZ") == marker:
                left.append(process.info["name"])
        except (psutil.AccessDenied, psutil.NoSuchProcess, psutil.ZombieProcess):
            pass
    return left


@pytest.fixture(scope="module")
def commands(files, tmp_path_factory) -> dict[str, tuple[subprocess.Popen, str]]:
    """The subprocess cases, all started at once (each spends seconds importing torch and Ray)."""
    started = {}
    for name in SUBPROCESS:
        marker = f"{os.getpid()}-{name}"
        run_dir = tmp_path_factory.mktemp("command") / "run"
        started[name] = (
            subprocess.Popen(
                [sys.executable, "run.py", *_args(CASES[name], files, run_dir)],
                cwd=ROOT,
                text=True,
                stdout=subprocess.PIPE,
                stderr=subprocess.PIPE,
                env={**os.environ, "FEDSTREAM_FUZZ": marker},
            ),
            marker,
        )
    yield started
    for process, _ in started.values():
        process.kill()
        process.wait()


@pytest.mark.parametrize("name", SUBPROCESS)
@pytest.mark.slow
def test_the_command_gives_the_same_code_and_message_and_starts_no_ray(name, commands):
    process, marker = commands[name]
    stdout, stderr = process.communicate(timeout=LIMIT_S)
    _check_message(CASES[name], process.returncode, stderr, stdout)
    assert not _left_behind(marker)


def test_a_sweep_with_a_misspelt_key_fails_before_any_job(tmp_path):
    code = cli.main_cli(["--multirun", "seed=0,1", "federation.clients_per_rnd=5", f"hydra.sweep.dir={tmp_path}"])
    assert code == 2
    assert not list(tmp_path.glob("*/metrics.jsonl"))


def test_help_and_cfg_still_print_and_exit_0(capsys):
    assert cli.main_cli(["--help"]) == 0
    scenarios = next(line for line in capsys.readouterr().out.splitlines() if line.startswith("scenario: "))
    assert {"cifar10", "digits", "fashion_class_incremental"} <= set(scenarios.removeprefix("scenario: ").split(", "))
    assert cli.main_cli(["--cfg", "job", "rounds=3"]) == 0
    assert "rounds: 3" in capsys.readouterr().out


@pytest.fixture
def small_disk(tmp_path):
    """A 1 MiB file system of its own (skipped where it cannot be mounted)."""
    with small_file_system(tmp_path / "disk", "1m") as disk:
        yield disk


# KiB left free: none (the run's lock file), then room for its first files (config_resolved.yaml, metrics.jsonl,
# TensorBoard's folder, the matrices, summary.json: where the disk fills depends on the data and the code),
# with and without checkpoints.
@pytest.mark.parametrize("kib, checkpoints", [(0, 0), (16, 0), (24, 0), (40, 0), (44, 0), (48, 0), (40, 1), (100, 1)])
def test_a_full_disk_ends_the_run_with_one_error_line_naming_the_file(small_disk, capsys, kib, checkpoints):
    disk = small_disk
    fill_leaving(disk, kib * 1024)
    args = ["rounds=3", "engine.backend=local", f"engine.checkpoint_every={checkpoints}"]
    code = cli.main_cli([*args, f"hydra.run.dir={disk / 'run'}", *QUIET])
    captured = capsys.readouterr()
    output = captured.out + captured.err
    assert code == 1, output
    assert "Traceback" not in output and "Logging error" not in output, output
    errors = [line for line in captured.err.splitlines() if line.startswith("error: ")]
    assert len(errors) == 1, output
    assert re.fullmatch(rf"error: no space left on device writing {re.escape(str(disk / 'run'))}/\S+", errors[0])


def test_only_a_full_disk_and_what_is_raised_from_it_is_called_a_full_disk():
    full = OSError(errno.ENOSPC, "No space left on device")
    try:
        try:
            raise full
        except OSError:
            {}["hiden"]  # a bug in code that handles a full disk: its traceback must show
    except KeyError as bug:
        assert disk_full(bug) is None
    try:
        raise RuntimeError("saving failed") from full
    except RuntimeError as wrapped:
        assert disk_full(wrapped) == "no space left on device writing a file the error does not name"
