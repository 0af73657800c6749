"""Replay, EWC and LwF on their own: each hook against a hand-computed expectation."""

from __future__ import annotations

import numpy as np
import pytest
import torch
from helpers import tiny_images, train_context
from helpers import tiny_model as _model
from torch.nn import functional as F

from clients.base import Batch, ReadOnlyState, TrainContext, flat_parameters
from clients.ewc import EWCClient
from clients.lwf import LwFClient
from clients.models import build_model
from clients.replay import ReplayClient
from clients.sgd import SGDClient
from simulator.config import ClientConfig, ModelConfig
from simulator.protocol import PreviousTask

X, Y = tiny_images()
TASK_MASKS = torch.tensor([[c < 5 for c in range(10)], [c >= 5 for c in range(10)]])


def _samples(indices, task):
    return Batch(X[indices], Y[indices], TASK_MASKS[task])


def _context(state=None, previous=None, new_task=False, lr=0.1, round_=2, config=None) -> TrainContext:
    """Task 1's context, with this module's samples by index."""
    return train_context(
        state, server_round=round_, lr=lr, config=config, task=1, samples=_samples, new_task=new_task, previous=previous
    )


def _method(cls, epochs=1, **settings):
    return cls(ClientConfig(lr=0.1, epochs=epochs, batch_size=8, settings=cls.Settings(**settings)))


def test_replay_keeps_a_reservoir_of_the_tasks_it_left_and_never_more_than_its_size():
    replay = _method(ReplayClient, buffer_size=6)
    state: dict = {}
    state = replay.begin_task(_model(), _context(state, PreviousTask(0, np.arange(4)), True))
    assert state["indices"].tolist() == [0, 1, 2, 3] and state["tasks"].tolist() == [0] * 4
    assert state["seen"] == 4
    state = replay.begin_task(_model(), _context(state, PreviousTask(1, np.arange(10, 30)), True))
    assert len(state["indices"]) == 6 and state["seen"] == 24
    assert set(state["indices"].tolist()) <= set(range(4)) | set(range(10, 30))
    kept = {i: t for i, t in zip(state["indices"].tolist(), state["tasks"].tolist())}
    assert all(t == (0 if i < 4 else 1) for i, t in kept.items())  # each index keeps its own task


def test_reservoir_sampling_keeps_each_sample_with_equal_probability():
    # Algorithm R: after n samples every one is in a buffer of k with probability k/n.
    replay = _method(ReplayClient, buffer_size=5)
    counts = np.zeros(20)
    for seed in range(400):
        state: dict = {}
        context = TrainContext(1, 0, {}, torch.Generator().manual_seed(seed), 0.1, state=state)
        state = replay.begin_task(
            _model(), TrainContext(**{**context.__dict__, "previous": PreviousTask(0, np.arange(20)), "new_task": True})
        )
        counts[state["indices"]] += 1
    assert np.all(np.abs(counts / 400 - 0.25) < 0.08), counts / 400


def test_replay_joins_each_batch_with_as_many_samples_from_memory_masked_by_their_task():
    replay = _method(ReplayClient, buffer_size=10)
    state = {"indices": np.array([0, 1, 2, 3]), "tasks": np.array([0, 0, 0, 0]), "seen": 4}
    batch = Batch(X[10:18], Y[10:18], TASK_MASKS[1])
    joined = replay.prepare_batch(batch, _context(state))
    assert len(joined.y) == 16 and torch.equal(joined.x[:8], batch.x)
    assert set(joined.y[8:].tolist()) <= {0, 1, 2, 3}
    assert torch.equal(joined.mask[:8], TASK_MASKS[1].expand(8, -1))
    assert torch.equal(joined.mask[8:], TASK_MASKS[0].expand(8, -1))
    assert replay.prepare_batch(batch, _context({})) is batch  # nothing remembered yet


def test_ewc_fisher_is_the_mean_squared_per_sample_gradient_and_the_anchor_the_weights_held():
    model, ewc = _model(), _method(EWCClient, fisher_samples=100)
    state: dict = {}
    state = ewc.begin_task(model, _context(state, PreviousTask(0, np.arange(6)), True))
    expected = torch.zeros_like(torch.from_numpy(state["fisher"]))
    for i in range(6):
        model.zero_grad()
        logits = model(X[i : i + 1]).masked_fill(~TASK_MASKS[0], float("-inf"))
        F.cross_entropy(logits, Y[i : i + 1]).backward()
        expected += torch.cat([p.grad.flatten() for p in model.parameters()]) ** 2
    torch.testing.assert_close(torch.from_numpy(state["fisher"]), expected / 6)
    assert np.array_equal(state["anchor"], flat_parameters(model))
    ewc_decayed = _method(EWCClient, fisher_samples=100, gamma=0.5)
    state = ewc_decayed.begin_task(model, _context(state, PreviousTask(0, np.arange(6)), True))
    torch.testing.assert_close(torch.from_numpy(state["fisher"]), 1.5 * expected / 6)


