"""A user's client method with settings of its own, that records its task lifecycle in its state."""

from dataclasses import dataclass

import numpy as np

from clients.sgd import SGDClient


@dataclass(frozen=True)
class RecorderSettings:
    label: str = "run"
    repeat: int = 1  # how many times each round is recorded

    def problems(self):
        return [("repeat", "must be at least 1")] if self.repeat < 1 else []


class RecordsTasks(SGDClient):
    """Plain SGD; its state lists the rounds and tasks it trained and each begin_task it got."""

    Settings = RecorderSettings
    section = "recorder"

    def begin_task(self, model, context):
        state, previous = dict(context.state), context.previous
        left = -1 if previous is None else previous.task
        state["changes"] = np.append(state.get("changes", np.zeros(0, np.int64)), [context.server_round, left])
        if previous is not None:
            state[f"left_at_{context.server_round}"] = previous.indices
        return state

    def end(self, model, context):
        return {"recorded_rounds": float(len(context.state.get("rounds", ())) + self.settings.repeat)}

    def new_state(self, model, context):
        state = dict(context.state)
        for key, value in (("rounds", context.server_round), ("tasks", context.task)):
            state[key] = np.append(state.get(key, np.zeros(0, np.int64)), [value] * self.settings.repeat)
        state["label"] = self.settings.label
        return state
