"""The run's configuration: typed sections, and the checks that run before any work.

Hydra composes ``scenarios/config.yaml`` with one scenario file and one strategy
file; :func:`load_config` turns the result into frozen dataclasses, rejecting
unknown keys, wrong types and impossible values with the key, the value, the
reason and the scenario file they came from, before any data is read or Ray
starts.
"""

from __future__ import annotations

import dataclasses
import difflib
import logging
import math
import typing
from collections.abc import Iterable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from hydra.core.config_store import ConfigStore
from omegaconf import DictConfig, OmegaConf
from omegaconf.errors import OmegaConfBaseException

SCENARIO_DIR = Path(__file__).resolve().parent.parent / "scenarios"
log = logging.getLogger("fedstream")


class ConfigError(ValueError):
    """A config value that cannot work; the message names file, key and reason."""


@dataclass(frozen=True)
class PartitionConfig:
    """How the training set is split across clients (see ``simulator.data.partition``)."""

    kind: str = "iid"  # iid | dirichlet | classes | shards | natural
    alpha: float = 0.5  # dirichlet: concentration of each class's split over clients
    min_size: int = 10  # dirichlet: redraw until every client holds this many samples
    classes_per_client: int = 2  # classes: how many labels each client holds
    shards_per_client: int = 2  # shards: label-sorted shards per client (McMahan et al.)


@dataclass(frozen=True)
class SyntheticConfig:
    """FedProx's Synthetic(alpha, beta) (Li et al. 2020), one group per client."""

    alpha: float = 1.0  # how much the clients' models differ
    beta: float = 1.0  # how much the clients' inputs differ
    dim: int = 60
    num_classes: int = 10
    mean_samples: int = 100  # mean samples per client (lognormal sizes)


FILE_DATASETS = ("mnist", "cifar10", "cifar100", "npz")  # read from data.path; data.scale applies to these only
DATASET_NAMES = ("digits", "mnist5k", "synthetic", *FILE_DATASETS)  # simulator.data.DATASETS loads each


@dataclass(frozen=True)
class DataConfig:
    """Which dataset, where its files are, and how it is split."""

    dataset: str = "digits"
    path: str | None = None  # file or folder for datasets read from disk
    # Datasets read from disk (npz, mnist, cifar10, cifar100): inputs are divided by this number;
    # null: by 255 where the file stores uint8 (pixels 0..255), else used as stored.
    scale: float | None = None
    test_fraction: float = 0.2  # held-out share for datasets without a test split
    partition: PartitionConfig = field(default_factory=PartitionConfig)
    synthetic: SyntheticConfig = field(default_factory=SyntheticConfig)


@dataclass(frozen=True)
class StreamConfig:
    """How the data changes over rounds (see ``simulator/streams/``).

    ``kind``: ``static`` (one task), ``class_incremental``, ``permuted`` and
    ``rotated`` (domain-incremental), ``label_shift``. Task streams last
    ``num_tasks * rounds_per_task`` rounds unless ``rounds`` is set.
    """

    kind: str = "static"
    rounds_per_task: int = 10
    num_tasks: int = 5  # permuted / rotated (class-incremental: from the classes)
    # class_incremental
    tasks: list[list[int]] | None = None  # explicit classes of each task
    classes_per_task: int = 2  # when tasks is null: consecutive groups of the class order
    shuffle_classes: bool = False  # a seeded class order instead of 0, 1, 2, ...
    task_incremental: bool = False  # mask logits to the task's classes (train and test)
    own_schedule: bool = False  # each client its own task order and pace
    min_rounds_per_task: int = 5  # own_schedule: each client's pace, drawn per task
    max_rounds_per_task: int = 15
    initial_clients: float = 1.0  # share of clients present at task 0; the rest join at boundaries
    keep_old: float = 0.0  # at each boundary, the share of still-moving clients that stay behind for good
    # rotated
    max_angle: float = 90.0  # task t rotates by t * max_angle / (num_tasks - 1) degrees
    # label_shift
    mode: str = "abrupt"  # abrupt | gradual | swap
    period: int = 10  # rounds between new (or swapped) label priors
    alpha: float = 0.5  # Dirichlet concentration of each client's label prior


