"""TARGET (strategies/target.py, strategies/generator.py, clients/target.py): the generator's batch norm loss is
DeepInversion's, the client's loss is cross-entropy plus the KL of the old classes' softened logits, the samples
depend on the seed only (not on the backend or the actors), one half without the other is refused, a run
killed with SIGKILL resumes to the same numbers, and at digits scale it keeps more than FedAvg."""

from __future__ import annotations

import contextlib
import json

import numpy as np
import pytest
import torch
from helpers import (
    kill_after_records,
    numbers_of,
    run_experiment,
    run_py_to_the_end,
    saved_strategy_state,
    tiny_images,
    tiny_model,
    train_context,
)
from torch import nn
from torch.nn import functional as F

from clients.base import Batch
from clients.target import TargetClient, TargetSettings, describe_data, distillation
from simulator.config import ClientConfig, ConfigError
from simulator.protocol import Query
from strategies.generator import BatchNormMatching, SynthesisSettings, disagreement, synthesize
from strategies.target import TARGET, redrawn

TARGET_HALVES = ["strategy=target", "client.method=target"]
# digits with two rounds a task and a small synthesis: seconds a run
SMALL = [
    "scenario=digits_class_incremental",
    "stream.rounds_per_task=2",
    "client.epochs=1",
    *TARGET_HALVES,
    "strategy.synthetic_samples=256",
    "strategy.synthesis_batch_size=128",
    "strategy.generator_steps=3",
    "strategy.generator_width=4",
    "strategy.latent_dim=16",
    "strategy.warmup_batches=1",
    "strategy.student_steps=2",
]


