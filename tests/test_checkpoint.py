"""Checkpoints are data: they run no code, detect damage, keep the previous one, and carry what resume needs."""

from __future__ import annotations

import hashlib
import io
import json
import shutil
import time
import zipfile
from pathlib import Path

import numpy as np
import pytest
import ray
from helpers import numbers_of, run_experiment

from simulator import checkpoint
from simulator.config import ConfigError

# EWC keeps two model-sized arrays per client; with no memory budget every state is a file.
EWC = [
    "scenario=digits_class_incremental",
    "stream.rounds_per_task=2",
    "client.epochs=1",
    "engine.backend=local",
    "client.method=ewc",
    "engine.client_state_memory_mb=0",
]


@pytest.fixture(scope="module")
def ewc_run(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A finished 10-round EWC run with a checkpoint every round (rounds 9 and 10 kept)."""
    run_dir = tmp_path_factory.mktemp("ewc")
    run_experiment(run_dir, EWC)
    return run_dir


@pytest.fixture
def run_copy(ewc_run: Path, tmp_path: Path) -> Path:
    """A copy of ``ewc_run`` to damage."""
    return Path(shutil.copytree(ewc_run, tmp_path / "run"))


def _last(run_dir: Path) -> Path:
    return run_dir / "checkpoints" / "round-000010"


def _reseal(folder: Path) -> None:
    """Rewrite the manifest to match the files, as an attacker would: the manifest is a checksum anyone can
    recompute, so only the reading itself stands."""
    manifest = json.loads((folder / "manifest.json").read_text())
    manifest["files"] = {name: hashlib.sha256((folder / name).read_bytes()).hexdigest() for name in manifest["files"]}
    state_dir = folder.parent.parent / "client_state"
    manifest["client_state"] = {
        name: hashlib.sha256((state_dir / name).read_bytes()).hexdigest() for name in manifest["client_state"]
    }
    content = {key: manifest[key] for key in ("format", "files", "client_state") if key in manifest}
    manifest["sha256"] = hashlib.sha256(json.dumps(content, sort_keys=True).encode()).hexdigest()
    (folder / "manifest.json").write_text(json.dumps(manifest))


def _crafted_pickle(marker: Path) -> bytes:
    """A pickle that calls ``os.system("touch marker")``: GLOBAL, a one-string tuple, REDUCE."""
    return b"\x80\x04cos\nsystem\n" + f"(Vtouch {marker}\ntR.".encode()


def _as_format_1(folder: Path, marker: Path) -> None:
    """Make ``folder`` look like a checkpoint of the old format, whose strategy.pkl would run code if unpickled."""
    (folder / "strategy.npz").unlink()
    (folder / "strategy.pkl").write_bytes(_crafted_pickle(marker))
    manifest = json.loads((folder / "manifest.json").read_text())
    del manifest["format"]
    manifest["files"] = {"strategy.pkl" if n == "strategy.npz" else n: d for n, d in manifest["files"].items()}
    (folder / "manifest.json").write_text(json.dumps(manifest))
    _reseal(folder)


def test_a_checkpoint_of_the_pickled_format_is_refused_saying_so_and_never_unpickled(run_copy):
    marker = run_copy / "marker"
    _as_format_1(_last(run_copy), marker)
    with pytest.raises(
        ConfigError,
        match=r"is of format 1 \(.*manifest\.json\), written by an older FedStream; this one reads format 2",
    ):
        run_experiment(run_copy, EWC, resume=True)
    assert not marker.exists()


def test_a_checkpoint_of_a_newer_format_is_refused_saying_so(run_copy):
    manifest = json.loads((_last(run_copy) / "manifest.json").read_text())
    (_last(run_copy) / "manifest.json").write_text(json.dumps({**manifest, "format": 3}))
    _reseal(_last(run_copy))
    with pytest.raises(ConfigError, match=r"is of format 3 \(.*\), written by a newer FedStream"):
        run_experiment(run_copy, EWC, resume=True)


@pytest.mark.ray
def test_a_refused_checkpoint_is_refused_before_ray_starts(run_copy):
    marker = run_copy / "marker"
    _as_format_1(_last(run_copy), marker)
    with pytest.raises(ConfigError, match="format 1"):
        run_experiment(run_copy, [*EWC, "engine.backend=ray"], resume=True)
    assert not marker.exists() and not ray.is_initialized()


def _zip_bomb(path: Path, inflated_mib: int) -> None:
    """An npz whose one member, deflated to a few hundred KB, inflates to ``inflated_mib`` MiB of float64 zeros."""
    header = io.BytesIO()
    np.lib.format.write_array_header_1_0(
        header, {"descr": "<f8", "fortran_order": False, "shape": (inflated_mib * 2**17,)}
    )
    with zipfile.ZipFile(path, "w", zipfile.ZIP_DEFLATED) as archive, archive.open("fisher.npy", "w") as member:
        member.write(header.getvalue())
        for _ in range(inflated_mib):
            member.write(bytes(2**20))


@pytest.mark.parametrize("target", ["state file", "arrays.npz"])
def test_a_zip_bomb_is_refused_before_it_inflates_naming_the_file(run_copy, target):
    folder = _last(run_copy)
    state_file = sorted(json.loads((folder / "manifest.json").read_text())["client_state"])[0]
    path = run_copy / "client_state" / state_file if target == "state file" else folder / "arrays.npz"
    _zip_bomb(path, inflated_mib=512)
    assert path.stat().st_size < 2**20
    _reseal(folder)
    started = time.perf_counter()
    with pytest.raises(ConfigError, match="is compressed: only stored arrays are read") as error:
        checkpoint.load(run_copy / "checkpoints")
    assert str(path) in str(error.value)
    assert time.perf_counter() - started < 5  # inflating 512 MiB would take longer, and as much memory


def test_a_state_file_that_is_not_the_state_the_checkpoint_declares_is_refused_before_the_first_round(run_copy):
    folder = _last(run_copy)
    state_file = sorted(json.loads((folder / "manifest.json").read_text())["client_state"])[0]
    path = run_copy / "client_state" / state_file
    with np.load(path) as state:
        arrays = {name: state[name] for name in state.files}
    name = next(n for n in arrays if arrays[n].dtype.kind == "f")
    arrays[name] = np.concatenate([arrays[name].ravel(), [0.0]])  # one number more than the run wrote
    np.savez(path, **arrays)
    _reseal(folder)
    with pytest.raises(ConfigError, match=f"{path} holds .* bytes of state; the checkpoint says"):
        run_experiment(run_copy, EWC, resume=True)


def _damaged_files(run_dir: Path) -> list[Path]:
    folder = _last(run_dir)
    state_file = next(iter(json.loads((folder / "manifest.json").read_text())["client_state"]))
    names = ["arrays.npz", "strategy.npz", "state.json", "manifest.json"]
    return [*(folder / name for name in names), run_dir / "client_state" / state_file]


@pytest.mark.parametrize("index", range(5))
@pytest.mark.parametrize("where", [0.0, 0.5, 1.0])
def test_one_flipped_byte_in_any_checkpoint_file_is_an_error_naming_it(run_copy, index, where):
    path = _damaged_files(run_copy)[index]
    data = bytearray(path.read_bytes())
    data[min(int(where * len(data)), len(data) - 1)] ^= 0xFF
    path.write_bytes(bytes(data))
    with pytest.raises(ConfigError, match="damaged|cannot be read") as error:
        checkpoint.load(run_copy / "checkpoints")
    assert str(path) in str(error.value)


@pytest.mark.slow
def test_every_flipped_byte_of_the_manifest_is_caught(run_copy):
    path = _last(run_copy) / "manifest.json"
    original = path.read_bytes()
    for offset in range(len(original)):
        data = bytearray(original)
        data[offset] ^= 0x01  # the smallest change: a digit or a letter's neighbour
        path.write_bytes(bytes(data))
        with pytest.raises(ConfigError, match=str(path)):
            checkpoint.load(run_copy / "checkpoints")


@pytest.mark.parametrize("index", range(5))
def test_a_truncated_or_missing_checkpoint_file_is_an_error_naming_it(run_copy, index):
    path = _damaged_files(run_copy)[index]
    path.write_bytes(path.read_bytes()[: path.stat().st_size // 2])
    with pytest.raises(ConfigError, match="damaged|cannot be read") as error:
        checkpoint.load(run_copy / "checkpoints")
    assert str(path) in str(error.value)
    path.unlink()
    with pytest.raises(ConfigError, match=f"{path} is missing"):
        checkpoint.load(run_copy / "checkpoints")


def test_a_damaged_last_checkpoint_names_the_previous_which_resumes_to_the_samenumbers_of(ewc_run, run_copy):
    arrays = _last(run_copy) / "arrays.npz"
    arrays.write_bytes(arrays.read_bytes()[:-64])
    with pytest.raises(ConfigError, match=r"previous checkpoint \(round-000009\) is intact: remove or rename"):
        run_experiment(run_copy, EWC, resume=True)
    _last(run_copy).rename(run_copy / "checkpoints" / "round-000010.damaged")
    run_experiment(run_copy, EWC, resume=True)  # round 10 again, from round 9's states
    assert numbers_of(run_copy) == numbers_of(ewc_run)
    assert numbers_of(ewc_run)[1]["forgetting"] > 0
    assert checkpoint.load(run_copy / "checkpoints").round == 10


@pytest.mark.parametrize("damage", ["emptied", "cut"])
def test_an_emptied_or_cut_metrics_file_does_not_change_the_resumed_run(ewc_run, run_copy, damage):
    metrics = run_copy / "metrics.jsonl"
    text = metrics.read_text()
    metrics.write_text("" if damage == "emptied" else text[: len(text) // 2])
    shutil.rmtree(_last(run_copy))  # resume from round 9: one round to run, then the summary
    run_experiment(run_copy, EWC, resume=True)
    assert numbers_of(run_copy) == numbers_of(ewc_run)
    assert not list(run_copy.glob(".metrics.jsonl*"))  # rewritten through a temporary file


def test_resuming_a_finished_run_rewrites_its_outputs_from_the_checkpoint(ewc_run, run_copy):
    (run_copy / "metrics.jsonl").write_text("")
    (run_copy / "summary.json").unlink()
    run_experiment(run_copy, EWC, resume=True)
    assert numbers_of(run_copy) == numbers_of(ewc_run)


def test_resuming_with_fewer_rounds_than_finished_is_refused(ewc_run, run_copy):
    with pytest.raises(ConfigError, match="rounds = 8: .* has finished round 10; resume with rounds >= 10"):
        run_experiment(run_copy, [*EWC, "rounds=8"], resume=True)
    assert numbers_of(run_copy) == numbers_of(ewc_run)  # nothing rewritten


def test_only_the_last_two_checkpoints_are_kept_with_the_state_files_they_name(ewc_run):
    folders = sorted(p.name for p in (ewc_run / "checkpoints").iterdir())
    assert folders == ["round-000009", "round-000010"]
    named = set()
    for folder in folders:
        named |= set(json.loads((ewc_run / "checkpoints" / folder / "manifest.json").read_text())["client_state"])
    assert {p.name for p in (ewc_run / "client_state").iterdir()} == named


def test_a_damaged_state_file_both_kept_checkpoints_name_is_reported_as_such(run_copy):
    named = [
        set(json.loads((run_copy / "checkpoints" / f / "manifest.json").read_text())["client_state"])
        for f in ("round-000009", "round-000010")
    ]
    shared = sorted(named[0] & named[1])[0]
    path = run_copy / "client_state" / shared
    data = bytearray(path.read_bytes())
    data[len(data) // 2] ^= 0xFF
    path.write_bytes(bytes(data))
    with pytest.raises(ConfigError, match="the previous checkpoint is damaged too") as error:
        checkpoint.load(run_copy / "checkpoints")
    assert shared in str(error.value)


def test_global_weights_that_are_not_the_configured_models_are_refused(run_copy):
    # A checkpoint sealed as an attacker (or another version of a model) would: same config, other arrays.
    arrays = dict(np.load(_last(run_copy) / "arrays.npz"))
    arrays["head.extra"] = np.zeros(3, np.float32)
    np.savez(_last(run_copy) / "arrays.npz", **arrays)
    _reseal(_last(run_copy))
    with pytest.raises(ConfigError, match="global weights in .* are not the configured model's"):
        run_experiment(run_copy, EWC, resume=True)


def test_a_resume_with_another_config_is_refused_naming_each_key_with_both_values(tmp_path):
    run_experiment(tmp_path, ["engine.backend=local", "rounds=2", "eval.probes=false"])
    changed = ["engine.backend=local", "rounds=3", "eval.probes=false", "client.lr=0.1", "seed=4"]
    with pytest.raises(ConfigError) as refused:
        run_experiment(tmp_path, changed, resume=True)
    message = str(refused.value)
    assert "was written with another config: client.lr = 0.05 there, 0.1 now; seed = 0 there, 4 now;" in message
    assert "rounds" not in message.split("config:")[1]  # more rounds may follow a finished run
