"""Config composition: what wins over what, and scenario files outside the repo."""

from __future__ import annotations

import textwrap

import pytest
from helpers import compose_run

from simulator.config import ConfigError, compose_config

USER_SCENARIO = """
# @package _global_
defaults:
  - /scenario/digits
  - override /strategy: fedadam
rounds: 7
strategy:
  eta: 0.123
"""


@pytest.fixture
def user_scenarios(tmp_path):
    (tmp_path / "scenario").mkdir()
    (tmp_path / "scenario" / "adam_digits.yaml").write_text(textwrap.dedent(USER_SCENARIO))
    return f"hydra.searchpath=[file://{tmp_path}]"


def test_a_scenario_outside_the_repo_can_pick_a_strategy_and_set_its_arguments(user_scenarios):
    cfg = compose_config(["scenario=adam_digits", user_scenarios])
    assert cfg.strategy._target_ == "flwr.serverapp.strategy.FedAdam"
    assert cfg.strategy.eta == 0.123
    assert cfg.rounds == 7 and cfg.data.dataset == "digits"


def test_the_command_line_wins_over_the_scenario_which_wins_over_the_strategy_file(user_scenarios):
    cfg = compose_config(["scenario=adam_digits", user_scenarios, "strategy.eta=0.5", "rounds=2"])
    assert cfg.strategy.eta == 0.5 and cfg.rounds == 2
    assert compose_config(["scenario=adam_digits", user_scenarios, "strategy=fedavg"]).strategy._target_.endswith(
        "FedAvg"
    )


def test_synthetic_defaults_to_fedprox_and_its_clients_apply_the_term():
    cfg = compose_config(["scenario=synthetic"])
    assert cfg.strategy._target_.endswith("FedProx") and cfg.client.method == "fedprox"


def test_every_key_can_be_overridden_without_a_plus_and_integers_pass_as_floats():
    run = compose_run(["data.partition.classes_per_client=3", "client.lr=1", "engine.ray_address=auto"])
    assert run.data.partition.classes_per_client == 3
    assert run.client.lr == 1.0 and isinstance(run.client.lr, float)
    assert run.engine.ray_address == "auto"


@pytest.mark.parametrize(
    ("override", "message"),
    [
        ("rounds=0", "rounds = 0: must be at least 1"),
        ("client.epochs=1.5", "client.epochs = 1.5: expected int"),
        ("eval.federated=maybe", "eval.federated = 'maybe': expected bool"),
        ("engine.num_gpus_per_actor=-0.5", "engine.num_gpus_per_actor = -0.5: must be >= 0"),
        ("client.momentum=1.0", "client.momentum = 1.0: must be in [0, 1)"),
    ],
)
def test_wrong_types_and_values_name_the_key_and_what_was_expected(override, message):
    with pytest.raises(ConfigError) as error:
        compose_run([override])
    assert message in str(error.value)
    assert "scenarios/scenario/digits.yaml" in str(error.value)