def test_ewc_gradient_adds_the_penalty_and_takes_it_implicitly():
    model, ewc = _model(), _method(EWCClient, strength=10.0)
    n = sum(p.numel() for p in model.parameters())
    state = {"fisher": np.full(n, 2.0, np.float32), "anchor": flat_parameters(model) - 1.0}
    context = _context(state, lr=0.1)
    ewc.begin(model, context)
    for p in model.parameters():
        p.grad = torch.full_like(p, 3.0)
    ewc.adjust_gradients(model, context)
    # (g + strength * F * (w - anchor)) / (1 + lr * strength * F) = (3 + 10 * 2 * 1) / (1 + 0.1 * 10 * 2)
    for p in model.parameters():
        torch.testing.assert_close(p.grad, torch.full_like(p, 23.0 / 3.0))
    assert ewc.end(model, context) == pytest.approx({"ewc_penalty": 0.5 * 10.0 * 2.0 * n}, rel=1e-5)


def test_ewc_holds_weights_that_mattered_closer_to_its_anchor_than_sgd():
    start = _model()
    state: dict = {}
    state = _method(EWCClient, strength=1000.0).begin_task(start, _context(state, PreviousTask(0, np.arange(20)), True))
    moved = {}
    for name, cls in [("sgd", SGDClient), ("ewc", EWCClient)]:
        model = _model()
        _method(cls, epochs=3).train(model, X[20:], Y[20:], _context(dict(state)))
        moved[name] = float(
            (
                torch.from_numpy(state["fisher"])
                * (torch.from_numpy(flat_parameters(model)) - torch.from_numpy(state["anchor"])) ** 2
            ).sum()
        )
    assert moved["ewc"] < 0.2 * moved["sgd"], moved


def test_lwf_takes_the_weights_held_at_the_boundary_as_teacher_and_distills_old_classes_only():
    model, lwf = _model(), _method(LwFClient, temperature=2.0, alpha=1.0)
    state: dict = {}
    state = lwf.begin_task(model, _context(state, PreviousTask(0, np.arange(5)), True))  # labels 0..4
    assert np.array_equal(state["teacher"], flat_parameters(model))
    assert state["old_heads"].tolist() == [0, 0, 0, 0, 0]  # class-IL: one head over the old classes
    context = _context(state)
    lwf.begin(model, context)
    batch = Batch(X[5:10], Y[5:10])
    # The student is the teacher: nothing to distill, the loss is the cross-entropy.
    torch.testing.assert_close(lwf.loss(model, batch, context), F.cross_entropy(model(batch.x), batch.y))
    with torch.no_grad():
        model.head.bias[7] += 3.0  # a new class's logit: not distilled
    torch.testing.assert_close(lwf.loss(model, batch, context), F.cross_entropy(model(batch.x), batch.y))
    with torch.no_grad():
        model.head.bias[0] += 3.0  # an old class's logit, 3 above its teacher's
    teacher = _model().head.bias.detach()[:5].expand(5, -1) + _model().encoder(batch.x) @ _model().head.weight[:5].T
    student = teacher + torch.tensor([3.0, 0, 0, 0, 0])
    kl = F.kl_div(F.log_softmax(student / 2, 1), F.softmax(teacher / 2, 1), reduction="batchmean") * 4
    torch.testing.assert_close(lwf.loss(model, batch, context), F.cross_entropy(model(batch.x), batch.y) + kl)


def test_lwf_in_task_incremental_streams_distills_each_old_head_on_its_own():
    model, lwf = _model(), _method(LwFClient)
    state: dict = {}
    masked_context = lambda **kw: TrainContext(**{**_context(state).__dict__, "class_mask": TASK_MASKS[1], **kw})  # noqa: E731
    state = lwf.begin_task(model, masked_context(previous=PreviousTask(0, np.array([0, 1])), new_task=True))
    state = lwf.begin_task(model, masked_context(previous=PreviousTask(1, np.array([2, 3])), new_task=True))
    assert state["old_heads"].tolist() == [0, 0, 1, 1]
    lwf.begin(model, masked_context())
    assert [h.tolist() for h in lwf.old_classes] == [[0, 1], [2, 3]]


