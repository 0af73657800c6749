"""From a composed config to an experiment's config: every plugin it names found, and its settings read.

``simulator.config`` checks the config's own keys and knows no plugin; this
module sits above the plugins and reads, for each one the config chooses (a
client method, a model and its head, a stream kind, a dataset, the user's
hooks), its own ``Settings`` from its section, before any data is read or a
client starts. A plugin by dotted path is imported here too, so a missing one
fails first.
"""

from __future__ import annotations

import dataclasses

from omegaconf import DictConfig

from clients import METHODS
from clients.augment import AUGMENTATIONS
from clients.heads import HEADS
from clients.models import MODELS
from simulator.config import NO_AUGMENTATION, ConfigError, ExperimentConfig, parse_config, scenario_source
from simulator.data import DATASETS
from simulator.hooks import HOOKS
from simulator.streams import STREAMS


def load_config(cfg: DictConfig) -> ExperimentConfig:
    """Check a composed config and read every chosen plugin's settings; raise ConfigError on the first problem."""
    config = parse_config(cfg)
    where = scenario_source(cfg)
    client, model, stream, data = config.client, config.model, config.stream, config.data
    MODELS.resolve(model.name, where)
    if data.augment != NO_AUGMENTATION:
        AUGMENTATIONS.resolve(data.augment, where)
    for hook in config.eval.hooks:
        HOOKS.resolve(hook, where)
    source = DATASETS.resolve(data.dataset, where)
    if data.scale is not None and not source.reads_files:
        readers = [name for name in DATASETS if DATASETS.resolve(name).reads_files]
        raise ConfigError(
            f"{where}: data.scale = {data.scale!r}: applies only to datasets read from files "
            f"({', '.join(readers)}), not data.dataset = {data.dataset!r}; the built-in ones scale their own inputs"
        )
    return dataclasses.replace(
        config,
        client=dataclasses.replace(client, settings=METHODS.settings(client.method, client.sections, "client", where)),
        model=dataclasses.replace(model, head_settings=HEADS.settings(model.head, model.sections, "model", where)),
        stream=dataclasses.replace(
            stream, settings=STREAMS.settings(stream.kind, stream.sections, "stream", where, strict=True)
        ),
        data=dataclasses.replace(data, settings=DATASETS.settings(data.dataset, data.sections, "data", where)),
    )
