"""Server side: building the Flower strategy a scenario names.

Flower's own strategies are chosen by short name through the config group
``scenarios/strategy/`` (one YAML file each); any ``flwr.serverapp.strategy.Strategy``
subclass, a user's own included, by ``strategy._target_=pkg.Class``. FedStream's own
server-side continual methods, ``fot`` and ``ccvr``, are FedAvg subclasses that also
implement the task-end protocol (``simulator.protocol.TaskEndStrategy``) and ask
clients for statistics through ``strategies.queries``; so are ``fsa`` and ``fetril``,
which freeze the encoder after the first task and rebuild the linear head from
class statistics (``strategies.class_statistics``).
"""

from strategies.factory import build_strategy, check_sampling, strategy_layers

__all__ = ["build_strategy", "check_sampling", "strategy_layers"]