@dataclass(frozen=True)
class FederationConfig:
    """The client population and the cohort the strategy samples each round."""

    num_clients: int = 20
    clients_per_round: int = 10


@dataclass(frozen=True)
class ModelConfig:
    """The representation model: an encoder to ``feature_dim`` features and a head; the head's own
    settings come from ``model.<its section>`` (``model.normalized.temperature=0.1``)."""

    name: str = "mlp"  # mlp | cnn | pkg.module.function (a user's model, see clients/models.py)
    hidden: int = 128
    feature_dim: int = 64
    head: str = "linear"  # linear | normalized | etf (clients/heads/)
    # The head's Settings dataclass, built by load_config from model.<section>, not a key itself.
    head_settings: Any = field(default=None, metadata={"derived": True})


@dataclass(frozen=True)
class ClientConfig:
    """Local training on each client; the method's own settings come from ``client.<its section>``."""

    method: str = "sgd"  # sgd | fedprox | replay | ewc | lwf | fedper | fedrep | pkg.module.Class
    lr: float = 0.05  # a strategy may send its own per round (ConfigRecord key "lr")
    momentum: float = 0.0
    weight_decay: float = 0.0
    epochs: int = 1
    batch_size: int = 32
    # The method's Settings dataclass, built by load_config from client.<section>, not a key itself.
    settings: Any = field(default=None, metadata={"derived": True})


@dataclass(frozen=True)
class EvalConfig:
    """When and how the global model is evaluated."""

    every: int = 1  # evaluate every N rounds (and always after the last)
    batch_size: int = 1024
    federated: bool = False  # also run the strategy's configure/aggregate_evaluate
    client_test_size: int = 100  # a client's local test sample, drawn like its data
    max_clients: int = 100  # clients scored for the accuracy spread (a seeded sample)
    probes: bool = True  # score the global encoder's features (linear probe, NCM) at every task end
    probe_every: int | None = None  # and every N rounds
    probe_samples: int = 10000  # the most training samples the probes fit on (a seeded sample)


@dataclass(frozen=True)
class EngineConfig:
    """Where clients run."""

    backend: str = "ray"  # ray | local
    num_actors: int = 2
    num_cpus_per_actor: float = 1.0
    num_gpus_per_actor: float = 0.0  # fractional values share a GPU between actors
    ray_address: str | None = None  # join this cluster instead of starting one
    torch_threads: int = 1  # intra-op threads per actor (and the local backend)
    checkpoint_every: int = 1  # rounds between checkpoints; 0 turns them off
    client_state_memory_mb: float = 1024.0  # client states past this spill to files in the run directory
    client_timeout_s: float | None = 1800.0  # a client training longer fails the run; null: no limit
    on_nonfinite: str = "fail"  # a client's NaN/inf loss or weights: fail the run | drop its reply
    max_actor_restarts: int = 2  # a dead actor is restarted and its share of the round rerun, this often


@dataclass(frozen=True)
class RunConfig:
    """Everything a run is a function of, except the strategy object."""

    scenario: str
    seed: int
    rounds: int | None  # None: the stream's own length (task streams)
    data: DataConfig
    stream: StreamConfig
    federation: FederationConfig
    model: ModelConfig
    client: ClientConfig
    eval: EvalConfig
    engine: EngineConfig
    strategy: dict[str, Any]  # Hydra node with ``_target_``; instantiated by the engine


_SECTIONS: dict[str, type] = {
    "data": DataConfig,
    "stream": StreamConfig,
    "federation": FederationConfig,
    "model": ModelConfig,
    "client": ClientConfig,
    "eval": EvalConfig,
    "engine": EngineConfig,
}


_TOP_LEVEL = ("seed", "rounds", "resume", "strategy", "scenario_name", "hydra")  # besides the sections


def valid_keys(section: str) -> list[str]:
    """The keys a section takes (``""``: the top level, ``"data.partition"``: a nested one); [] if unknown."""
    if not section:
        return [*_SECTIONS, *_TOP_LEVEL]
    first, *rest = section.split(".")
    schema: Any = _SECTIONS.get(first)
    for part in rest:
        hint = typing.get_type_hints(schema).get(part) if schema else None
        schema = hint if dataclasses.is_dataclass(hint) else None
    if schema is None:
        return []
    return [f.name for f in dataclasses.fields(schema) if not f.metadata.get("derived")]