@contextlib.contextmanager
def one_thread():
    """One torch thread, as the strategy synthesises (and the fastest on a shared machine at this size)."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        yield
    finally:
        torch.set_num_threads(threads)


def _settings(**changes) -> SynthesisSettings:
    base = dict(
        samples=24,
        batch_size=8,
        generator_steps=2,
        latent_dim=8,
        generator_width=2,
        generator_lr=0.002,
        latent_lr=0.01,
        ce_weight=0.5,
        bn_weight=10.0,
        adversarial_weight=1.0,
        warmup_batches=1,
        student_steps=2,
        student_lr=0.2,
        student_temperature=20.0,
    )
    return SynthesisSettings(**{**base, **changes})


def test_the_batch_norm_loss_is_deepinversions_by_hand_on_a_tiny_model():
    torch.manual_seed(0)
    model = nn.Sequential(
        nn.Conv2d(1, 3, 3), nn.BatchNorm2d(3), nn.ReLU(), nn.Flatten(), nn.Linear(3 * 4 * 4, 4), nn.BatchNorm1d(4)
    )
    conv, bn2d, _, _, linear, bn1d = model
    with torch.no_grad():
        bn2d.running_mean.copy_(torch.tensor([0.1, -0.2, 0.3]))
        bn2d.running_var.copy_(torch.tensor([0.5, 1.5, 2.0]))
        bn1d.running_mean.copy_(torch.tensor([0.0, 1.0, -1.0, 0.5]))
        bn1d.running_var.copy_(torch.tensor([1.0, 0.2, 3.0, 0.7]))
    model.eval()
    x = torch.rand(5, 1, 6, 6)
    matching = BatchNormMatching(model)
    model(x)
    got = float(matching.loss().detach())
    matching.remove()

    def term(inputs: np.ndarray, running_mean: torch.Tensor, running_var: torch.Tensor) -> float:
        per_channel = np.moveaxis(inputs, 1, 0).reshape(inputs.shape[1], -1)  # channels x (samples, pixels)
        mean = per_channel.mean(axis=1)
        var = ((per_channel - mean[:, None]) ** 2).mean(axis=1)  # biased, as batch norm normalises
        return float(
            np.sqrt(((running_mean.numpy() - mean) ** 2).sum()) + np.sqrt(((running_var.numpy() - var) ** 2).sum())
        )

    with torch.no_grad():
        first = conv(x)
        second = linear(F.relu(bn2d(first)).flatten(1))
    expected = term(first.double().numpy(), bn2d.running_mean, bn2d.running_var) + term(
        second.double().numpy(), bn1d.running_mean, bn1d.running_var
    )
    assert got == pytest.approx(expected, rel=1e-5)
    no_batch_norm = BatchNormMatching(tiny_model())  # no term where the model has no batch norm
    assert float(no_batch_norm.loss()) == 0.0


def test_the_adversarial_term_counts_only_samples_on_which_teacher_and_student_agree():
    teacher = torch.tensor([[2.0, 0.0, -1.0], [0.0, 1.0, 0.0]])
    student = torch.tensor([[1.0, 0.5, 0.0], [3.0, 0.0, 0.0]])  # agrees on the first, not the second
    p, q = F.softmax(teacher[0], 0), F.softmax(student[0], 0)
    assert float(disagreement(student, teacher)) == pytest.approx(float((p * (p / q).log()).sum()) / 2, rel=1e-6)


def test_the_clients_distillation_is_the_kl_of_softened_logits_by_hand():
    student = torch.tensor([[1.0, 2.0, 0.5], [0.0, -1.0, 3.0]])
    teacher = torch.tensor([[2.0, 1.0, 0.0], [1.0, 1.0, 1.0]])
    t = 2.0
    p = np.exp(teacher.numpy() / t) / np.exp(teacher.numpy() / t).sum(1, keepdims=True)
    q = np.exp(student.numpy() / t) / np.exp(student.numpy() / t).sum(1, keepdims=True)
    expected = (p * np.log(p / q)).sum() / 2  # batch mean, no T^2 (the authors' soft cross-entropy's gradient)
    assert float(distillation(student, teacher, t)) == pytest.approx(expected, rel=1e-6)


@pytest.mark.parametrize(("new_only", "augment"), [(True, None), (False, lambda x: x.flip(-1))])
def test_a_clients_loss_is_cross_entropy_plus_the_weighted_distillation_on_drawn_synthetic_samples(new_only, augment):
    model, teacher = tiny_model(0), tiny_model(1)
    x, y = tiny_images()
    synthetic = torch.rand(20, 1, 8, 8, generator=torch.Generator().manual_seed(2))
    old = torch.tensor([0, 1, 2, 3])
    payload = {"synthetic": synthetic, "old_classes": old}
    payload.update({f"teacher/{name}": param.detach().clone() for name, param in teacher.named_parameters()})
    settings = TargetSettings(kd_weight=3.0, temperature=2.0, synthetic_batch_size=6, ce_new_classes_only=new_only)
    method = TargetClient(ClientConfig(batch_size=8, settings=settings))
    context = train_context(payload=payload, augment=augment)
    method.begin(model, context)
    batch = Batch(x[:8], torch.tensor([2, 4, 5, 6, 7, 8, 9, 4]))  # holds old class 2
    got = method.loss(model, batch, context)

    # By hand: the draw the method makes from the context's generator, the logits masked as it says.
    seed = int(torch.randint(2**62, (1,), generator=torch.Generator().manual_seed(5)))
    chosen = torch.randint(20, (6,), generator=torch.Generator().manual_seed(seed))
    with torch.no_grad():
        logits = model(batch.x)
        if new_only:
            logits[:, [0, 1, 3]] = float("-inf")  # old classes but 2, which the batch holds
        cross_entropy = F.cross_entropy(logits, batch.y)
        samples = synthetic[chosen] if augment is None else augment(synthetic[chosen])  # both see them augmented
        s = model(samples)[:, old].double().numpy() / 2.0
        t = teacher(samples)[:, old].double().numpy() / 2.0
    p = np.exp(t) / np.exp(t).sum(1, keepdims=True)
    log_q = s - np.log(np.exp(s).sum(1, keepdims=True))
    kl = (p * (np.log(p) - log_q)).sum() / 6
    assert float(got.detach()) == pytest.approx(float(cross_entropy) + 3.0 * kl, rel=1e-5)
    got.backward()  # the teacher takes no gradient
    assert all(p.grad is None for p in method.teacher.parameters())


def test_without_a_payload_a_target_client_trains_as_sgd():
    (x, y), config = tiny_images(), ClientConfig(lr=0.1, epochs=1, batch_size=8, settings=TargetSettings())
    plain, target = tiny_model(), tiny_model()
    from clients.sgd import SGDClient

    SGDClient(ClientConfig(lr=0.1, epochs=1, batch_size=8)).train(plain, x, y, train_context())
    result = TargetClient(config).train(target, x, y, train_context())
    for a, b in zip(plain.parameters(), target.parameters()):
        assert torch.equal(a, b)
    assert result.metrics == {"target_distillation": 0.0}


def test_describe_data_tells_the_labels_shape_and_range_per_channel_and_nothing_per_sample():
    x = torch.rand(6, 3, 4, 5)
    x[:, 1] = x[:, 1] * 2 - 1
    query = Query("clients.target.describe_data", {}, x, torch.tensor([3, 1, 3, 7, 1, 1]), torch.Generator())
    answer = describe_data(tiny_model(), query)
    assert answer["classes"].tolist() == [1, 3, 7] and answer["shape"].tolist() == [3, 4, 5]
    np.testing.assert_allclose(answer["low"], x.amin(dim=(0, 2, 3)).double().numpy())
    np.testing.assert_allclose(answer["high"], x.amax(dim=(0, 2, 3)).double().numpy())
    assert int(answer["num_samples"]) == 6


def test_synthesis_depends_on_torchs_seed_alone_and_makes_balanced_labels_in_range():
    teacher = tiny_model(0).eval()

    def made(seed: int):
        with torch.random.fork_rng(devices=[]), one_thread():
            torch.manual_seed(seed)
            student = redrawn(tiny_model(0))
            return synthesize(teacher, student, np.array([1, 4, 6]), (1, 8, 8), np.zeros(1), np.ones(1), _settings())

    one, again, other = made(3), made(3), made(4)
    assert one.x.shape == (24, 1, 8, 8) and one.x.dtype == np.float32
    assert np.array_equal(one.x, again.x) and not np.array_equal(one.x, other.x)
    assert one.y.tolist() == [1, 4, 6] * 8
    assert one.x.min() >= 0 and one.x.max() <= 1
    assert one.generator_steps == 3 * 2 and one.student_steps == 2 * 2  # after batches 0 and 1: the last needs none


@pytest.mark.parametrize(
    ("override", "message"),
    [
        ("strategy.generator_steps=0", r"strategy\.generator_steps = 0: expected an integer >= 1"),
        ("strategy.bn_weight=-1", r"strategy\.bn_weight = -1(\.0)?: expected a number >= 0"),
        ("strategy.generator_lr=0", r"strategy\.generator_lr = 0(\.0)?: expected a number > 0"),
        ("client.target.temperature=0", r"client\.target\.temperature"),
        ("client.target.synthetic_batch_size=0", r"client\.target\.synthetic_batch_size"),
        ("strategy.synthetic_samples=257", r"strategy\.synthetic_samples = 257 leaves a last batch of 1 sample"),
    ],
)
def test_impossible_settings_are_refused_naming_the_key(tmp_path, override, message):
    with pytest.raises(ConfigError, match=message):
        run_experiment(tmp_path, ["rounds=1", "engine.backend=local", *TARGET_HALVES, override])


@pytest.mark.parametrize(
    ("overrides", "message"),
    [
        (["strategy=target", "client.method=sgd"], "needs its client half, client.method=target"),
        (["strategy=fedavg", "client.method=target"], "is the client half of strategy=target"),
    ],
)
def test_one_half_of_target_without_the_other_is_refused_before_any_work(tmp_path, overrides, message):
    with pytest.raises(ConfigError, match=message):
        run_experiment(tmp_path, ["rounds=1", "engine.backend=local", *overrides])
    assert not (tmp_path / "metrics.jsonl").exists()


def test_the_strategy_state_restores_and_refuses_what_does_not_fit_the_model():
    from flwr.app import Array, ArrayRecord

    arrays = ArrayRecord({name: Array(p.detach().numpy()) for name, p in tiny_model().named_parameters()})
    teacher = {name: array.numpy() for name, array in arrays.items()}
    x = np.zeros((4, 1, 8, 8), np.float32)
    state = {
        "classes": [0, 1],
        "synthesis": {"x": x, "y": np.array([0, 1, 0, 1]), "teacher": teacher},
        "costs": [{"task": 0, "seconds": 1.0}],
    }
    strategy = TARGET()
    strategy.restore_state(state, arrays)
    assert strategy.seen_classes == [0, 1] and np.array_equal(strategy.synthetic_x, x)
    assert strategy.checkpoint_state()["costs"] == [{"task": 0, "seconds": 1.0}]
    short = {**teacher, "head.weight": teacher["head.weight"][:3]}
    for bad, where in [
        ({**state, "classes": [1, 0]}, "classes"),
        ({**state, "synthesis": {**state["synthesis"], "y": np.array([0, 1, 2, 1])}}, "synthetic labels"),
        ({**state, "synthesis": {**state["synthesis"], "teacher": short}}, "teacher"),
        ({**state, "synthesis": {**state["synthesis"], "x": x.astype(np.float64)}}, "synthetic samples"),
    ]:
        with pytest.raises(ValueError, match=where):
            TARGET().restore_state(bad, arrays)


@pytest.mark.slow
def test_the_payload_reaches_the_next_tasks_clients_and_the_costs_are_kept(tmp_path):
    summary = run_experiment(tmp_path, [*SMALL, "engine.backend=local"])
    state = saved_strategy_state(tmp_path / "checkpoints")
    assert state["classes"] == list(range(8))  # seen by the fourth task end; none at the last
    assert [cost["task"] for cost in state["costs"]] == [0, 1, 2, 3]
    assert all(cost["generator_steps"] == 2 * 3 and cost["samples"] == 256 for cost in state["costs"])
    assert state["synthesis"]["x"].shape == (256, 1, 8, 8)
    records = [json.loads(line) for line in (tmp_path / "metrics.jsonl").read_text().splitlines()]
    assert [r["train/target_distillation"] > 0 for r in records] == [False] * 2 + [True] * 8
    assert summary["rounds"] == 10


@pytest.mark.ray
def test_the_synthetic_samples_are_the_same_on_two_ray_actors_as_in_process(tmp_path):
    run_experiment(tmp_path / "local", [*SMALL, "engine.backend=local"])
    run_experiment(tmp_path / "ray", [*SMALL, "engine.backend=ray", "engine.num_actors=2"])
    local, ray = (saved_strategy_state(tmp_path / run / "checkpoints")["synthesis"] for run in ("local", "ray"))
    assert np.array_equal(local["x"], ray["x"]) and np.array_equal(local["y"], ray["y"])
    assert numbers_of(tmp_path / "ray") == numbers_of(tmp_path / "local")


@pytest.mark.slow
def test_a_target_run_killed_with_sigkill_mid_task_resumes_to_the_uninterrupted_numbers(tmp_path):
    # Killed in task 2: the samples and teacher of task 1's end are strategy state the resume needs.
    overrides = [*SMALL, "engine.backend=local", "engine.checkpoint_every=1"]
    run_py_to_the_end(tmp_path / "whole", overrides, timeout_s=300)
    done = kill_after_records(tmp_path / "killed", overrides, 5, timeout_s=120)
    assert not (tmp_path / "killed" / "summary.json").exists() and done < 10, done
    run_py_to_the_end(tmp_path / "killed", [*overrides, "resume=true"], timeout_s=300)
    assert numbers_of(tmp_path / "killed") == numbers_of(tmp_path / "whole")
    whole, killed = (saved_strategy_state(tmp_path / run / "checkpoints") for run in ("whole", "killed"))
    assert np.array_equal(whole["synthesis"]["x"], killed["synthesis"]["x"])


@pytest.mark.slow
def test_at_digits_scale_target_keeps_more_than_fedavg_and_why_it_learns_later_tasks_little(tmp_path):
    # The scenario as the README measures it, seed 0: FedAvg of SGD forgets every task but the last.
    fedavg = run_experiment(tmp_path / "fedavg", ["scenario=digits_class_incremental", "engine.backend=local"])
    target = run_experiment(
        tmp_path / "target", ["scenario=digits_class_incremental", "engine.backend=local", *TARGET_HALVES]
    )
    assert fedavg["final_accuracy"] < 0.2 and fedavg["forgetting"] > 0.95
    assert target["final_accuracy"] > fedavg["final_accuracy"] + 0.05
    assert target["forgetting"] < 0.3
    # What it keeps is the first tasks: the real batches' cross-entropy leaves the old classes' logits out
    # (the authors' code), so nothing ranks a new class above the old ones, and the last task's classes,
    # separated from each other, stay below them (its accuracy after its own training is far under FedAvg's).
    matrix = np.loadtxt(tmp_path / "target" / "accuracy_matrix.csv", delimiter=",", skiprows=1)
    plain = np.loadtxt(tmp_path / "fedavg" / "accuracy_matrix.csv", delimiter=",", skiprows=1)
    assert matrix[-1, 0] > 0.4 > plain[-1, 0]
    assert matrix[-1, -1] < plain[-1, -1] - 0.5
