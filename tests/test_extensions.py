"""Every kind of plugin is a user's, by dotted path, with no library edit (tests/user_code/extensions.py).

Each test names a plugin of one kind (client method, head, stream kind,
dataset, client query handler with the strategy that asks it) by its dotted
path, gives it a setting in its own section, and checks numbers that only
that plugin, with that setting, gives. The end-of-task metric hook, the
remaining kind, is tests/test_hooks.py's.
"""

from __future__ import annotations

import math

import numpy as np
import pytest
import torch
from helpers import ROOT, compose_run, read_metrics, run_experiment

from clients.models import build_model
from simulator.config import ConfigError
from simulator.data import load_dataset
from simulator.streams import build_stream

# All clients train every round, so a per-client count is the same for every client.
SMALL = [
    "engine.backend=local",
    "client.epochs=1",
    "eval.probes=false",
    "federation.num_clients=4",
    "federation.clients_per_round=4",
    "data.partition.kind=iid",
]


@pytest.fixture(autouse=True)
def user_code(monkeypatch):
    """The user's folder on sys.path, as ``python run.py`` finds a user's package."""
    monkeypatch.syspath_prepend(str(ROOT / "tests" / "user_code"))


def test_a_users_client_method_gets_its_own_settings_and_keeps_a_count_in_the_clients_state(tmp_path):
    import extensions

    overrides = [
        *SMALL,
        "rounds=3",
        "client.method=extensions.ScaledSGD",
        "client.scaled.loss_scale=0",
        "client.scaled.count_step=3",
    ]
    config = compose_run(overrides)
    assert config.client.settings == extensions.ScaledSGD.Settings(loss_scale=0.0, count_step=3)

    summary = run_experiment(tmp_path, overrides)
    records = read_metrics(tmp_path)
    # The count, kept in each client's state from round to round, grows by count_step each round.
    assert [r["train/rounds_trained"] for r in records] == pytest.approx([3.0, 6.0, 9.0])
    # loss_scale=0: the loss the clients minimise is 0, so the global model never moves from its start.
    assert [r["train_loss"] for r in records] == [0.0, 0.0, 0.0]
    assert [r["acc_per_task"] for r in records] == [summary["initial_acc_per_task"]] * 3

    # Its settings are checked like a shipped method's, naming the user's section.
    with pytest.raises(ConfigError, match=r"client\.scaled\.loss_scal: unknown key"):
        compose_run(["client.method=extensions.ScaledSGD", "client.scaled.loss_scal=2"])
    with pytest.raises(ConfigError, match=r"client\.scaled\.count_step = 0: expected an integer >= 1"):
        compose_run(["client.method=extensions.ScaledSGD", "client.scaled.count_step=0"])
    with pytest.raises(
        ConfigError,
        match=r"client\.scaeld: no client method has this section; "
        r"did you mean client\.scaled\?",
    ):
        compose_run(["client.method=extensions.ScaledSGD", "client.scaeld.count_step=2"])


def test_a_users_head_is_built_with_its_setting_and_trains_in_a_run(tmp_path):
    import extensions

    config = compose_run(["model.head=extensions.TemperedHead", "model.tempered.scale=3"])
    assert config.model.head_settings == extensions.TemperedSettings(scale=3.0)
    model = build_model((64,), 10, config.model, torch.Generator().manual_seed(0))
    again = build_model((64,), 10, config.model, torch.Generator().manual_seed(0))
    assert isinstance(model.head, extensions.TemperedHead) and model.head.scale == 3.0
    assert list(model.state_dict()) == [
        "encoder.1.weight",
        "encoder.1.bias",
        "encoder.3.weight",
        "encoder.3.bias",
        "head.linear.weight",
        "head.linear.bias",
    ]
    for name, value in model.state_dict().items():  # its linear layer drawn from the seeded generator too
        assert torch.equal(value, again.state_dict()[name]), name
    x = torch.randn(5, 64, generator=torch.Generator().manual_seed(1))
    torch.testing.assert_close(model(x), 3.0 * model.head.linear(model.features(x)))

    # scale=0 in a run: every logit is 0, so the loss is ln(10) and every prediction is label 0.
    overrides = [*SMALL, "rounds=2", "model.head=extensions.TemperedHead", "model.tempered.scale=0"]
    summary = run_experiment(tmp_path, overrides)
    run = compose_run(overrides)
    y_test = load_dataset(run.data, run.federation.num_clients, run.seed).y_test
    records = read_metrics(tmp_path)
    assert [r["train_loss"] for r in records] == pytest.approx([math.log(10)] * 2, abs=1e-6)
    assert [r["acc_per_task"] for r in records] == [[pytest.approx(float(np.mean(y_test == 0)))]] * 2
    assert summary["final_accuracy"] == pytest.approx(float(np.mean(y_test == 0)))

    with pytest.raises(ConfigError, match=r"model\.tempered\.scale = -1\.0: expected a number >= 0"):
        compose_run(["model.head=extensions.TemperedHead", "model.tempered.scale=-1"])


