"""Exemplar-free heads from class statistics: FSA's LDA and NCM heads, FeTrIL's translated pseudo-features, the
frozen encoder, and resumes."""

from __future__ import annotations

import numpy as np
import pytest
import torch
from helpers import (
    flower_task_identity,
    kill_after_records,
    numbers_of,
    run_experiment,
    run_py_to_the_end,
    saved_strategy_state,
)

from clients.queries import QUERIES
from simulator import checkpoint
from simulator.config import ConfigError, compose_config
from simulator.held_array import held_array_record
from simulator.protocol import HEAD_BIAS, HEAD_WEIGHT, REPLY_ARRAYS, TRAIN_ONLY, Query
from strategies import build_strategy
from strategies.class_statistics import UNSEEN_REACH, merged, pooled_statistics
from strategies.fetril import FeTrIL, softmax_rows, translated_features
from strategies.fsa import FSA
from strategies.state import StrategyStateError

SMALL = [
    "scenario=digits_class_incremental",
    "engine.backend=local",
    "stream.rounds_per_task=2",
    "client.epochs=1",
    "eval.probes=false",
]
DIM, NUM_CLASSES = 4, 10


class _Features:
    """A model whose features are its inputs."""

    def features(self, x: torch.Tensor) -> torch.Tensor:
        return x

    def eval(self) -> None:
        pass


class _ClientsGrid:
    """A Grid whose node ``i`` answers queries with the shipped handlers on ``data[i]`` (features as inputs)."""

    def __init__(self, data: list[tuple[np.ndarray, np.ndarray]]) -> None:
        flower_task_identity()
        self.data = data

    def get_node_ids(self) -> list[int]:
        return list(range(1, len(self.data) + 1))

    def send_and_receive(self, messages):
        from flwr.app import Message, RecordDict

        replies = []
        for message in messages:
            x, y = self.data[message.metadata.dst_node_id - 1]
            query = Query(message.content["config"]["query"], {}, torch.from_numpy(x), torch.from_numpy(y), None)
            answer = QUERIES.resolve(query.name)(_Features(), query)
            message.metadata.__dict__["_message_id"] = f"m{message.metadata.dst_node_id}"
            content = RecordDict({REPLY_ARRAYS: held_array_record(list(answer), list(answer.values()))})
            replies.append(Message(content, reply_to=message))
        return replies


def _task(classes: list[int], seed: int, per_class: int = 30) -> tuple[np.ndarray, np.ndarray]:
    """Features of ``classes`` around well-separated means, with correlated noise."""
    rng = np.random.default_rng(seed)
    mix = np.array([[1.0, 0.5, 0.0, 0.0], [0.0, 1.0, 0.3, 0.0], [0.0, 0.0, 1.0, 0.2], [0.1, 0.0, 0.0, 0.5]])
    labels = np.repeat(classes, per_class)
    means = np.stack([np.cos(np.arange(DIM) + c) * 3 + c for c in labels])
    return means + rng.normal(size=(len(labels), DIM)) @ mix, labels