def load_config(cfg: DictConfig) -> RunConfig:
    """Type-check and value-check a composed config; raise ConfigError on the first problem."""
    try:
        return _load_config(cfg)
    except OmegaConfBaseException as error:  # e.g. an interpolation ${...} that names no key
        key = error.full_key or next((k for k in cfg if _fails_to_resolve(cfg, k)), "?")
        reason = (error.msg or str(error)).splitlines()[0]
        raise ConfigError(f"{key}: {reason}") from None


def _scenario_file(scenario: str) -> str:
    """Where the scenario file came from: the repo's scenarios/, or a folder in hydra.searchpath."""
    from hydra.core.hydra_config import HydraConfig

    if HydraConfig.initialized() and not (SCENARIO_DIR / "scenario" / f"{scenario}.yaml").is_file():
        for source in HydraConfig.get().runtime.config_sources:
            file = Path(str(source.path)) / "scenario" / f"{scenario}.yaml"
            if source.schema == "file" and file.is_file():
                return str(file)
    return f"scenarios/scenario/{scenario}.yaml"


def _fails_to_resolve(cfg: DictConfig, key: Any) -> bool:
    try:
        cfg.get(key)
    except OmegaConfBaseException:
        return True
    return False


def _load_config(cfg: DictConfig) -> RunConfig:
    scenario = str(cfg.get("scenario_name", "?"))
    where = f"{_scenario_file(scenario)} (or the command line)"
    known = [*_SECTIONS, *_TOP_LEVEL]
    for key in cfg:
        if key not in known:
            raise ConfigError(f"{where}: {key}: unknown key; valid keys: {', '.join(known)}")
    sections = {}
    for key, schema in _SECTIONS.items():
        node = cfg.get(key)
        given = OmegaConf.to_container(node, resolve=True) if isinstance(node, DictConfig) else node
        given = {} if given is None else given
        with_plugin = _WITH_PLUGIN_SETTINGS.get(key)  # client methods' and heads' own sections
        sections[key] = with_plugin(given, where) if with_plugin else build_section(schema, given, key, where)
    _typed(bool, cfg.get("resume", False), "resume", where)  # run.py reads it; "maybe" is no yes
    strategy = cfg.get("strategy")
    if not isinstance(strategy, DictConfig) or "_target_" not in strategy:
        raise ConfigError(f"{where}: 'strategy' must be a node with a '_target_' class path")
    run = RunConfig(
        scenario=scenario,
        seed=_typed(int, cfg.get("seed"), "seed", where),
        rounds=_typed(int | None, cfg.get("rounds"), "rounds", where),
        strategy=OmegaConf.to_container(strategy, resolve=False),  # type: ignore[arg-type]
        **sections,
    )
    for key, reason in _value_problems(run):
        value = _lookup(run, key)
        raise ConfigError(f"{where}: {key} = {value!r}: {reason}")
    # After the values: the strategy's arguments interpolate them (a share of num_clients).
    _check_finite_numbers(OmegaConf.to_container(strategy, resolve=True), "strategy", where)
    return run


def _client(given: Any, where: str) -> ClientConfig:
    """The client section: its own keys, plus the chosen method's settings from its sub-section."""
    from clients import method_settings  # clients build on this module

    client, sections = _with_sections(ClientConfig, given, "client", "client method", where)
    return dataclasses.replace(client, settings=method_settings(client.method, sections, where))


def _model(given: Any, where: str) -> ModelConfig:
    """The model section: its own keys, plus the chosen head's settings from its sub-section."""
    from clients.heads import head_settings  # clients build on this module

    model, sections = _with_sections(ModelConfig, given, "model", "head", where)
    return dataclasses.replace(model, head_settings=head_settings(model.head, sections, where))