def test_a_users_stream_kind_sets_the_tasks_from_its_settings_and_refuses_another_kinds_section(tmp_path):
    import extensions

    overrides = [
        *SMALL,
        "rounds=null",
        "stream.kind=extensions.ClassBlocks",
        "stream.blocks.num_tasks=3",
        "stream.rounds_per_task=1",
    ]
    run = compose_run(overrides)
    assert run.stream.settings == extensions.ClassBlocks.Settings(num_tasks=3)
    dataset = load_dataset(run.data, run.federation.num_clients, run.seed)
    stream = build_stream(run, dataset)
    assert isinstance(stream, extensions.ClassBlocks) and stream.default_rounds == 3
    blocks = [[0, 1, 2, 3], [4, 5, 6], [7, 8, 9]]
    for task, labels in enumerate(blocks):
        server_round = task + 1
        parts = [stream.train_indices(server_round, c) for c in range(run.federation.num_clients)]
        held = np.concatenate(parts)
        # The clients' data of the task: every training sample of the block's labels, each once.
        assert sorted(held.tolist()) == np.flatnonzero(np.isin(dataset.y_train, labels)).tolist()
        assert set(dataset.y_test[stream.task_test_indices(task)].tolist()) == set(labels)

    # A run lasts the stream's 3 tasks (rounds=null) and scores each one.
    summary = run_experiment(tmp_path, overrides)
    records = read_metrics(tmp_path)
    assert summary["rounds"] == 3 and [r["task"] for r in records] == [0, 1, 2]
    assert all(len(r["acc_per_task"]) == 3 for r in records)
    assert len(summary["initial_acc_per_task"]) == 3

    # A shipped kind's section means nothing to it, and is refused naming both.
    with pytest.raises(
        ConfigError,
        match=r"stream\.permuted: settings of another stream than stream\.kind = "
        r"'extensions\.ClassBlocks', whose settings are stream\.blocks",
    ):
        compose_run([*overrides, "stream.permuted.num_tasks=3"])


def test_a_users_dataset_is_generated_from_its_settings_and_a_run_learns_it(tmp_path):
    import extensions

    overrides = [
        *SMALL,
        "rounds=5",
        "data.dataset=extensions.Blobs",
        "data.blobs.num_classes=4",
        "data.blobs.dim=5",
        "data.blobs.per_class=40",
        "client.lr=0.1",
    ]
    run = compose_run(overrides)
    assert run.data.settings == extensions.Blobs.Settings(num_classes=4, dim=5, per_class=40)
    dataset = load_dataset(run.data, run.federation.num_clients, run.seed)
    assert dataset.num_classes == 4 and dataset.input_shape == (5,)
    # test_fraction 0.2 of each class of 40: 8 per class held out.
    assert np.bincount(dataset.y_test).tolist() == [8] * 4 and np.bincount(dataset.y_train).tolist() == [32] * 4
    same = load_dataset(run.data, run.federation.num_clients, run.seed)
    other = load_dataset(run.data, run.federation.num_clients, run.seed + 1)
    assert np.array_equal(same.x_train, dataset.x_train) and not np.allclose(other.x_train, dataset.x_train)

    summary = run_experiment(tmp_path, overrides)
    records = read_metrics(tmp_path)
    for record in records:  # accuracies over the 32 test samples
        (accuracy,) = record["acc_per_task"]
        assert accuracy * 32 == pytest.approx(round(accuracy * 32))
    assert summary["initial_acc_per_task"][0] < 0.5 and summary["final_accuracy"] >= 0.9  # well-separated blobs

    with pytest.raises(ConfigError, match=r"data\.blobs\.per_class = 1: expected an integer >= 2"):
        compose_run(["data.dataset=extensions.Blobs", "data.blobs.per_class=1"])
    with pytest.raises(
        ConfigError,
        match=r"data\.scale = 255\.0: applies only to datasets read from files.*"
        r"not data\.dataset = 'extensions\.Blobs'",
    ):
        compose_run(["data.dataset=extensions.Blobs", "data.scale=255"])