def test_lwf_reports_an_old_head_over_one_class_which_distils_nothing():
    model, lwf = _model(), _method(LwFClient)
    batch = Batch(X[5:10], Y[5:10])
    for heads, single in (([0, 0, 1, 1], 0.0), ([0, -1, 1, 1], 1.0)):  # the second: head 0 over class 0 alone
        context = _context({"teacher": flat_parameters(model), "old_heads": np.array(heads)})
        lwf.begin(model, context)
        lwf.loss(model, batch, context)
        assert lwf.end(model, context)["lwf_single_class_heads"] == single


def test_lwf_keeps_its_old_classes_when_the_task_it_left_had_no_samples():
    model, lwf = _model(), _method(LwFClient)
    state: dict = {}
    state = lwf.begin_task(model, _context(state, PreviousTask(0, np.zeros(0, np.int64)), True))
    assert state["old_heads"].tolist() == []
    lwf.begin(model, _context(state))
    assert lwf.old_classes is None  # nothing to distill: plain cross-entropy


def test_methods_report_their_own_metrics():
    model = _model()
    state = {"indices": np.array([0, 1]), "tasks": np.array([0, 0]), "seen": 2}
    result = _method(ReplayClient).train(model, X[20:28], Y[20:28], _context(state))
    assert result.metrics == {"replay_memory": 2.0}
    assert _method(SGDClient).train(model, X[20:28], Y[20:28], _context({})).metrics == {}


def test_the_learning_rate_in_the_context_sets_the_step():
    moved = {}
    for lr in (0.0, 0.1, 0.2):
        model = _model()
        _method(SGDClient).train(model, X[:8], Y[:8], _context(lr=lr))  # one batch: one step
        moved[lr] = flat_parameters(model) - flat_parameters(_model())
    assert not moved[0.0].any()
    np.testing.assert_allclose(moved[0.2], 2 * moved[0.1], rtol=1e-4, atol=1e-7)


def test_a_methods_new_state_is_returned_and_writing_into_the_contexts_state_is_refused():
    replay, state = _method(ReplayClient, buffer_size=4), {"seen": 0}
    context = _context(ReadOnlyState(state), PreviousTask(0, np.arange(3)), True)
    result = replay.train(_model(), X[20:28], Y[20:28], context)
    assert result.state["indices"].tolist() == [0, 1, 2] and result.state["seen"] == 3
    assert state == {"seen": 0} and dict(context.state) == {"seen": 0}  # what came in is left as it was

    class OldStyle(SGDClient):  # a method written the old way: it writes into context.state
        def end(self, model, context):
            context.state["rounds"] = 1
            return {}

    with pytest.raises(TypeError, match="read-only: return the new state from begin_task .* or new_state"):
        _method(OldStyle).train(_model(), X[20:28], Y[20:28], _context(ReadOnlyState({})))


def test_a_new_state_of_none_keeps_the_state_the_round_trained_with():
    class KeepsAll(ReplayClient):
        def new_state(self, model, context):
            return None

    context = _context(ReadOnlyState({"seen": 0}), PreviousTask(0, np.arange(3)), True)
    state = _method(KeepsAll, buffer_size=4).train(_model(), X[20:28], Y[20:28], context).state
    assert state["indices"].tolist() == [0, 1, 2] and state["seen"] == 3  # begin_task's, not the one it came with


def _batch_norm_model(seed: int) -> torch.nn.Module:
    """A ResNet-32 whose running statistics moved on seeded batches: a round's global model."""
    model = build_model((3, 8, 8), 10, ModelConfig(name="resnet32"), torch.Generator().manual_seed(0))
    with torch.no_grad():
        for step in range(3):
            model.train()(torch.rand(8, 3, 8, 8, generator=torch.Generator().manual_seed(10 * seed + step)) * seed)
    return model


def test_lwfs_teacher_keeps_its_batch_norm_statistics_whatever_the_worker_ran_before():
    teacher = _batch_norm_model(1)
    lwf = _method(LwFClient)
    state = lwf.begin_task(teacher, _context({}, PreviousTask(0, np.arange(5)), True))
    x, y = torch.rand(16, 3, 8, 8, generator=torch.Generator().manual_seed(1)), torch.arange(16) % 4 + 5
    fresh, used = _method(LwFClient), _method(LwFClient)
    used.train(_batch_norm_model(3), x, y, _context(state))  # the worker's teacher first served another round
    losses = [method.train(_batch_norm_model(2), x, y, _context(state)).train_loss for method in (fresh, used)]
    assert losses[0] == losses[1]
    assert "teacher_statistics" in state and "teacher_statistics" not in lwf.begin_task(
        _model(), _context({}, PreviousTask(0, np.arange(5)), True)
    )  # a model without buffers keeps the state it always had