def _clients(x: np.ndarray, y: np.ndarray) -> list[tuple[np.ndarray, np.ndarray]]:
    """``(x, y)`` over three clients, unevenly."""
    order = np.random.default_rng(0).permutation(len(y))
    return [(x[part], y[part]) for part in np.split(order, [len(y) // 5, len(y) // 2])]


def _global_arrays() -> object:
    rng = np.random.default_rng(3)
    arrays = {
        "encoder.weight": rng.normal(size=(DIM, 6)).astype(np.float32),
        HEAD_WEIGHT: rng.normal(size=(NUM_CLASSES, DIM)).astype(np.float32),
        HEAD_BIAS: rng.normal(size=NUM_CLASSES).astype(np.float32),
    }
    return held_array_record(list(arrays), list(arrays.values()))


def _head(arrays) -> tuple[np.ndarray, np.ndarray]:
    return arrays[HEAD_WEIGHT].numpy().astype(np.float64), arrays[HEAD_BIAS].numpy().astype(np.float64)


def _hand_lda(x: np.ndarray, y: np.ndarray, shrinkage: float) -> tuple[np.ndarray, np.ndarray, list[int]]:
    """LDA by hand: np.cov of the class-centred samples (N - C degrees of freedom), shrunk, solved per class."""
    classes = sorted(set(y.tolist()))
    centred = np.concatenate([x[y == c] - x[y == c].mean(axis=0) for c in classes])
    within = np.cov(centred, rowvar=False, ddof=len(classes))
    covariance = (1 - shrinkage) * within + shrinkage * np.trace(within) / DIM * np.eye(DIM)
    weight = np.stack([np.linalg.solve(covariance, x[y == c].mean(axis=0)) for c in classes])
    bias = np.array([-0.5 * x[y == c].mean(axis=0) @ w for c, w in zip(classes, weight)])
    return weight, bias, classes


def _class_reach(x: np.ndarray, y: np.ndarray) -> float:
    """How far FSA takes the classes' features to reach: a class's mean norm plus its features' RMS distance
    from the mean, at most."""
    return max(
        np.linalg.norm(x[y == c].mean(axis=0)) + np.sqrt(np.trace(np.cov(x[y == c], rowvar=False))) for c in set(y)
    )


def _assert_never_predicts_unseen(
    weight: np.ndarray, bias: np.ndarray, seen: list[int], x: np.ndarray, reach: float
) -> None:
    """Unseen classes: weight 0, and no feature of ``x`` nor any as far as ``UNSEEN_REACH * reach`` predicts one."""
    unseen = [c for c in range(NUM_CLASSES) if c not in seen]
    assert np.isfinite(weight).all() and np.isfinite(bias).all()
    assert np.all(weight[unseen] == 0)
    far = np.random.default_rng(1).normal(size=(2000, DIM))
    probes = np.concatenate([x, far / np.linalg.norm(far, axis=1, keepdims=True) * reach * UNSEEN_REACH * 0.99])
    assert set(np.argmax(probes @ weight.T + bias, axis=1).tolist()) <= set(seen)


def test_fsas_lda_head_is_a_hand_computed_lda_of_every_class_seen_and_never_predicts_an_unseen_one():
    first, second = _task([0, 1, 2], seed=0), _task([3, 4], seed=1)
    fsa = FSA(head="lda", shrinkage=0.2)
    arrays = fsa.on_task_end(0, _global_arrays(), _ClientsGrid(_clients(*first)))
    weight, bias = _head(arrays)
    hand_weight, hand_bias, classes = _hand_lda(*first, shrinkage=0.2)
    np.testing.assert_allclose(weight[classes], hand_weight, rtol=1e-5, atol=1e-5)
    np.testing.assert_allclose(bias[classes], hand_bias, rtol=1e-5, atol=1e-4)
    _assert_never_predicts_unseen(weight, bias, classes, first[0], _class_reach(*first))
    # the next task: its classes join; those of the first keep their statistics (no client holds them now)
    arrays = fsa.on_task_end(1, arrays, _ClientsGrid(_clients(*second)))
    both = np.concatenate([first[0], second[0]]), np.concatenate([first[1], second[1]])
    weight, bias = _head(arrays)
    hand_weight, hand_bias, classes = _hand_lda(*both, shrinkage=0.2)
    np.testing.assert_allclose(weight[classes], hand_weight, rtol=1e-5, atol=1e-5)
    np.testing.assert_allclose(bias[classes], hand_bias, rtol=1e-5, atol=1e-4)
    _assert_never_predicts_unseen(weight, bias, classes, both[0], _class_reach(*both))
    # the rule it stands for: the smallest Mahalanobis distance to a class mean under the shrunk covariance
    centred = np.concatenate([both[0][both[1] == c] - both[0][both[1] == c].mean(axis=0) for c in classes])
    within = np.cov(centred, rowvar=False, ddof=len(classes))
    precision = np.linalg.inv(0.8 * within + 0.2 * np.trace(within) / DIM * np.eye(DIM))
    means = np.stack([both[0][both[1] == c].mean(axis=0) for c in classes])
    gaps = both[0][:, None, :] - means[None]
    nearest = np.array(classes)[np.einsum("ncd,de,nce->nc", gaps, precision, gaps).argmin(axis=1)]
    assert np.array_equal(np.argmax(both[0] @ weight.T + bias, axis=1), nearest)
    assert np.array_equal(arrays["encoder.weight"].numpy(), _global_arrays()["encoder.weight"].numpy())


def test_fsas_ncm_head_predicts_the_nearest_class_mean():
    x, y = _task([2, 5, 7], seed=2)
    arrays = FSA(head="ncm").on_task_end(0, _global_arrays(), _ClientsGrid(_clients(x, y)))
    weight, bias = _head(arrays)
    means = {c: x[y == c].mean(axis=0) for c in (2, 5, 7)}
    for c, mean in means.items():
        np.testing.assert_allclose(weight[c], mean, rtol=1e-6)
        assert bias[c] == pytest.approx(-0.5 * np.sum(mean**2), rel=1e-6)
    points = np.random.default_rng(4).normal(size=(500, DIM)) * 4 + 2
    distances = np.stack([np.linalg.norm(points - means[c], axis=1) for c in (2, 5, 7)], axis=1)
    assert np.array_equal(np.argmax(points @ weight.T + bias, axis=1), np.array([2, 5, 7])[distances.argmin(axis=1)])
    _assert_never_predicts_unseen(weight, bias, [2, 5, 7], x, _class_reach(x, y))


def test_a_class_measured_again_is_pooled_with_what_was_kept_and_the_others_keep_theirs():
    (x1, y1), (x2, y2) = _task([0, 1], seed=5), _task([1, 2], seed=6)
    answer = lambda x, y: QUERIES.resolve("class_feature_statistics")(  # noqa: E731
        _Features(), Query("", {}, torch.from_numpy(x), torch.from_numpy(y), None)
    )
    kept = merged(pooled_statistics([answer(x1, y1)]), pooled_statistics([answer(x2, y2)]))
    x, y = np.concatenate([x1, x2]), np.concatenate([y1, y2])
    for label in (0, 1, 2):
        count, mean, covariance = kept[label]
        assert count == (y == label).sum()
        np.testing.assert_allclose(mean, x[y == label].mean(axis=0))
        np.testing.assert_allclose(covariance, np.cov(x[y == label], rowvar=False))


def test_fetrils_pseudo_features_are_new_class_features_translated_to_the_old_class_means():
    rng = np.random.default_rng(7)
    features, labels = rng.normal(size=(12, 3)), np.array([5, 6, 5, 6, 5, 6, 5, 5, 6, 6, 5, 6])
    new_means = {5: np.array([1.0, 0.0, 0.0]), 6: np.array([0.0, 5.0, 0.0])}
    means = {**new_means, 0: np.array([0.0, 4.0, 1.0]), 2: np.array([2.0, -1.0, 0.0])}
    x, y = translated_features(features, labels, new_means, means)
    hand_x, hand_y = [features], [labels]
    for old, source in ((0, 6), (2, 5)):  # each old class from the new class whose mean is nearest its own
        hand_x.append(features[labels == source] - new_means[source] + means[old])
        hand_y.append(np.full((labels == source).sum(), old))
    np.testing.assert_array_equal(x, np.concatenate(hand_x))
    np.testing.assert_array_equal(y, np.concatenate(hand_y))


def test_fetril_trains_its_head_on_real_and_pseudo_features_to_the_penalised_optimum():
    first, second = _task([0, 1, 2], seed=0), _task([3, 4], seed=1)
    fetril = FeTrIL(weight_decay=1e-3, iterations=200)
    arrays = fetril.on_task_end(0, _global_arrays(), _ClientsGrid(_clients(*first)))
    arrays = fetril.on_task_end(1, arrays, _ClientsGrid(_clients(*second)))
    weight, bias = _head(arrays)
    means = {c: first[0][first[1] == c].mean(axis=0) for c in range(3)}
    new_means = {c: second[0][second[1] == c].mean(axis=0) for c in (3, 4)}
    x, y = translated_features(
        np.concatenate([f for f, _ in _clients(*second)]),
        np.concatenate([lab for _, lab in _clients(*second)]),
        new_means,
        {**means, **new_means},
    )
    assert sorted(set(y.tolist())) == [0, 1, 2, 3, 4]
    rows = softmax_rows(x, y, 1e-3, 200)
    for c in range(5):
        np.testing.assert_allclose(weight[c], rows[c][0], rtol=1e-4, atol=1e-4)
    _assert_never_predicts_unseen(weight, bias, [0, 1, 2, 3, 4], x, np.linalg.norm(x, axis=1).max())
    # the optimum: the penalised loss on standardised features has no gradient there (autograd, by hand)
    center, scale = x.mean(axis=0), x.std(axis=0)
    w = torch.tensor(np.stack([rows[c][0] for c in range(5)]) * scale, requires_grad=True)
    b = torch.tensor(
        np.array([rows[c][1] for c in range(5)]) + np.stack([rows[c][0] for c in range(5)]) @ center, requires_grad=True
    )
    z = torch.from_numpy((x - center) / scale)
    loss = torch.nn.functional.cross_entropy(z @ w.T + b, torch.from_numpy(y)) + 0.5e-3 * w.square().sum()
    grad_w, grad_b = torch.autograd.grad(loss, (w, b))
    assert float(grad_w.abs().max()) < 1e-6 and float(grad_b.abs().max()) < 1e-6


@pytest.mark.parametrize(
    ("kind", "setting", "message"),
    [
        (FSA, {"head": "svm"}, "strategy.head = 'svm': expected one of lda, ncm"),
        (FSA, {"shrinkage": 1.5}, r"strategy.shrinkage = 1.5: expected a number in \[0, 1\]"),
        (FSA, {"shrinkage": True}, r"strategy.shrinkage = True: expected a number in \[0, 1\]"),
        (FeTrIL, {"query_samples": 0}, "strategy.query_samples = 0: expected an integer >= 1, or null for all"),
        (FeTrIL, {"weight_decay": -1}, "strategy.weight_decay = -1: expected a number >= 0"),
        (FeTrIL, {"iterations": 0}, "strategy.iterations = 0: expected an integer >= 1"),
    ],
)
def test_a_bad_setting_is_refused_naming_its_key(kind, setting, message):
    with pytest.raises(ConfigError, match=message):
        kind(**setting)


def test_the_short_names_build_the_strategies_from_their_files_with_their_settings():
    fsa = build_strategy(
        compose_config(["scenario=digits_class_incremental", "strategy=fsa", "strategy.head=ncm"]).strategy
    )
    assert isinstance(fsa, FSA) and (fsa.head, fsa.shrinkage, fsa.min_train_nodes) == ("ncm", 0.01, 10)
    fetril = build_strategy(compose_config(["strategy=fetril", "strategy.query_samples=50"]).strategy)
    assert isinstance(fetril, FeTrIL) and (fetril.query_samples, fetril.weight_decay, fetril.iterations) == (
        50,
        1e-2,
        100,
    )


@pytest.mark.parametrize(("name", "refused"), [("fsa", "model.head=etf"), ("fetril", "client.method=fedper")])
def test_a_model_without_a_linear_head_it_holds_is_refused_before_any_work(tmp_path, name, refused):
    with pytest.raises(ConfigError, match=f"strategy={name} rebuilds the global model's linear head"):
        run_experiment(tmp_path / "refused", [*SMALL, f"strategy={name}", refused])
    assert not (tmp_path / "refused").exists()


def test_a_saved_state_is_checked_against_the_global_arrays():
    fsa = FSA()
    fsa.on_task_end(0, _global_arrays(), _ClientsGrid(_clients(*_task([0, 1], seed=0))))
    state = fsa.checkpoint_state()
    restored = FSA()
    restored.restore_state(state, _global_arrays())
    assert restored.encoder.keys() == {"encoder.weight"} and sorted(restored.class_statistics) == [0, 1]
    for key, bad, message in (
        ("means", [np.zeros(3), np.zeros(DIM)], r"the mean of class 0: expected a float array of shape \(4,\)"),
        ("classes", [0, 10], "class 10 with count"),
        ("frozen", "yes", "frozen = 'yes', expected true or false"),
    ):
        with pytest.raises(StrategyStateError, match=message):
            FSA().restore_state({**state, key: bad}, _global_arrays())
    with pytest.raises(StrategyStateError, match="expected a dict of"):
        FeTrIL().restore_state(state, _global_arrays())  # FeTrIL keeps no covariances


def _recording(monkeypatch, kind: type) -> dict[str, list]:
    """What ``kind``'s strategy sends and makes in a run: train configs, aggregated and task-end arrays by round."""
    seen: dict[str, list] = {"configs": [], "aggregated": [], "task_ends": []}
    configure, aggregate, task_end = kind.configure_train, kind.aggregate_train, kind.on_task_end

    def configure_train(self, server_round, arrays, config, grid):
        messages = configure(self, server_round, arrays, config, grid)
        seen["configs"].append((server_round, [dict(m.content["config"]) for m in messages]))
        return messages

    def aggregate_train(self, server_round, replies):
        arrays, metrics = aggregate(self, server_round, replies)
        seen["aggregated"].append((server_round, {k: v.numpy().copy() for k, v in arrays.items()}))
        return arrays, metrics

    def on_task_end(self, task, arrays, grid):
        ended = task_end(self, task, arrays, grid)
        seen["task_ends"].append((task, {k: v.numpy().copy() for k, v in ended.items()}))
        return ended

    for name, method in (("configure_train", configure_train), ("aggregate_train", aggregate_train)):
        monkeypatch.setattr(kind, name, method)
    monkeypatch.setattr(kind, "on_task_end", on_task_end)
    return seen


@pytest.fixture(scope="module")
def fedavg_small(tmp_path_factory):
    return run_experiment(tmp_path_factory.mktemp("fedavg"), SMALL)


@pytest.mark.slow
@pytest.mark.parametrize(("name", "kind"), [("fsa", FSA), ("fetril", FeTrIL)])
def test_the_encoder_stays_as_task_0_left_it_clients_train_the_head_and_the_head_beats_fedavg(
    tmp_path, monkeypatch, fedavg_small, name, kind
):
    seen = _recording(monkeypatch, kind)
    summary = run_experiment(tmp_path, [*SMALL, f"strategy={name}"])
    assert [task for task, _ in seen["task_ends"]] == [0, 1, 2, 3, 4]
    frozen = {k: v for k, v in seen["task_ends"][0][1].items() if not k.startswith("head.")}
    assert frozen  # the MLP's encoder layers
    later = [arrays for _, arrays in seen["task_ends"][1:]] + [arrays for r, arrays in seen["aggregated"] if r > 2]
    assert len(later) == 4 + 8
    for arrays in later:
        assert all(np.array_equal(arrays[k], v) for k, v in frozen.items())
        assert not np.array_equal(arrays[HEAD_WEIGHT], seen["task_ends"][0][1][HEAD_WEIGHT])
    final = checkpoint.load(tmp_path / "checkpoints").arrays
    assert all(np.array_equal(final[k].numpy(), v) for k, v in frozen.items())
    for server_round, configs in seen["configs"]:  # head only once task 0 (rounds 1-2) has ended
        assert all(config.get(TRAIN_ONLY) == ("head." if server_round > 2 else None) for config in configs)
    assert fedavg_small["final_accuracy"] < 0.25  # the last task's classes alone
    assert summary["final_accuracy"] > fedavg_small["final_accuracy"] + 0.3, summary["final_accuracy"]


@pytest.mark.slow
@pytest.mark.parametrize("name", ["fsa", "fetril"])
def test_a_run_killed_with_sigkill_mid_task_resumes_to_the_uninterrupted_numbers_and_head(tmp_path, name):
    overrides = [*SMALL, f"strategy={name}"]
    run_py_to_the_end(tmp_path / "whole", overrides)
    done = kill_after_records(tmp_path / "killed", overrides, 5)  # round 5: the first of task 2
    assert not (tmp_path / "killed" / "summary.json").exists() and done < 10, done
    run_py_to_the_end(tmp_path / "killed", [*overrides, "resume=true"])
    assert numbers_of(tmp_path / "killed") == numbers_of(tmp_path / "whole")
    whole, resumed = (checkpoint.load(tmp_path / run / "checkpoints").arrays for run in ("whole", "killed"))
    assert all(np.array_equal(whole[k].numpy(), resumed[k].numpy()) for k in whole.keys())
    states = [saved_strategy_state(tmp_path / run / "checkpoints") for run in ("whole", "killed")]
    assert states[0]["frozen"] and states[0]["classes"] == states[1]["classes"] == list(range(10))
    assert all(np.array_equal(a, b) for a, b in zip(states[0]["means"], states[1]["means"]))
