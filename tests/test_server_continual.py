"""Server-side continual learning: the task-end hook, QUERY messages, FOT's projection, CCVR's statistics."""

from __future__ import annotations

import numpy as np
import pytest
import torch
from helpers import (
    ROOT,
    kill_after_records,
    numbers_of,
    run_experiment,
    run_py_to_the_end,
    saved_strategy_state,
    wait_for_free_cpus,
)

import run as cli
from clients.queries import class_feature_statistics, layer_input_energies, layer_input_sketches
from simulator import checkpoint
from simulator.backends import ClientFailure
from simulator.config import ConfigError
from simulator.held_array import held_array_record
from simulator.protocol import NUM_SAMPLES, Query
from strategies.class_statistics import pooled_statistics
from strategies.fot import grown_basis, principal_directions, project_updates

PERMUTED = [
    "scenario=permuted_digits",
    "engine.backend=local",
    "eval.probes=false",
    "stream.permuted.num_tasks=3",
    "stream.rounds_per_task=2",
    "client.epochs=1",
    "federation.clients_per_round=4",
]
FOT = [*PERMUTED, "strategy=fot"]


def test_the_projection_leaves_each_update_exactly_orthogonal_to_a_hand_made_basis():
    rng = np.random.default_rng(0)
    basis = np.linalg.qr(rng.normal(size=(6, 2)))[0]  # a 2-D subspace of the layer's 6 inputs
    start = {"w": rng.normal(size=(3, 6)).astype(np.float32), "b": np.zeros(3, np.float32)}
    new = {"w": start["w"] + rng.normal(size=(3, 6)).astype(np.float32), "b": np.ones(3, np.float32)}
    record = lambda d: held_array_record(list(d), list(d.values()))  # noqa: E731
    projected = project_updates(record(new), record(start), {"w": basis})
    update = projected["w"].numpy() - start["w"]
    np.testing.assert_allclose(update @ basis, 0, atol=1e-6)  # nothing left inside the old subspace
    outside = np.eye(6) - basis @ basis.T
    np.testing.assert_allclose(update @ outside, (new["w"] - start["w"]) @ outside, atol=1e-6)  # the rest kept
    assert np.array_equal(projected["b"].numpy(), new["b"])  # biases are not projected (as FOT's code)


def test_a_basis_grows_by_gpms_energy_rule_on_the_exact_energies_and_stays_orthonormal():
    e = np.eye(4)
    energies = np.array([9.0, 4.0, 1.0, 0.0])  # exact energies along e1..e4: shares 9/14, 13/14, 1
    first = grown_basis(np.zeros((4, 0)), e, energies, inside=0.0, energy=14.0, threshold=0.9)
    assert np.allclose(np.abs(first), e[:, :2])  # the fewest directions keeping 90%
    # The same inputs again: the basis keeps 13/14 = 0.93 of their energy, enough at 0.9: nothing added.
    rest = e[:, 2:]
    assert grown_basis(first, rest, energies[2:], inside=13.0, energy=14.0, threshold=0.9) is first
    grown = grown_basis(first, rest, energies[2:], inside=13.0, energy=14.0, threshold=0.95)  # not enough: e3 joins
    assert grown.shape == (4, 3) and np.allclose(grown.T @ grown, np.eye(3))
    assert np.allclose(np.abs(grown[:, 2]), e[:, 2])


def test_the_gram_in_the_candidates_gives_the_inputs_principal_directions_and_their_exact_energies():
    # Inputs whose energy lies along (e1 + e2) / sqrt(2) (9) and (e1 - e2) / sqrt(2) (1): along e1 and e2, 5 each.
    directions, energies = principal_directions(np.eye(3)[:, :2], np.array([[5.0, 4.0], [4.0, 5.0]]))
    np.testing.assert_allclose(energies, [9.0, 1.0])
    np.testing.assert_allclose(np.abs(directions), [[2**-0.5, 2**-0.5], [2**-0.5, 2**-0.5], [0, 0]])
    basis = grown_basis(np.zeros((3, 0)), directions, energies, inside=0.0, energy=10.0, threshold=0.9)
    assert basis.shape == (3, 1)  # one direction keeps 90%, where e1 or e2 would need both


