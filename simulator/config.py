"""The run's configuration: typed sections, and the checks that run before any work.

Hydra composes ``scenarios/config.yaml`` with one scenario file and one strategy
file; :func:`parse_config` turns the result into frozen dataclasses, rejecting
unknown keys, wrong types and impossible values with the key, the value, the
reason and the scenario file they came from, before any data is read or Ray
starts.
"""

from __future__ import annotations

import dataclasses
import difflib
import math
import typing
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from hydra.core.config_store import ConfigStore
from omegaconf import DictConfig, OmegaConf
from omegaconf.errors import OmegaConfBaseException

SCENARIO_DIR = Path(__file__).resolve().parent.parent / "scenarios"


class ConfigError(ValueError):
    """A config value that cannot work; the message names file, key and reason."""


# The engine's bounds: values past them overflow where they reach Ray, torch or the OS timer
# (Ray keeps a call's retries in 32 bits and resources in units of 0.0001, a timer takes seconds
# below 2**63 ns), or ask for more actors, CPUs or threads than any one run uses.
MAX_ACTORS = 100_000  # engine.num_actors: a large cluster's CPUs
MAX_CPUS_PER_ACTOR = 1024  # engine.num_cpus_per_actor, and engine.torch_threads
RAY_RESOURCE_UNIT = 0.0001  # Ray's smallest share of a CPU or GPU
MAX_CLIENT_TIMEOUT_S = 1_000_000  # engine.client_timeout_s: 11.6 days; null is no limit
MAX_ACTOR_RESTARTS = 1_000_000  # engine.max_actor_restarts: Ray's count is an int32
NO_AUGMENTATION = "none"  # data.augment's default: train on the samples as they are
MAX_WIDTH = 65536  # model.hidden and model.feature_dim: a layer's width


# A field filled from the rest of the config, not a key a user sets.
DERIVED = {"derived": True}
# A section's sub-sections of plugin settings, as given: checked against the chosen plugin's
# Settings by simulator.plugins, which sits above the plugins this module knows nothing of.
PLUGIN_SECTIONS = {"derived": True, "plugin_sections": True}


@dataclass(frozen=True)
class PartitionConfig:
    """How the training set is split across clients (see ``simulator.data.partition``)."""

    kind: str = "iid"  # iid | dirichlet | classes | shards | natural
    alpha: float = 0.5  # dirichlet: concentration of each class's split over clients
    min_size: int = 10  # dirichlet: redraw until every client holds this many samples
    classes_per_client: int = 2  # classes: how many labels each client holds
    shards_per_client: int = 2  # shards: label-sorted shards per client (McMahan et al.)


@dataclass(frozen=True)
class DataConfig:
    """Which dataset, where its files are, how it is split and augmented; a dataset's own settings
    (``data.synthetic.alpha``) come from ``data.<its section>``."""

    dataset: str = "digits"
    path: str | None = None  # file or folder for datasets read from disk
    # Datasets read from disk (npz, mnist, cifar10, cifar100): inputs are divided by this number;
    # null: by 255 where the file stores uint8 (pixels 0..255), else used as stored.
    scale: float | None = None
    test_fraction: float = 0.2  # held-out share for datasets without a test split
    augment: str = NO_AUGMENTATION  # training batches: none | crop_flip | pkg.module.fn (clients/augment.py)
    normalize: bool | None = None  # standardise inputs per channel by the training set; null: with augment only
    partition: PartitionConfig = field(default_factory=PartitionConfig)
    sections: dict[str, Any] = field(default_factory=dict, metadata=PLUGIN_SECTIONS)  # data.<section>, as given
    settings: Any = field(default=None, metadata=DERIVED)  # the dataset's Settings, from its data.<section>


@dataclass(frozen=True)
class StreamConfig:
    """How the data changes over rounds (``simulator/streams/``); a kind's own settings come from
    ``stream.<its section>`` (``stream.class_incremental.classes_per_task=2``).

    Task streams last ``num_tasks * rounds_per_task`` rounds unless ``rounds`` is set.
    """

    kind: str = "static"  # static | class_incremental | permuted | rotated | label_shift | pkg.module.Class
    rounds_per_task: int = 10
    sections: dict[str, Any] = field(default_factory=dict, metadata=PLUGIN_SECTIONS)  # stream.<section>, as given
    settings: Any = field(default=None, metadata=DERIVED)  # the kind's Settings, from its stream.<section>


@dataclass(frozen=True)
class FederationConfig:
    """The client population and the cohort the strategy samples each round."""

    num_clients: int = 20
    clients_per_round: int = 10


