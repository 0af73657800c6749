"""Client side: the representation models, their heads, the local training methods, the query handlers.

A client method is a small class with the :class:`~clients.base.ClientMethod`
interface; ``client.method`` names one in ``METHODS`` or gives the dotted path
of a user's own subclass, and its settings come from ``client.<section>``.
A new method is one new file plus one line here. A method also answers the
server's queries (``clients/queries.py``) and may keep personal layers.
"""

from __future__ import annotations

from clients.base import Batch, ClientMethod, LocalResult, TrainContext
from clients.ewc import EWCClient
from clients.fedper import FedPerClient
from clients.fedprox import FedProxClient
from clients.fedrep import FedRepClient
from clients.lwf import LwFClient
from clients.replay import ReplayClient
from clients.scaffold import ScaffoldClient
from clients.sgd import SGDClient
from clients.target import TargetClient
from simulator.registry import Registry

METHODS: Registry[type[ClientMethod]] = Registry(
    "client method",
    "client.method",
    {
        "sgd": SGDClient,
        "fedprox": FedProxClient,
        "replay": ReplayClient,
        "ewc": EWCClient,
        "lwf": LwFClient,
        "fedper": FedPerClient,
        "fedrep": FedRepClient,
        "target": TargetClient,
        "scaffold": ScaffoldClient,
    },
    "a clients.ClientMethod subclass",
    lambda plugin: isinstance(plugin, type) and issubclass(plugin, ClientMethod),
)

__all__ = ["METHODS", "Batch", "ClientMethod", "LocalResult", "TrainContext"]
