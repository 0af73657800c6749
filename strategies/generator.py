"""TARGET's data synthesis (strategies/target.py): the generator, its losses, and the loop that inverts a model.

Zhang et al. 2023 (ICCV, "TARGET: Federated Class-Continual Learning via
Exemplar-Free Distillation", Sec. 4.2) train a generator ``G`` to invert the
global model ``f`` (the teacher) without any data: from a latent ``z`` and a
label ``y`` drawn among the classes seen so far, ``x = G(z)`` minimises

    ce_weight * CE(f(x), y)                               # x looks like class y to f
  + bn_weight * sum_l (||mu_l(x) - mu_l|| + ||var_l(x) - var_l||)   # DeepInversion (Yin et al. 2020)
  - adversarial_weight * mean_i[ KL(f(x_i) || s(x_i)) * 1{argmax f(x_i) == argmax s(x_i)} ]

where ``mu_l``, ``var_l`` are each batch norm layer's running statistics and
``mu_l(x)``, ``var_l(x)`` the batch's (biased) statistics of that layer's input
(no term where the model has no batch norm), and ``s`` is a student that learns
to mimic ``f`` on the samples made so far (KL at temperature
``student_temperature``): the generator seeks samples on which the two still
agree yet differ in their distributions, near ``f``'s decision boundaries,
which spreads the samples out (the paper's diversity term, from Fang et al.
2021's data-free adversarial distillation). The student and the adversarial
term start after ``warmup_batches`` batches.

Each of the ``ceil(samples / batch_size)`` batches draws a fresh ``z`` and
takes ``generator_steps`` Adam steps on ``G`` (lr ``generator_lr``) and on
``z`` (``latent_lr``), keeping the step's inputs with the lowest loss, as the
authors' code does; the student then takes ``student_steps`` SGD steps on
batches drawn from all samples kept so far. Labels are balanced: batch ``b``'s
``i``-th sample takes class ``classes[(b * batch_size + i) % len(classes)]``.

What differs from the authors' code (github.com/zj-jayzhang/Federated-Class-
Continual-Learning, ``methods/target.py``): one generator is trained through
all batches (theirs clones a meta-generator per batch and updates it by first-
order MAML, Fang et al. 2022's speed-up); no crop/flip of the samples before
the teacher; no momentum on the batch statistics; the student's learning rate
is constant (theirs: cosine over 200 rounds). The generator ends in a sigmoid
scaled to the clients' input range per channel (theirs: a sigmoid followed by
the dataset's known normalisation). Inputs that are vectors get a small MLP
generator. All of it draws from torch's global generator, which the caller
seeds, and runs on the CPU.
"""

from __future__ import annotations

import math
import time
from dataclasses import dataclass

import numpy as np
import torch
from torch import nn
from torch.nn import functional as F


class Generator(nn.Module):
    """The authors' DCGAN-style generator, sized to any ``(C, H, W)``: a linear layer to ``2 * width``
    maps of a quarter of the size, two upsamplings with 3x3 convolutions and batch norm, a 3x3 conv to
    ``C`` channels, and a sigmoid scaled to ``[low, high]`` per channel. A vector shape ``(D,)`` gets
    two hidden layers of ``4 * width`` units instead."""

    def __init__(self, latent_dim: int, width: int, shape: tuple[int, ...], low: np.ndarray, high: np.ndarray):
        super().__init__()
        self.shape = tuple(shape)
        if len(shape) == 3:
            channels, height, width_px = shape
            self.start = (2 * width, math.ceil(height / 4), math.ceil(width_px / 4))
            self.project = nn.Linear(latent_dim, math.prod(self.start))
            self.body = nn.Sequential(
                nn.BatchNorm2d(2 * width),
                nn.Upsample(size=(math.ceil(height / 2), math.ceil(width_px / 2))),
                nn.Conv2d(2 * width, 2 * width, 3, padding=1, bias=False),
                nn.BatchNorm2d(2 * width),
                nn.LeakyReLU(0.2),
                nn.Upsample(size=(height, width_px)),
                nn.Conv2d(2 * width, width, 3, padding=1, bias=False),
                nn.BatchNorm2d(width),
                nn.LeakyReLU(0.2),
                nn.Conv2d(width, channels, 3, padding=1),
            )
            broadcast = (1, channels, 1, 1)
        elif len(shape) == 1:
            hidden = 4 * width
            self.start = (hidden,)
            self.project = nn.Linear(latent_dim, hidden)
            self.body = nn.Sequential(
                nn.BatchNorm1d(hidden),
                nn.LeakyReLU(0.2),
                nn.Linear(hidden, hidden),
                nn.BatchNorm1d(hidden),
                nn.LeakyReLU(0.2),
                nn.Linear(hidden, shape[0]),
            )
            broadcast = (1, -1)
        else:
            raise ValueError(f"a generator makes images (C, H, W) or vectors (D,), not inputs of shape {shape}")
        low_t = torch.as_tensor(np.asarray(low, dtype=np.float32)).reshape(broadcast)
        high_t = torch.as_tensor(np.asarray(high, dtype=np.float32)).reshape(broadcast)
        self.register_buffer("low", low_t)
        self.register_buffer("span", high_t - low_t)

    def forward(self, z: torch.Tensor) -> torch.Tensor:
        out = self.body(self.project(z).view(len(z), *self.start))
        return self.low + self.span * torch.sigmoid(out)