def _with_sections(schema: type, given: Any, path: str, owner: str, where: str) -> tuple[Any, dict[str, Any]]:
    """``schema`` built from ``given``'s own keys, and the sub-sections of settings left over."""
    if not isinstance(given, dict):
        raise ConfigError(f"{where}: {path} = {given!r}: expected a section of keys")
    fields = [f.name for f in dataclasses.fields(schema) if not f.metadata.get("derived")]
    own = {k: v for k, v in given.items() if k in fields}
    sections = {k: v for k, v in given.items() if k not in fields}
    for key, value in sections.items():
        if not isinstance(value, dict):
            raise ConfigError(
                f"{where}: {path}.{key} = {value!r}: unknown key; valid keys: {', '.join(fields)}, "
                f"or a {owner}'s section of settings ({path}.<section>.<key>)"
            )
    return build_section(schema, own, path, where), sections


def section_name(plugin: type) -> str:
    """The config section that holds a plugin's settings: its ``section``, else its class name."""
    return getattr(plugin, "section", None) or plugin.__name__


def section_settings(
    chosen: type, shipped: Iterable[type], sections: dict[str, Any], path: str, owner: str, where: str
) -> Any:
    """The ``Settings`` of ``chosen``, an ``owner`` (a client method, a head), from the ``path.<section>`` sections.

    Every shipped plugin's section is checked (a typo in one fails a sweep
    before any of its jobs runs); a section that belongs to no known plugin
    is an error when its name is close to a known one (a typo), and otherwise
    reported and ignored, since a sweep over several users' plugins gives each
    job the others' sections too.
    """
    known = {section_name(p): p for p in (*shipped, chosen)}
    settings = {name: _plugin_settings(p, sections.get(name, {}), f"{path}.{name}", where) for name, p in known.items()}
    for name in sorted(sections.keys() - known.keys()):
        if close := difflib.get_close_matches(name, known, n=1, cutoff=0.75):
            raise ConfigError(f"{where}: {path}.{name}: no {owner} has this section; "
                              f"did you mean {path}.{close[0]}?")
        log.warning("%s: %s.%s belongs to no known %s (%s); ignored", where, path, name, owner, ", ".join(sorted(known)))
    return settings[section_name(chosen)]


def _plugin_settings(plugin: type, given: Any, path: str, where: str) -> Any:
    settings = build_section(plugin.Settings, given, path, where)
    problems = getattr(settings, "problems", lambda: [])()
    if problems:
        key, reason = problems[0]
        raise ConfigError(f"{where}: {path}.{key} = {getattr(settings, key)!r}: {reason}")
    return settings


_WITH_PLUGIN_SETTINGS = {"client": _client, "model": _model}


def build_section(schema: type, given: Any, path: str, where: str) -> Any:
    """``schema(**given)`` with every key and type checked, nested sections included."""
    if not isinstance(given, dict):
        raise ConfigError(f"{where}: {path} = {given!r}: expected a section of keys")
    hints = typing.get_type_hints(schema)
    valid = [f.name for f in dataclasses.fields(schema) if not f.metadata.get("derived")]
    values = {}
    for key, value in given.items():
        if key not in valid:
            raise ConfigError(f"{where}: {path}.{key}: unknown key; valid keys: {', '.join(valid) or '(none)'}")
        values[key] = _typed(hints[key], value, f"{path}.{key}", where)
    return schema(**values)


def _typed(hint: Any, value: Any, path: str, where: str) -> Any:
    if dataclasses.is_dataclass(hint):
        return build_section(hint, value, path, where)
    allowed = (hint,) if typing.get_origin(hint) is list else typing.get_args(hint) or (hint,)
    if value is None and type(None) in allowed:
        return None
    lists = [t for t in allowed if typing.get_origin(t) is list]
    if lists:
        if not isinstance(value, list):
            raise ConfigError(f"{where}: {path} = {value!r}: expected a list")
        (item,) = typing.get_args(lists[0])
        return [_typed(item, v, f"{path}[{i}]", where) for i, v in enumerate(value)]
    if float in allowed and isinstance(value, int) and not isinstance(value, bool):
        return float(value)
    if not any(t is not type(None) and isinstance(value, t) for t in allowed) or (
        isinstance(value, bool) and bool not in allowed
    ):
        names = " or ".join("null" if t is type(None) else t.__name__ for t in allowed)
        raise ConfigError(f"{where}: {path} = {value!r}: expected {names}")
    if isinstance(value, float) and not math.isfinite(value):
        raise ConfigError(f"{where}: {path} = {value!r}: expected a finite number")
    return value


