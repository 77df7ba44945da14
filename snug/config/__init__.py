"""A run's config: read from YAML plus `section.key=value` overrides, checked whole before any
model loads, and written back (build.py); the rules across sections (checks.py), values coerced
to their declared types (values.py), YAML read with limits (yamlfile.py), paths and hub ids
told apart (paths.py), files checked before loading (preflight.py), a method or stage switched
on the command line (switch.py), and the config reference written from the declarations
(docs.py). What a config holds, its sections, is declared in the bottom layer
(snug/core/sections.py) and re-exported here."""

from snug.config.build import (
    Origins,
    config_from_dict,
    load_config,
    parse_override,
    save_config,
)
from snug.core.sections import (
    PATH_KEYS,
    SECTIONS,
    Config,
    DataConfig,
    DistConfig,
    MemoryConfig,
    MethodConfig,
    ModelConfig,
    OutputConfig,
    StageSection,
    TrainConfig,
)
from snug.errors import ConfigError

__all__ = [
    "PATH_KEYS",
    "SECTIONS",
    "Config",
    "ConfigError",
    "DataConfig",
    "DistConfig",
    "MemoryConfig",
    "MethodConfig",
    "ModelConfig",
    "Origins",
    "OutputConfig",
    "StageSection",
    "TrainConfig",
    "config_from_dict",
    "load_config",
    "parse_override",
    "save_config",
]