@dataclass(frozen=True)
class ModelConfig:
    """The representation model: an encoder to ``feature_dim`` features and a head; the head's own
    settings come from ``model.<its section>`` (``model.normalized.temperature=0.1``)."""

    name: str = "mlp"  # mlp | cnn | resnet18 | resnet32 | pkg.module.function (a user's model, clients/models.py)
    hidden: int = 128  # the MLP's hidden width
    feature_dim: int | None = None  # the encoder's output width; null: its own (mlp, cnn, resnet32: 64; resnet18: 512)
    head: str = "linear"  # linear | normalized | etf | pkg.module.Class (clients/heads/)
    sections: dict[str, Any] = field(default_factory=dict, metadata=PLUGIN_SECTIONS)  # model.<section>, as given
    head_settings: Any = field(default=None, metadata=DERIVED)  # the head's Settings, from its model.<section>


@dataclass(frozen=True)
class ClientConfig:
    """Local training on each client; the method's own settings come from ``client.<its section>``."""

    method: str = "sgd"  # sgd | fedprox | replay | ewc | lwf | fedper | fedrep | pkg.module.Class
    lr: float = 0.05  # a strategy may send its own per round (ConfigRecord key "lr")
    momentum: float = 0.0
    weight_decay: float = 0.0
    epochs: int = 1
    batch_size: int = 32
    sections: dict[str, Any] = field(default_factory=dict, metadata=PLUGIN_SECTIONS)  # client.<section>, as given
    settings: Any = field(default=None, metadata=DERIVED)  # the method's Settings, from its client.<section>


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
    diagnostics: bool = True  # neural collapse (NC1, NC2) and CKA of the global encoder at every task end
    cka_samples: int = 1000  # the most test samples CKA compares task ends on (one seeded sample for the run)
    hooks: list[str] = field(default_factory=list)  # a user's hooks by dotted path (simulator/hooks.py)


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
    amp: str = "off"  # off | bf16: local training's forward pass and loss under bfloat16 autocast
    channels_last: bool = False  # image models and batches in channels-last memory (faster convolutions on GPUs)


@dataclass(frozen=True)
class ExperimentConfig:
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


_TOP_LEVEL = ("seed", "rounds", "resume", "overwrite", "strategy", "scenario_name", "hydra")  # besides the sections


def _keys(schema: type) -> list[str]:
    """The keys a user may set in a section of ``schema``: its fields less the derived ones."""
    return [f.name for f in dataclasses.fields(schema) if not f.metadata.get("derived")]


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
    return _keys(schema)


def parse_config(cfg: DictConfig) -> ExperimentConfig:
    """Type-check and value-check a composed config; raise ConfigError on the first problem.

    Plugin settings (``client.<section>``, ``stream.<section>``, ...) are kept as
    given, in each section's ``sections``: ``simulator.plugins.load_config``
    checks them against the chosen plugins' own ``Settings``.
    """
    try:
        return _parse_config(cfg)
    except OmegaConfBaseException as error:  # e.g. an interpolation ${...} that names no key
        key = error.full_key or next((k for k in cfg if _fails_to_resolve(cfg, k)), "?")
        reason = (error.msg or str(error)).splitlines()[0]
        raise ConfigError(f"{key}: {reason}") from None


def scenario_source(cfg: DictConfig) -> str:
    """Where the composed config's values came from, for messages: the scenario file, or the command line."""
    return f"{_scenario_file(str(cfg.get('scenario_name', '?')))} (or the command line)"


def _scenario_file(scenario: str) -> str:
    """Where the scenario file came from: the repo's scenarios/, or a folder in hydra.searchpath."""
    from hydra.core.hydra_config import HydraConfig

    if HydraConfig.initialized() and not (SCENARIO_DIR / "scenario" / f"{scenario}.yaml").is_file():
        for source in HydraConfig.get().runtime.config_sources:
            file = Path(str(source.path)) / "scenario" / f"{scenario}.yaml"
            if source.schema == "file" and file.is_file():
                return str(file)
    return f"scenarios/scenario/{scenario}.yaml"


def run_flags(cfg: DictConfig) -> tuple[bool, bool]:
    """``resume`` and ``overwrite``, type-checked: run.py needs them before the rest is parsed."""
    where = scenario_source(cfg)
    flags = [_typed(bool, cfg.get(key, False), key, where) for key in ("resume", "overwrite")]
    return flags[0], flags[1]


def _fails_to_resolve(cfg: DictConfig, key: Any) -> bool:
    try:
        cfg.get(key)
    except OmegaConfBaseException:
        return True
    return False