class BatchNormMatching:
    """DeepInversion's statistics loss on ``model``'s batch norm layers: after a forward pass,
    :meth:`loss` is, summed over the layers, ``||running_mean - mean(x)||_2 + ||running_var - var(x)||_2``
    with ``x`` the layer's input and its mean and biased variance taken per channel over every other
    dimension (0 where the model has no batch norm). Remove the hooks with :meth:`remove`."""

    def __init__(self, model: nn.Module) -> None:
        self.layers = [m for m in model.modules() if isinstance(m, nn.modules.batchnorm._BatchNorm)]
        self.terms: list[torch.Tensor] = []
        self.hooks = [layer.register_forward_hook(self._hook) for layer in self.layers]

    def _hook(self, module: nn.Module, inputs: tuple[torch.Tensor, ...], output: torch.Tensor) -> None:
        x = inputs[0]
        dims = [d for d in range(x.dim()) if d != 1]
        mean = x.mean(dim=dims)
        var = x.var(dim=dims, unbiased=False)
        self.terms.append(torch.norm(module.running_mean - mean, 2) + torch.norm(module.running_var - var, 2))

    def loss(self) -> torch.Tensor:
        """The loss of the forward passes since the last call (then forgotten)."""
        terms, self.terms = self.terms, []
        return torch.stack(terms).sum() if terms else torch.zeros(())

    def remove(self) -> None:
        for hook in self.hooks:
            hook.remove()


def kl_divergence(student: torch.Tensor, teacher: torch.Tensor, temperature: float) -> torch.Tensor:
    """``T^2 * KL(softmax(teacher / T) || softmax(student / T))``, averaged over the batch (the student's
    distillation loss; Hinton et al. 2015)."""
    target = F.softmax(teacher / temperature, dim=1)
    return F.kl_div(F.log_softmax(student / temperature, dim=1), target, reduction="batchmean") * temperature**2


def disagreement(student: torch.Tensor, teacher: torch.Tensor) -> torch.Tensor:
    """The mean over the batch of ``KL(softmax(teacher) || softmax(student))`` on the samples where both
    predict the same class (0 elsewhere): what the generator maximises (its loss takes it negated)."""
    per_sample = F.kl_div(F.log_softmax(student, dim=1), F.softmax(teacher, dim=1), reduction="none").sum(dim=1)
    agree = (student.argmax(dim=1) == teacher.argmax(dim=1)).to(per_sample.dtype)
    return (per_sample * agree).mean()


@dataclass(frozen=True)
class SynthesisSettings:
    """The synthesis's hyperparameters (strategy.<key>, strategies/target.py names the defaults' sources)."""

    samples: int
    batch_size: int
    generator_steps: int
    latent_dim: int
    generator_width: int
    generator_lr: float
    latent_lr: float
    ce_weight: float
    bn_weight: float
    adversarial_weight: float
    warmup_batches: int
    student_steps: int
    student_lr: float
    student_temperature: float


@dataclass(frozen=True)
class Synthesis:
    """What a synthesis made and what it cost."""

    x: np.ndarray  # float32, (samples, *shape)
    y: np.ndarray  # int64, the class each sample was made for
    seconds: float
    generator_steps: int
    student_steps: int
    final_loss: float  # the generator's loss at its last step
    teacher_agreement: float  # share of the samples the teacher classifies as the class they were made for