def _check_finite_numbers(node: Any, path: str, where: str) -> None:
    """Reject NaN and infinities anywhere in ``node`` (the strategy's arguments, which have no schema)."""
    if isinstance(node, dict):
        for key, value in node.items():
            _check_finite_numbers(value, f"{path}.{key}", where)
    elif isinstance(node, list):
        for i, value in enumerate(node):
            _check_finite_numbers(value, f"{path}[{i}]", where)
    elif isinstance(node, float) and not math.isfinite(node):
        raise ConfigError(f"{where}: {path} = {node!r}: expected a finite number")


def _lookup(run: RunConfig, dotted: str) -> Any:
    node: Any = run
    for part in dotted.split("."):
        node = getattr(node, part)
    return node


def _value_problems(run: RunConfig) -> list[tuple[str, str]]:
    """Each (key, reason) whose value is impossible; dataset-dependent checks come later."""
    data, part, fed = run.data, run.data.partition, run.federation
    checks = [
        ("rounds", run.rounds is None or run.rounds >= 1, "must be at least 1"),
        ("seed", run.seed >= 0, "must be >= 0"),
        ("federation.num_clients", fed.num_clients >= 1, "must be at least 1"),
        ("federation.clients_per_round", fed.clients_per_round >= 1, "must be at least 1"),
        (
            "federation.clients_per_round",
            fed.clients_per_round <= fed.num_clients,
            f"more clients per round than clients (federation.num_clients = {fed.num_clients})",
        ),
        ("data.dataset", data.dataset in DATASET_NAMES, f"unknown dataset; valid: {sorted(DATASET_NAMES)}"),
        ("data.test_fraction", 0.0 < data.test_fraction < 1.0, "must be between 0 and 1"),
        ("data.scale", data.scale is None or data.scale > 0, "must be > 0 (null: 255 for uint8 files, else 1)"),
        ("data.scale", data.scale is None or data.dataset in FILE_DATASETS,
         f"applies only to datasets read from files ({', '.join(FILE_DATASETS)}), not data.dataset = "
         f"{data.dataset!r}; the built-in ones scale their own inputs"),
        ("data.partition.alpha", part.alpha > 0, "Dirichlet concentration must be > 0"),
        ("data.partition.min_size", part.min_size >= 0, "must be >= 0"),
        ("data.partition.classes_per_client", part.classes_per_client >= 1, "must be >= 1"),
        ("data.partition.shards_per_client", part.shards_per_client >= 1, "must be >= 1"),
        ("data.synthetic.alpha", data.synthetic.alpha >= 0, "must be >= 0"),
        ("data.synthetic.beta", data.synthetic.beta >= 0, "must be >= 0"),
        ("data.synthetic.dim", data.synthetic.dim >= 1, "must be >= 1"),
        ("data.synthetic.num_classes", data.synthetic.num_classes >= 2, "must be >= 2"),
        ("data.synthetic.mean_samples", data.synthetic.mean_samples >= 2, "must be >= 2"),
        ("stream.rounds_per_task", run.stream.rounds_per_task >= 1, "must be at least 1"),
        ("stream.num_tasks", run.stream.num_tasks >= 1, "must be at least 1"),
        ("stream.classes_per_task", run.stream.classes_per_task >= 1, "must be at least 1"),
        ("stream.initial_clients", 0 < run.stream.initial_clients <= 1, "must be in (0, 1]"),
        ("stream.keep_old", 0 <= run.stream.keep_old < 1, "must be in [0, 1)"),
        ("stream.period", run.stream.period >= 1, "must be at least 1"),
        ("stream.alpha", run.stream.alpha > 0, "Dirichlet concentration must be > 0"),
        ("client.lr", run.client.lr > 0, "learning rate must be > 0"),
        ("client.momentum", 0 <= run.client.momentum < 1, "must be in [0, 1)"),
        ("client.weight_decay", run.client.weight_decay >= 0, "must be >= 0"),
        ("client.epochs", run.client.epochs >= 1, "must be at least 1"),
        ("client.batch_size", run.client.batch_size >= 1, "must be at least 1"),
        ("model.hidden", run.model.hidden >= 1, "must be at least 1"),
        ("model.feature_dim", run.model.feature_dim >= 1, "must be at least 1"),
        ("eval.every", run.eval.every >= 1, "must be at least 1"),
        ("eval.batch_size", run.eval.batch_size >= 1, "must be at least 1"),
        ("eval.client_test_size", run.eval.client_test_size >= 1, "must be at least 1"),
        ("eval.max_clients", run.eval.max_clients >= 1, "must be at least 1"),
        ("eval.probe_every", run.eval.probe_every is None or run.eval.probe_every >= 1, "must be at least 1 (null: task ends only)"),
        ("eval.probe_samples", run.eval.probe_samples >= 2, "must be at least 2"),
        ("engine.backend", run.engine.backend in ("ray", "local"), "expected 'ray' or 'local'"),
        ("engine.num_actors", run.engine.num_actors >= 1, "must be at least 1"),
        ("engine.num_cpus_per_actor", run.engine.num_cpus_per_actor > 0, "must be > 0"),
        ("engine.num_gpus_per_actor", run.engine.num_gpus_per_actor >= 0, "must be >= 0"),
        ("engine.torch_threads", run.engine.torch_threads >= 1, "must be at least 1"),
        ("engine.checkpoint_every", run.engine.checkpoint_every >= 0, "must be >= 0"),
        ("engine.client_state_memory_mb", run.engine.client_state_memory_mb >= 0, "must be >= 0"),
        ("engine.client_timeout_s", run.engine.client_timeout_s is None or run.engine.client_timeout_s > 0,
         "must be > 0 (null: no limit)"),
        ("engine.max_actor_restarts", run.engine.max_actor_restarts >= 0, "must be >= 0"),
        ("engine.on_nonfinite", run.engine.on_nonfinite in ("fail", "drop"), "expected 'fail' or 'drop'"),
    ]
    return [(key, reason) for key, ok, reason in checks if not ok]


