"""A checkpoint keeps a strategy's state as data: the strategy is rebuilt from the config on resume, its state
restored and checked, and a strategy whose state would not survive a resume fails at the first checkpoint."""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import numpy as np
import pytest
from flwr.app import Array, ArrayRecord
from helpers import numbers_of, run_experiment

from simulator.checkpoint import StrategyStateLost
from simulator.config import ConfigError
from strategies.fot import FOT
from strategies.state import LayerState, StrategyStateError, restore_strategy_state

# A run extended by resume measured at its first last round what the whole run does not (a task end).
LOCAL = ["engine.backend=local", "eval.probes=false", "eval.diagnostics=false", "seed=3"]


def _resumed_equals_whole(tmp_path: Path, overrides: list[str], rounds: int, split: int) -> None:
    run_experiment(tmp_path / "whole", [*overrides, f"rounds={rounds}"])
    run_experiment(tmp_path / "split", [*overrides, f"rounds={split}"])
    run_experiment(tmp_path / "split", [*overrides, f"rounds={rounds}"], resume=True)
    assert numbers_of(tmp_path / "split") == numbers_of(tmp_path / "whole")


# FedAdam's moments are checked in test_engine; these keep other kinds of Flower state.
@pytest.mark.parametrize("strategy", ["fedavgm", "dp_adaptive_server"])
def test_flower_strategies_state_survives_a_resume(tmp_path, strategy):
    _resumed_equals_whole(tmp_path, [*LOCAL, f"strategy={strategy}"], rounds=4, split=2)


def test_a_users_strategy_with_declared_state_resumes_exactly(tmp_path, user_code):
    overrides = [*LOCAL, "strategy._target_=stateful_strategies.CountsRounds"]
    _resumed_equals_whole(tmp_path, overrides, rounds=4, split=2)
    state = json.loads((tmp_path / "split" / "checkpoints" / "round-000004" / "state.json").read_text())
    assert state["strategy"][0]["state"] == {"own": {"aggregations": 4}}


def test_a_users_strategy_with_undeclared_state_fails_at_the_first_checkpoint_naming_it(tmp_path, user_code):
    overrides = [*LOCAL, "rounds=3", "strategy._target_=stateful_strategies.CountsRoundsSilently"]
    with pytest.raises(StrategyStateLost, match=r"round 1: the checkpoint of CountsRoundsSilently would lose "):
        run_experiment(tmp_path / "run", overrides)
    with pytest.raises(StrategyStateLost, match=r"strategy\.aggregations: .*checkpoint_state\(\)"):
        run_experiment(tmp_path / "again", overrides)
    assert len((tmp_path / "run" / "metrics.jsonl").read_text().splitlines()) == 1  # the round itself is logged
    run_experiment(tmp_path / "unsaved", [*overrides, "engine.checkpoint_every=0"])  # nothing to lose


@pytest.mark.parametrize("strategy", ["DrawsFromItsOwnGenerator", "CountsInATensor"])
def test_undeclared_state_in_a_generator_or_a_tensor_is_found_too(tmp_path, user_code, strategy):
    overrides = [*LOCAL, "rounds=2", f"strategy._target_=stateful_strategies.{strategy}"]
    with pytest.raises(StrategyStateLost, match=rf"round 1: the checkpoint of {strategy} would lose strategy\."):
        run_experiment(tmp_path, overrides)


def test_declared_numpy_scalars_and_an_unchanged_bfloat16_tensor_pass_the_checkpoints_proof(tmp_path, user_code):
    overrides = [*LOCAL, "strategy._target_=stateful_strategies.KeepsNumpyScalars"]
    _resumed_equals_whole(tmp_path, overrides, rounds=3, split=2)


def test_a_strategy_that_cannot_be_copied_runs_without_checkpoints_and_is_named_with_them(tmp_path, user_code):
    overrides = [*LOCAL, "rounds=1", "strategy._target_=stateful_strategies.HoldsALock"]
    run_experiment(tmp_path / "unsaved", [*overrides, "engine.checkpoint_every=0"])
    with pytest.raises(ConfigError, match=r"HoldsALock: checkpoints need a copy .*engine\.checkpoint_every=0"):
        run_experiment(tmp_path / "saved", overrides)


@pytest.fixture(scope="module")
def fedadam_run(tmp_path_factory: pytest.TempPathFactory) -> Path:
    run_dir = tmp_path_factory.mktemp("fedadam")
    run_experiment(run_dir, [*LOCAL, "strategy=fedadam", "rounds=2"])
    return run_dir


def _edited(fedadam_run: Path, tmp_path: Path, edit) -> Path:
    """A copy of ``fedadam_run`` whose last checkpoint ``edit`` changed and resealed, as an attacker would."""
    from test_checkpoint import _reseal

    run_dir = Path(shutil.copytree(fedadam_run, tmp_path / "run"))
    folder = run_dir / "checkpoints" / "round-000002"
    edit(folder)
    _reseal(folder)
    return run_dir


def _edit_state(change):
    def edit(folder: Path) -> None:
        state = json.loads((folder / "state.json").read_text())
        change(state)
        (folder / "state.json").write_text(json.dumps(state))

    return edit