def _parse_config(cfg: DictConfig) -> ExperimentConfig:
    where = scenario_source(cfg)
    known = [*_SECTIONS, *_TOP_LEVEL]
    for key in cfg:
        if key not in known:
            raise ConfigError(f"{where}: {key}: unknown key; valid keys: {', '.join(known)}")
    sections = {}
    for key, schema in _SECTIONS.items():
        node = cfg.get(key)
        given = OmegaConf.to_container(node, resolve=True) if isinstance(node, DictConfig) else node
        sections[key] = build_section(schema, {} if given is None else given, key, where)
    run_flags(cfg)  # run.py reads them; "maybe" is no yes
    strategy = cfg.get("strategy")
    if not isinstance(strategy, DictConfig) or "_target_" not in strategy:
        raise ConfigError(f"{where}: 'strategy' must be a node with a '_target_' class path")
    config = ExperimentConfig(
        scenario=str(cfg.get("scenario_name", "?")),
        seed=_typed(int, cfg.get("seed"), "seed", where),
        rounds=_typed(int | None, cfg.get("rounds"), "rounds", where),
        strategy=OmegaConf.to_container(strategy, resolve=False),  # type: ignore[arg-type]
        **sections,
    )
    for key, reason in _value_problems(config):
        value = _lookup(config, key)
        raise ConfigError(f"{where}: {key} = {value!r}: {reason}")
    # After the values: the strategy's arguments interpolate them (a share of num_clients).
    _check_finite_numbers(OmegaConf.to_container(strategy, resolve=True), "strategy", where)
    return config


def build_section(schema: type, given: Any, path: str, where: str) -> Any:
    """``schema(**given)`` with every key and type checked, nested sections included.

    A schema with a ``sections`` field of plugin settings (``PLUGIN_SECTIONS``)
    takes the keys that are sub-sections into it, unchecked: they belong to
    the chosen plugin, which this module does not know.
    """
    if not isinstance(given, dict):
        raise ConfigError(f"{where}: {path} = {given!r}: expected a section of keys")
    hints = typing.get_type_hints(schema)
    valid = _keys(schema)
    takes_sections = any(f.metadata.get("plugin_sections") for f in dataclasses.fields(schema))
    values: dict[str, Any] = {}
    plugin_sections: dict[str, Any] = {}
    for key, value in given.items():
        if key in valid:
            values[key] = _typed(hints[key], value, f"{path}.{key}", where)
        elif takes_sections and isinstance(value, dict):
            if close := difflib.get_close_matches(key, valid, n=1, cutoff=0.75):
                raise ConfigError(f"{where}: {path}.{key}: unknown key; did you mean {path}.{close[0]}?")
            plugin_sections[key] = value
        elif takes_sections:
            raise ConfigError(
                f"{where}: {path}.{key} = {value!r}: unknown key; valid keys: {', '.join(valid)}, "
                f"or a plugin's section of settings ({path}.<section>.<key>)"
            )
        else:
            raise ConfigError(f"{where}: {path}.{key}: unknown key; valid keys: {', '.join(valid) or '(none)'}")
    if takes_sections:
        values["sections"] = plugin_sections
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


def _lookup(config: ExperimentConfig, dotted: str) -> Any:
    node: Any = config
    for part in dotted.split("."):
        node = getattr(node, part)
    return node