def to_dict(run: RunConfig) -> dict[str, Any]:
    """A plain-dict view of the run config (for logs and checkpoints)."""
    return dataclasses.asdict(run)


def compose_config(overrides: list[str]) -> DictConfig:
    """The config ``run.py`` would compose for ``overrides``, without running it (tests, benchmarks)."""
    from hydra import compose, initialize_config_dir
    from hydra.core.hydra_config import HydraConfig

    with initialize_config_dir(config_dir=str(SCENARIO_DIR), version_base="1.3"):
        cfg = compose("config", overrides=overrides, return_hydra_config=True)
    HydraConfig.instance().set_config(cfg)  # for ${hydra:...} interpolations
    return cfg


def register_with_hydra() -> None:
    """Give Hydra every section's defaults and the ``fraction`` resolver.

    The defaults (``fedstream_defaults``, first in ``scenarios/config.yaml``'s
    defaults list) make every key exist before the scenario file merges in, so
    ``key=value`` overrides any of them, whether the scenario sets it or not.
    """
    defaults = {key: dataclasses.asdict(schema()) for key, schema in _SECTIONS.items()}
    del defaults["client"]["settings"]  # built from the method's own section, client.<section>
    del defaults["model"]["head_settings"]  # built from the head's own section, model.<section>
    node = OmegaConf.create(defaults)
    # Open: client.<section>.<key>=... sets a method's settings without a "+", a user's
    # method's too, and a misspelt key reaches load_config's error, which lists the valid ones.
    OmegaConf.set_struct(node.client, False)
    OmegaConf.set_struct(node.model, False)  # model.<head section>.<key>, likewise
    ConfigStore.instance().store(name="fedstream_defaults", node=node)
    # ``${fraction:a,b}`` in the strategy files: the share of clients sampled per round.
    OmegaConf.register_new_resolver("fraction", lambda part, whole: part / whole, replace=True)


register_with_hydra()