def test_clients_sketch_each_layers_inputs_with_their_residual_outside_the_servers_basis():
    model = torch.nn.Sequential(torch.nn.Linear(3, 2), torch.nn.ReLU(), torch.nn.Linear(2, 2))
    x = torch.tensor([[1.0, 0.0, 0.0], [2.0, 0.0, 0.0]])
    query = Query(
        "layer_input_sketches",
        {"0.weight": np.eye(3)[:, :1]},
        x,
        torch.zeros(2, dtype=torch.long),
        torch.Generator().manual_seed(0),
    )
    answer = layer_input_sketches(model, query)
    # float32, as wide as the space outside the basis: 2 of layer 0's 3 inputs, both of layer 2's
    assert answer["0.weight"].shape == (3, 2) and answer["2.weight"].shape == (2, 2)
    assert answer["0.weight"].dtype == answer["2.weight"].dtype == np.float32
    assert answer["0.weight/energy"] == 5.0 and answer["0.weight/residual_energy"] == 0.0  # inputs lie in e1
    assert answer["2.weight/residual_energy"] == answer["2.weight/energy"] and int(answer[NUM_SAMPLES]) == 2
    np.testing.assert_array_equal(answer["0.weight"], 0)  # nothing of them outside the basis


def test_clients_measure_their_inputs_gram_matrix_in_the_candidate_directions():
    model = torch.nn.Sequential(torch.nn.Linear(3, 2))
    x = torch.tensor([[1.0, 2.0, 0.0], [3.0, 0.0, 4.0]])
    directions = np.linalg.qr(np.random.default_rng(0).normal(size=(3, 3)))[0]
    query = Query(
        "layer_input_energies", {"0.weight": directions}, x, torch.zeros(2, dtype=torch.long), torch.Generator()
    )
    gram = layer_input_energies(model, query)["0.weight"]
    along = directions.T @ x.double().numpy().T  # directions x samples
    np.testing.assert_allclose(gram, along @ along.T)
    assert np.trace(gram) == pytest.approx(25.0 + 5.0)  # all of the inputs' energy: the directions span their space


def test_pooled_class_statistics_equal_those_of_all_clients_data_together():
    rng = np.random.default_rng(1)
    features, labels = rng.normal(size=(60, 4)), rng.integers(0, 3, 60)
    model = type("Features", (), {"features": lambda self, x: x, "eval": lambda self: None})()
    answers = [
        class_feature_statistics(
            model,
            Query(
                "class_feature_statistics",
                {},
                torch.from_numpy(features[part]),
                torch.from_numpy(labels[part]),
                torch.Generator(),
            ),
        )
        for part in np.array_split(np.arange(60), 3)
    ]
    pooled = pooled_statistics(answers)
    for label in range(3):
        mine = features[labels == label]
        count, mean, covariance = pooled[label]
        assert count == len(mine)
        np.testing.assert_allclose(mean, mine.mean(axis=0))
        np.testing.assert_allclose(covariance, np.cov(mine, rowvar=False))


def test_a_client_with_no_data_of_the_task_answers_no_class():
    model = type("Features", (), {"features": lambda self, x: x, "eval": lambda self: None})()
    query = Query(
        "class_feature_statistics", {}, torch.zeros(0, 4), torch.zeros(0, dtype=torch.long), torch.Generator()
    )
    answer = class_feature_statistics(model, query)
    assert [answer[key].shape for key in ("classes", "counts", "means", "covariances")] == [
        (0,),
        (0,),
        (0, 4),
        (0, 4, 4),
    ]
    assert pooled_statistics([answer]) == {}


def test_fot_gathers_bases_at_each_task_end_and_forgets_less_than_fedavg(tmp_path):
    fedavg = run_experiment(tmp_path / "fedavg", PERMUTED)
    fot = run_experiment(tmp_path / "fot", FOT)
    bases = saved_strategy_state(tmp_path / "fot" / "checkpoints")["bases"]
    assert sorted(bases) == ["encoder.1.weight", "encoder.3.weight", "head.weight"]
    assert all(np.allclose(u.T @ u, np.eye(u.shape[1]), atol=1e-6) for u in bases.values())
    assert fot["forgetting"] < fedavg["forgetting"]


def test_ccvr_retrains_only_the_head_and_refuses_a_head_it_cannot_retrain(tmp_path):
    skew = ["scenario=digits_extreme_label_skew", "engine.backend=local", "rounds=4", "eval.probes=false"]
    run_experiment(tmp_path / "fedavg", skew)
    run_experiment(tmp_path / "ccvr", [*skew, "strategy=ccvr"])
    plain = checkpoint.load(tmp_path / "fedavg" / "checkpoints").arrays
    calibrated = checkpoint.load(tmp_path / "ccvr" / "checkpoints").arrays
    for name in plain.keys():  # the same rounds; at the (only) task end, the head alone changes
        same = np.array_equal(plain[name].numpy(), calibrated[name].numpy())
        assert same != name.startswith("head."), name
    for refused in (["model.head=etf"], ["client.method=fedper"]):  # no head, or none the server holds
        with pytest.raises(ConfigError, match="strategy=ccvr recalibrates the global model's linear head"):
            run_experiment(tmp_path / "refused", [*skew, "strategy=ccvr", *refused])
        assert not (tmp_path / "refused").exists()  # refused before the run directory