def synthesize(
    teacher: nn.Module,
    student: nn.Module,
    classes: np.ndarray,
    shape: tuple[int, ...],
    low: np.ndarray,
    high: np.ndarray,
    settings: SynthesisSettings,
) -> Synthesis:
    """``settings.samples`` inputs of ``shape`` made by inverting ``teacher`` for ``classes`` (sorted labels),
    ``student`` (a model like the teacher, its weights drawn afresh by the caller) learning beside it; torch's
    global generator gives every draw. The logits both are judged by are those of ``classes``."""
    started = time.perf_counter()
    columns = torch.as_tensor(classes, dtype=torch.long)
    teacher.eval().requires_grad_(False)
    generator = Generator(settings.latent_dim, settings.generator_width, shape, low, high).train()
    matching = BatchNormMatching(teacher)
    optimizer_student = _StudentSGD(list(student.parameters()), settings.student_lr)
    kept_x: list[torch.Tensor] = []
    kept_y: list[torch.Tensor] = []
    generator_steps = student_steps = 0
    loss = torch.zeros(())
    try:
        batches = math.ceil(settings.samples / settings.batch_size)
        for batch in range(batches):
            size = min(settings.batch_size, settings.samples - batch * settings.batch_size)
            positions = torch.arange(batch * settings.batch_size, batch * settings.batch_size + size)
            targets = columns[positions % len(columns)]
            slots = positions % len(columns)  # the target's column among the judged logits
            z = torch.randn(size, settings.latent_dim, requires_grad=True)
            optimizer = _Adam([(list(generator.parameters()), settings.generator_lr), ([z], settings.latent_lr)])
            adversarial = settings.adversarial_weight > 0 and batch >= settings.warmup_batches
            student.eval().requires_grad_(False)
            best, best_loss = None, math.inf
            for _ in range(settings.generator_steps):
                x = generator(z)
                matching.terms = []
                teacher_logits = teacher(x)[:, columns]
                loss = settings.ce_weight * F.cross_entropy(teacher_logits, slots)
                loss = loss + settings.bn_weight * matching.loss()
                if adversarial:
                    loss = loss - settings.adversarial_weight * disagreement(student(x)[:, columns], teacher_logits)
                value = float(loss.detach())
                if best is None or value < best_loss:
                    best, best_loss = x.detach().clone(), value
                for param in optimizer.params:
                    param.grad = None
                loss.backward()
                optimizer.step()
                generator_steps += 1
            kept_x.append(best)
            kept_y.append(targets)
            if settings.student_steps and batch >= settings.warmup_batches - 1 and batch + 1 < batches:
                student_steps += _train_student(
                    student, teacher, torch.cat(kept_x), columns, settings, optimizer_student
                )
    finally:
        matching.remove()
    x_all, y_all = torch.cat(kept_x), torch.cat(kept_y)
    with torch.no_grad():
        predicted = columns[teacher(x_all)[:, columns].argmax(dim=1)]
    return Synthesis(
        x=x_all.numpy().astype(np.float32),
        y=y_all.numpy().astype(np.int64),
        seconds=time.perf_counter() - started,
        generator_steps=generator_steps,
        student_steps=student_steps,
        final_loss=float(loss.detach()),
        teacher_agreement=float((predicted == y_all).double().mean()),
    )


class _Adam:
    """Adam with betas (0.5, 0.999) and eps 1e-8 (the authors' generator optimiser), per group of parameters
    its own learning rate; written out so that no ``torch.optim`` optimizer is built (its first use imports
    ``torch._dynamo``: seconds)."""

    def __init__(self, groups: list[tuple[list[torch.Tensor], float]], betas: tuple[float, float] = (0.5, 0.999)):
        self.groups = groups
        self.params = [param for params, _ in groups for param in params]
        self.betas = betas
        self.moments = [(torch.zeros_like(p), torch.zeros_like(p)) for p in self.params]
        self.steps = 0

    @torch.no_grad()
    def step(self) -> None:
        self.steps += 1
        beta1, beta2 = self.betas
        correction1, correction2 = 1 - beta1**self.steps, 1 - beta2**self.steps
        moments = iter(self.moments)
        for params, lr in self.groups:
            for param in params:
                first, second = next(moments)
                if param.grad is None:
                    continue
                first.mul_(beta1).add_(param.grad, alpha=1 - beta1)
                second.mul_(beta2).addcmul_(param.grad, param.grad, value=1 - beta2)
                denominator = (second / correction2).sqrt_().add_(1e-8)
                param.addcdiv_(first, denominator, value=-lr / correction1)


class _StudentSGD:
    """SGD with momentum 0.9 and weight decay 1e-4 (the authors' student optimiser), written out as
    clients/base.py's sgd_step is."""

    def __init__(self, params: list[torch.Tensor], lr: float) -> None:
        self.params, self.lr = params, lr
        self.velocity: dict[int, torch.Tensor] = {}

    @torch.no_grad()
    def step(self) -> None:
        for i, param in enumerate(self.params):
            if param.grad is None:
                continue
            step = param.grad.add(param, alpha=1e-4)
            if i in self.velocity:
                step = self.velocity[i].mul_(0.9).add_(step)
            else:
                self.velocity[i] = step.clone()
            param.add_(step, alpha=-self.lr)


def _train_student(
    student: nn.Module,
    teacher: nn.Module,
    samples: torch.Tensor,
    columns: torch.Tensor,
    settings: SynthesisSettings,
    optimizer: _StudentSGD,
) -> int:
    """``settings.student_steps`` steps of distilling ``teacher`` into ``student`` on batches drawn from
    ``samples``; the steps taken."""
    student.train().requires_grad_(True)
    with torch.no_grad():
        teacher_logits = torch.cat([teacher(part)[:, columns] for part in samples.split(settings.batch_size)])
    for _ in range(settings.student_steps):
        chosen = torch.randint(len(samples), (min(settings.batch_size, len(samples)),))
        for param in student.parameters():
            param.grad = None
        loss = kl_divergence(student(samples[chosen])[:, columns], teacher_logits[chosen], settings.student_temperature)
        loss.backward()
        optimizer.step()
    student.eval().requires_grad_(False)
    return settings.student_steps
