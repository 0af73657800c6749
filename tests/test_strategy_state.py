"""A checkpoint keeps a strategy's state as data: the strategy is rebuilt from the config on resume, its state
restored and checked, and a strategy whose state would not survive a resume fails at the first checkpoint."""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import numpy as np
import pytest
from helpers import numbers_of, run_experiment

from simulator.checkpoint import StrategyStateLost
from simulator.config import ConfigError

LOCAL = ["engine.backend=local", "eval.probes=false", "seed=3"]


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


def _reshape_moment(folder: Path) -> None:
    state = json.loads((folder / "state.json").read_text())
    key = state["strategy"][0]["state"]["flower"]["m_t"]["head.weight"]["__array__"]
    with np.load(folder / "strategy.npz") as file:
        arrays = {name: file[name] for name in file.files}
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
    ],
    ids=["a configured value", "the config", "the class", "a state's shape"],
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