def _moments(folder: Path) -> tuple[dict[str, np.ndarray], str]:
    """The arrays of ``folder``'s strategy.npz, and the key of FedAdam's first moment of the head's weight."""
    state = json.loads((folder / "state.json").read_text())
    with np.load(folder / "strategy.npz") as file:
        arrays = {name: file[name] for name in file.files}
    return arrays, state["strategy"][0]["state"]["flower"]["m_t"]["head.weight"]["__array__"]


def _poison_moment(folder: Path) -> None:
    arrays, key = _moments(folder)
    arrays[key] = np.full_like(arrays[key], np.nan)
    np.savez(folder / "strategy.npz", **arrays)


def _reshape_moment(folder: Path) -> None:
    arrays, key = _moments(folder)
    arrays[key] = arrays[key][:, :-1]
    np.savez(folder / "strategy.npz", **arrays)


@pytest.mark.parametrize(
    ("edit", "refusal"),
    [
        (  # eta is the config's: a checkpoint cannot carry it
            _edit_state(lambda s: s["strategy"][0]["state"]["flower"].update(eta=0.0)),
            r"round-000002/state.json cannot be restored: strategy: holds \['eta', 'm_t', 'v_t'\], FedAdam keeps \['m_t', 'v_t'\]",
        ),
        (
            _edit_state(lambda s: s["config"]["strategy"].update(eta=0.0)),
            r"written with another config: strategy\.eta = 0\.0 there, 0\.01 now",
        ),
        (
            _edit_state(lambda s: s["strategy"][0].update({"class": "flwr.serverapp.strategy.fedyogi.FedYogi"})),
            r"holds the state of flwr\.serverapp\.strategy\.fedyogi\.FedYogi; the config builds .*FedAdam",
        ),
        (_reshape_moment, r"strategy\.m_t\['head\.weight'\]: expected a float array of shape \(10, 64\)"),
        (_poison_moment, r"strategy\.m_t\['head\.weight'\]: holds NaN or infinite values"),
        (
            _edit_state(lambda s: s["strategy"][0]["state"]["flower"].update(m_t=["head.weight"])),
            r"strategy\.m_t: expected arrays by weight name",
        ),
        (
            _edit_state(lambda s: s["strategy"][0].update(state=[])),
            r"strategy: holds a list, expected a dict of 'flower' and 'own' parts",
        ),
    ],
    ids=["a configured value", "the config", "the class", "a state's shape", "NaN", "a list", "no dict"],
)
def test_an_edited_strategy_state_is_refused_naming_what_differs(fedadam_run, tmp_path, edit, refusal):
    run_dir = _edited(fedadam_run, tmp_path, edit)
    with pytest.raises(ConfigError, match=refusal):
        run_experiment(run_dir, [*LOCAL, "strategy=fedadam", "rounds=3"], resume=True)


def test_the_noise_of_a_dp_strategy_is_never_in_a_checkpoint(tmp_path):
    run_experiment(tmp_path, [*LOCAL, "strategy=dp_fixed_server", "rounds=1"])
    state = json.loads((tmp_path / "checkpoints" / "round-000001" / "state.json").read_text())
    assert state["strategy"] == [
        {
            "path": "strategy",
            "class": "flwr.serverapp.strategy.dp_fixed_clipping.DifferentialPrivacyServerSideFixedClipping",
            "state": {},
        },
        {"path": "strategy.strategy", "class": "flwr.serverapp.strategy.fedavg.FedAvg", "state": {}},
    ]


def _weights(inputs: int) -> ArrayRecord:
    return ArrayRecord({"encoder.1.weight": Array(np.zeros((4, inputs), np.float32))})


@pytest.mark.parametrize(
    ("own", "refusal"),
    [
        ({"bases": [], "tasks_done": 1}, r"bases \(by weight of the global arrays\): holds a list"),
        ({"bases": {"other.weight": np.eye(8)[:, :2]}, "tasks_done": 1}, r"holds \['other\.weight'\]"),
        ({"bases": {"encoder.1.weight": np.ones((8, 2))}, "tasks_done": 1}, "expected at most 8 orthonormal"),
        ({"bases": {"encoder.1.weight": np.eye(8)[:, :2] * 1j}, "tasks_done": 1}, "expected a float array"),
        ({"bases": {}, "tasks_done": 1, "threshold": 0.5}, r"FOT's state: holds .*'threshold'"),
        ({"bases": {}, "tasks_done": -1}, r"tasks_done = -1: expected an integer >= 0"),
    ],
    ids=["a list", "another weight", "not orthonormal", "complex", "the threshold", "negative tasks"],
)
def test_a_crafted_fot_state_is_refused_naming_what_is_wrong(own, refusal):
    fot = FOT()
    with pytest.raises(StrategyStateError, match=refusal):
        restore_strategy_state(fot, [LayerState("strategy", "strategies.fot.FOT", {"own": own})], _weights(8))
    assert fot.bases == {} and fot.tasks_done == 0  # nothing was set