def test_fot_inside_flowers_dp_wrapper_still_gathers_its_bases(tmp_path):
    wrapped = [
        *PERMUTED,
        "strategy=dp_fixed_server",
        "strategy.strategy._target_=strategies.fot.FOT",
        "strategy.noise_multiplier=0.0",
    ]
    run_experiment(tmp_path, wrapped)
    assert sorted(saved_strategy_state(tmp_path / "checkpoints", layer=1)["bases"]) == [
        "encoder.1.weight",
        "encoder.3.weight",
        "head.weight",
    ]


def test_an_unknown_query_fails_the_run_naming_the_client_and_the_queries_it_answers(tmp_path, monkeypatch):
    monkeypatch.setattr("strategies.fot.LAYER_INPUT_SKETCHES", "layer_inputs")
    with pytest.raises(
        ClientFailure,
        match=r"(?s)client \d+ failed .*query = 'layer_inputs': unknown query; valid: class_feature_statistics, class_features, layer_input_energies, layer_input_sketches",
    ):
        run_experiment(tmp_path, FOT)


def test_a_plain_flower_strategy_gives_the_numbers_it_gave_before_the_task_end_hooks(tmp_path):
    # The default scenario, seed 0, as measured before strategies could act at task ends.
    summary = run_experiment(tmp_path, ["engine.backend=local"])
    assert summary["final_accuracy"] == 0.9498607242339833
    assert summary["client_acc_mean"] == pytest.approx(0.9485, abs=1e-12)
    assert summary["client_acc_worst10"] == 0.89
    assert summary["probe_final_accuracy"] == 0.9610027855153204


@pytest.mark.slow
def test_a_fot_run_killed_with_sigkill_resumes_to_the_uninterrupted_bases_and_numbers(tmp_path):
    overrides = [*FOT, "stream.permuted.num_tasks=4", "engine.checkpoint_every=3"]
    run_experiment(tmp_path / "whole", overrides)
    kill_after_records(tmp_path / "killed", overrides, 4)
    assert not (tmp_path / "killed" / "summary.json").exists()
    run_py_to_the_end(tmp_path / "killed", [*overrides, "resume=true"], timeout_s=120)
    assert numbers_of(tmp_path / "killed") == numbers_of(tmp_path / "whole")
    whole = saved_strategy_state(tmp_path / "whole" / "checkpoints")["bases"]
    resumed_bases = saved_strategy_state(tmp_path / "killed" / "checkpoints")["bases"]
    assert whole.keys() == resumed_bases.keys() and all(np.array_equal(whole[k], resumed_bases[k]) for k in whole)


@pytest.mark.ray
def test_query_answers_are_the_same_in_process_and_on_1_2_and_3_actors(tmp_path, ray_with_three_cpus):
    run_experiment(tmp_path / "local", FOT)
    local = saved_strategy_state(tmp_path / "local" / "checkpoints")["bases"]
    assert local  # bases for every layer: the comparison below has something to compare
    for actors in (1, 2, 3):
        run_dir = tmp_path / f"ray{actors}"
        wait_for_free_cpus(actors)
        run_experiment(run_dir, [*FOT, "engine.backend=ray", f"engine.num_actors={actors}"])
        bases = saved_strategy_state(run_dir / "checkpoints")["bases"]
        assert bases.keys() == local.keys(), f"{actors} actors"
        assert all(np.array_equal(bases[k], local[k]) for k in local), f"{actors} actors"  # from the answers
        assert numbers_of(run_dir) == numbers_of(tmp_path / "local"), f"{actors} actors"


@pytest.mark.parametrize(
    ("strategy", "message"),
    [
        ("RaisesAtTaskEnd", "round 2: RaisesAtTaskEnd.on_task_end raised ValueError: no basis for task 0"),
        ("ReturnsADict", "round 2: ReturnsADict.on_task_end returned a dict; expected an ArrayRecord (or None)"),
    ],
)
def test_a_task_end_step_that_fails_ends_the_run_naming_the_strategy_the_hook_and_the_round(
    tmp_path, monkeypatch, capsys, strategy, message
):
    monkeypatch.syspath_prepend(str(ROOT / "tests" / "user_code"))
    overrides = ["scenario=digits_class_incremental", "engine.backend=local", "stream.rounds_per_task=2"]
    target = f"strategy._target_=task_end_strategies.{strategy}"
    assert cli.main_cli([*overrides, target, "eval.probes=false", f"hydra.run.dir={tmp_path}"]) == 1
    assert f"error: {message}" in capsys.readouterr().err
    assert message in (tmp_path / "run.log").read_text()
