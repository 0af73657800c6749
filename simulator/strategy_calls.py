"""The engine's calls of a strategy, checked: what one raises names the strategy, its method and the round;
what one returns as the global model must be the model's arrays, in its order, all finite."""

from __future__ import annotations

import contextlib
from collections.abc import Iterator

from flwr.app import ArrayRecord

from simulator.backends import ClientFailure
from simulator.config import ConfigError
from simulator.worker import all_finite


class StrategyFailure(ClientFailure):
    """A strategy's own method raised: the run failed (exit 1), and the message names where."""


@contextlib.contextmanager
def strategy_call(call: str) -> Iterator[None]:
    """Run a strategy's method, ``call`` naming it and the round (``round 3: FOT.on_task_end``): an error it
    raises ends the run as a StrategyFailure that says so; a client's failure or bad input passes as it is."""
    try:
        yield
    except (ClientFailure, ConfigError):
        raise
    except Exception as error:
        raise StrategyFailure(f"{call} raised {type(error).__name__}: {error}") from error


def as_global_arrays(returned: ArrayRecord, expected: ArrayRecord, call: str) -> ArrayRecord:
    """A strategy's new global arrays in the model's order; stop where they are not the model's or not numbers.

    Clients load the global arrays in order, so a record with the model's keys in
    another order is put in order. One with other keys or shapes would otherwise
    fail a round later, inside every client's ``load_state_dict``, with no word of
    the strategy that made it.
    """
    if not isinstance(returned, ArrayRecord):
        raise ClientFailure(f"{call} returned a {type(returned).__name__}; expected an ArrayRecord (or None)")
    shapes = {name: tuple(array.shape) for name, array in returned.items()}
    wanted = {name: tuple(array.shape) for name, array in expected.items()}
    if shapes != wanted:
        missing, extra = sorted(wanted.keys() - shapes.keys()), sorted(shapes.keys() - wanted.keys())
        reshaped = [
            f"{k} has shape {shapes[k]}, expected {wanted[k]}"
            for k in wanted.keys() & shapes.keys()
            if wanted[k] != shapes[k]
        ]
        found = [f"missing {missing}"] * bool(missing) + [f"not the model's {extra}"] * bool(extra) + sorted(reshaped)
        raise ClientFailure(
            f"{call} returned an ArrayRecord that is not the model's global weights ({'; '.join(found)}); "
            f"return one with the keys and shapes of the ArrayRecord it was given: {', '.join(wanted)}"
        )
    if not all_finite(returned.to_numpy_ndarrays()):
        raise ClientFailure(f"{call} returned non-finite global weights (training diverged)")
    if list(returned) != list(expected):
        return ArrayRecord({name: returned[name] for name in expected})
    return returned