def _value_problems(config: ExperimentConfig) -> list[tuple[str, str]]:
    """Each (key, reason) whose value is impossible; dataset-dependent checks come later."""
    data, part, fed, engine = config.data, config.data.partition, config.federation, config.engine
    checks = [
        ("rounds", config.rounds is None or config.rounds >= 1, "must be at least 1"),
        ("seed", config.seed >= 0, "must be >= 0"),
        ("federation.num_clients", fed.num_clients >= 1, "must be at least 1"),
        ("federation.clients_per_round", fed.clients_per_round >= 1, "must be at least 1"),
        (
            "federation.clients_per_round",
            fed.clients_per_round <= fed.num_clients,
            f"more clients per round than clients (federation.num_clients = {fed.num_clients})",
        ),
        ("data.test_fraction", 0.0 < data.test_fraction < 1.0, "must be between 0 and 1"),
        ("data.scale", data.scale is None or data.scale > 0, "must be > 0 (null: 255 for uint8 files, else 1)"),
        ("data.partition.alpha", part.alpha > 0, "Dirichlet concentration must be > 0"),
        ("data.partition.min_size", part.min_size >= 0, "must be >= 0"),
        ("data.partition.classes_per_client", part.classes_per_client >= 1, "must be >= 1"),
        ("data.partition.shards_per_client", part.shards_per_client >= 1, "must be >= 1"),
        ("stream.rounds_per_task", config.stream.rounds_per_task >= 1, "must be at least 1"),
        ("client.lr", config.client.lr > 0, "learning rate must be > 0"),
        ("client.momentum", 0 <= config.client.momentum < 1, "must be in [0, 1)"),
        ("client.weight_decay", config.client.weight_decay >= 0, "must be >= 0"),
        ("client.epochs", config.client.epochs >= 1, "must be at least 1"),
        ("client.batch_size", config.client.batch_size >= 1, "must be at least 1"),
        ("model.hidden", 1 <= config.model.hidden <= MAX_WIDTH, f"must be between 1 and {MAX_WIDTH}"),
        (
            "model.feature_dim",
            config.model.feature_dim is None or 1 <= config.model.feature_dim <= MAX_WIDTH,
            f"must be between 1 and {MAX_WIDTH} (null: the encoder's own width)",
        ),
        ("eval.every", config.eval.every >= 1, "must be at least 1"),
        ("eval.batch_size", config.eval.batch_size >= 1, "must be at least 1"),
        ("eval.client_test_size", config.eval.client_test_size >= 1, "must be at least 1"),
        ("eval.max_clients", config.eval.max_clients >= 1, "must be at least 1"),
        (
            "eval.probe_every",
            config.eval.probe_every is None or config.eval.probe_every >= 1,
            "must be at least 1 (null: task ends only)",
        ),
        ("eval.probe_samples", config.eval.probe_samples >= 2, "must be at least 2"),
        ("eval.cka_samples", config.eval.cka_samples >= 2, "must be at least 2"),
        ("engine.backend", engine.backend in ("ray", "local"), "expected 'ray' or 'local'"),
        ("engine.num_actors", 1 <= engine.num_actors <= MAX_ACTORS, f"must be between 1 and {MAX_ACTORS}"),
        (
            "engine.num_cpus_per_actor",
            RAY_RESOURCE_UNIT <= engine.num_cpus_per_actor <= MAX_CPUS_PER_ACTOR,
            f"must be between {RAY_RESOURCE_UNIT} (Ray's smallest share of a CPU) and {MAX_CPUS_PER_ACTOR}",
        ),
        ("engine.num_gpus_per_actor", engine.num_gpus_per_actor >= 0, "must be >= 0"),
        (
            "engine.num_gpus_per_actor",
            engine.num_gpus_per_actor == 0 or engine.num_gpus_per_actor >= RAY_RESOURCE_UNIT,
            f"must be 0 or at least {RAY_RESOURCE_UNIT} (Ray's smallest share of a GPU)",
        ),
        (
            "engine.torch_threads",
            1 <= engine.torch_threads <= MAX_CPUS_PER_ACTOR,
            f"must be between 1 and {MAX_CPUS_PER_ACTOR}",
        ),
        ("engine.checkpoint_every", engine.checkpoint_every >= 0, "must be >= 0"),
        ("engine.client_state_memory_mb", engine.client_state_memory_mb >= 0, "must be >= 0"),
        (
            "engine.client_timeout_s",
            engine.client_timeout_s is None or 0 < engine.client_timeout_s <= MAX_CLIENT_TIMEOUT_S,
            f"must be > 0 and at most {MAX_CLIENT_TIMEOUT_S} s (11.6 days); null: no limit",
        ),
        (
            "engine.max_actor_restarts",
            0 <= engine.max_actor_restarts <= MAX_ACTOR_RESTARTS,
            f"must be between 0 and {MAX_ACTOR_RESTARTS}",
        ),
        ("engine.on_nonfinite", engine.on_nonfinite in ("fail", "drop"), "expected 'fail' or 'drop'"),
        ("engine.amp", engine.amp in ("off", "bf16"), "expected 'off' or 'bf16'"),
    ]
    return [(key, reason) for key, ok, reason in checks if not ok]


def to_dict(config: ExperimentConfig) -> dict[str, Any]:
    """A plain-dict view of the experiment's config (for logs and checkpoints): each section's keys and its
    plugin's settings, without the plugin sections as given (which the settings hold, checked)."""
    plain = dataclasses.asdict(config)
    for key, schema in _SECTIONS.items():
        for f in dataclasses.fields(schema):
            if f.metadata.get("plugin_sections"):
                del plain[key][f.name]
    return plain


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
    defaults = {
        key: {k: v for k, v in dataclasses.asdict(schema()).items() if k in _keys(schema)}
        for key, schema in _SECTIONS.items()
    }
    node = OmegaConf.create(defaults)
    # Open where plugins keep their settings: client.<section>.<key>=... sets a method's settings
    # without a "+", a user's method's too, and a misspelt key reaches the error that lists the valid ones.
    for key, schema in _SECTIONS.items():
        if any(f.metadata.get("plugin_sections") for f in dataclasses.fields(schema)):
            OmegaConf.set_struct(node[key], False)
    ConfigStore.instance().store(name="fedstream_defaults", node=node)
    # ``${fraction:a,b}`` in the strategy files: the share of clients sampled per round.
    OmegaConf.register_new_resolver("fraction", lambda part, whole: part / whole, replace=True)


register_with_hydra()


def normalizes(data: DataConfig) -> bool:
    """Whether inputs are standardised: ``data.normalize``, or where null, whether training is augmented."""
    return data.augment != NO_AUGMENTATION if data.normalize is None else data.normalize
