"""Seeded random generators derived from the run seed.

Every random draw in a run comes from a generator built here from the run seed
and a purpose (plus round and client id where they matter), never from global
state or from which actor ran a client. That is what makes a run a function of
its config and seed, whatever the number of actors or the backend.
"""

from __future__ import annotations

import contextlib
import random
from collections.abc import Iterator
from enum import IntEnum

import numpy as np
import torch


class Purpose(IntEnum):
    """What a generator is for; each purpose gets an independent stream."""

    DATA = 1  # test split, synthetic generation
    PARTITION = 2
    MODEL_INIT = 3
    STRATEGY = 4  # Flower's client sampling and DP noise
    CLIENT_TRAIN = 5  # local shuffling
    CLIENT_EVAL = 6  # a client's local test sample
    PROBE = 7  # the training samples representation probes fit on
    CLIENT_GLOBAL = 8  # torch's global generator during a client's job (a user's dropout)
    CLIENT_QUERY = 9  # a client's answer to a server's query (FOT's random sketches)
    AUGMENT = 10  # a client's training-batch augmentation (data.augment)
    CKA_SAMPLE = 11  # the fixed test sample CKA compares the encoder's features on at every task end


class Draw:
    """Independent draws under one purpose, keyed apart by these values (the keys runs have always
    used: renaming changes no number). A draw per task or period adds its index to its key."""

    PIXEL_PERMUTATION = 1000  # DATA: a permuted stream's task t permutes with key 1000 + t
    CLASS_ORDER = 2000  # DATA: stream.class_incremental.shuffle_classes
    JOIN_ORDER = 3000  # DATA: which clients join at which task boundary
    STAY_BEHIND = 4000  # DATA: which clients keep their old classes at a boundary
    OWN_SCHEDULE = 5000  # DATA: a client's own task order and pace
    LABEL_PRIOR = 6000  # DATA: label-shift priors per period
    PRIOR_SWAP = 7000  # DATA: label-shift swap of priors between clients
    PERIOD_TEST_SET = 8000  # DATA: label-shift test set of a period
    EVALUATE_CALL = 1  # STRATEGY: configure/aggregate_evaluate of a round (its training call has no key)
    TASK_END_CALL = 2  # STRATEGY: on_task_end of a round
    LABEL_SHIFT_SAMPLE = 1  # CLIENT_TRAIN: a label-shift client's training sample of a round
    QUERY_SAMPLE = 1  # CLIENT_QUERY: the samples a client answers a capped query on


def _sequence(seed: int, purpose: Purpose, keys: tuple[int, ...]) -> np.random.SeedSequence:
    # The key count is part of the entropy: numpy pads short entropy with zeros,
    # so without it (r,) and (r, 0) would give the same stream.
    return np.random.SeedSequence([seed, int(purpose), len(keys), *keys])


def derive_seed(seed: int, purpose: Purpose, *keys: int) -> int:
    """Return a 63-bit integer seed for ``purpose`` and ``keys`` under ``seed``."""
    return int(_sequence(seed, purpose, keys).generate_state(1, np.uint64)[0]) >> 1


def rng(seed: int, purpose: Purpose, *keys: int) -> np.random.Generator:
    """Return a numpy generator for ``purpose`` and ``keys`` under ``seed``."""
    return np.random.default_rng(_sequence(seed, purpose, keys))


def torch_generator(seed: int, purpose: Purpose, *keys: int) -> torch.Generator:
    """Return a CPU torch generator for ``purpose`` and ``keys`` under ``seed``."""
    return torch.Generator().manual_seed(derive_seed(seed, purpose, *keys))


def seed_torch_global(seed: int, device: torch.device) -> None:
    """Seed torch's global generator on the CPU, and on ``device`` where it is a GPU.

    Not ``torch.manual_seed``: it also queues a lazy seeding of every accelerator
    backend torch has not started (CUDA, XPU, MTIA), each recording a stack trace,
    about 0.7 ms per call, paid per client per round.
    """
    torch.random.default_generator.manual_seed(seed)
    if device.type == "cuda":
        torch.cuda.manual_seed(seed)


@contextlib.contextmanager
def seeded_global_state(seed: int) -> Iterator[None]:
    """Seed Python's and numpy's global generators, restoring them afterwards.

    Flower's strategies draw client samples with ``random.sample`` and DP noise
    with ``np.random``. We run them unchanged, so the engine wraps each strategy
    call in this, with a seed derived from the run seed and the round.
    """
    python_state, numpy_state = random.getstate(), np.random.get_state()
    random.seed(seed)
    np.random.seed(seed % (1 << 32))
    try:
        yield
    finally:
        random.setstate(python_state)
        np.random.set_state(numpy_state)