QUERY_RUN = [
    "scenario=digits_class_incremental",
    "engine.backend=local",
    "stream.rounds_per_task=1",
    "client.epochs=1",
    "eval.probes=false",
    "federation.num_clients=5",
    "federation.clients_per_round=5",
    "client.method=extensions.ScaledSGD",
    "strategy._target_=extensions.RecordsLabelSums",
]


@pytest.fixture(scope="module")
def query_run(tmp_path_factory):
    """One run of the user's strategy (5 tasks of one round) and its stream, rebuilt from the same config."""
    with pytest.MonkeyPatch.context() as patch:
        patch.syspath_prepend(str(ROOT / "tests" / "user_code"))
        import extensions

        extensions.BUILT.clear()
        run_experiment(tmp_path_factory.mktemp("query_run"), QUERY_RUN)
        (strategy,) = extensions.BUILT
        run = compose_run(QUERY_RUN)
        return strategy, build_stream(run, load_dataset(run.data, run.federation.num_clients, run.seed))


def test_a_users_strategy_asks_a_users_query_handler_at_every_task_end(query_run):
    import extensions

    strategy, stream = query_run
    assert sorted(strategy.answers) == [0, 1, 2, 3, 4]
    for task, answers in strategy.answers.items():
        server_round = task + 1  # one round per task: its last
        clients = stream.available_clients(server_round)
        assert len(answers) == len(clients) == 5
        for client, answer in zip(clients, answers):
            indices = stream.train_indices(server_round, client)
            assert int(answer["num_samples"]) == len(indices)
            assert int(answer["label_sum"]) == int(stream.y_train[indices].sum())
            assert int(answer["rounds_trained"]) == server_round  # its state, after the round's training
            # The strategy's own arrays reach the handler as sent.
            np.testing.assert_array_equal(answer["echo/offsets"], extensions.sent_arrays(task)["offsets"])
    # The answers differ from task to task: each is on the data of the task just ended.
    assert len({tuple(int(a["label_sum"]) for a in answers) for answers in strategy.answers.values()}) == 5


def test_a_capped_query_is_answered_on_a_seeded_subset_of_that_many_samples(tmp_path, monkeypatch):
    monkeypatch.syspath_prepend(str(ROOT / "tests" / "user_code"))
    import extensions

    capped = [*QUERY_RUN, "+strategy.max_samples=4"]
    extensions.BUILT.clear()
    for run_dir in ("a", "b"):
        run_experiment(tmp_path / run_dir, capped)
    first, second = (strategy.answers for strategy in extensions.BUILT)
    run = compose_run(capped)
    stream = build_stream(run, load_dataset(run.data, run.federation.num_clients, run.seed))
    for task, answers in first.items():
        for client, answer, again in zip(stream.available_clients(task + 1), answers, second[task]):
            labels = np.sort(stream.y_train[stream.train_indices(task + 1, client)])
            assert int(answer["num_samples"]) == 4 < len(labels)
            assert labels[:4].sum() <= int(answer["label_sum"]) <= labels[-4:].sum()
            assert int(again["label_sum"]) == int(answer["label_sum"])  # the subset is drawn from the seed
    assert len({int(a["label_sum"]) for answers in first.values() for a in answers}) > 1


def test_a_0d_array_a_strategy_sends_with_its_query_reaches_the_handler_as_0d(query_run):
    strategy, _ = query_run
    for task, answers in strategy.answers.items():
        for answer in answers:
            assert answer["echo/task"].shape == () and int(answer["echo/task"]) == task
