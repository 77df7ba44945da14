"""Typed config sections, read from YAML plus `section.key=value` overrides.

Each section is a small dataclass (snug/core/sections.py, re-exported here); the `doc` of every
field is what `--help` and the README's config reference show. Values are checked against the field's type when the config is read,
and rules that span sections live in `snug.config.checks.check_combinations`, so that every config error is raised
before any model is loaded.
"""

from __future__ import annotations

import copy
import json
import typing
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import yaml

from snug.config.checks import check_combinations
from snug.config.choosers import METHOD, STAGE, Chooser
from snug.config.dataset_info import resolve_data
from snug.config.keys import (
    nearest,
    placed_elsewhere,
    section_types,
    unknown_key,
    user_fields,
)
from snug.config.paths import Ambiguous, resolve
from snug.config.switch import file_choices, set_aside
from snug.config.values import coerce, one_of
from snug.config.yamlfile import load_text, read_mapping
from snug.core.sections import (
    PATH_KEYS,
    Config,
    MethodConfig,
    StageSection,
)
from snug.errors import ConfigError
from snug.runtime.files import write_text_atomic


class Origins:
    """Where each key's value came from, for messages: 'FILE line N', "the command-line override
    'k=v'", or the config file when neither is known (defaults, a dict)."""

    def __init__(self, source: str, lines: dict[str, int] | None = None) -> None:
        self.source = source
        self.lines = lines or {}
        self.overrides: dict[str, str] = {}  # 'section.key' -> the override's text

    def of(self, key: str) -> str:
        if key in self.overrides:
            return f"command-line override '{self.overrides[key]}'"
        section = key.split(".")[0]
        line = self.lines.get(key) or self.lines.get(section)
        return f"{self.source} line {line}" if line else self.source

    def from_file(self, key: str) -> bool:
        return key not in self.overrides


def _build_own(
    chooser: Chooser,
    chosen: str,
    values: dict[str, Any],
    section: str,
    origins: Origins,
    shared: Sequence[str] = (),
) -> Any:
    """The own keys that `chosen` (a choice of `chooser`: a method, a stage) declares in
    `section`, built from `values` (that section's keys but the `shared` ones every choice has)
    and each checked against its declaration; None where it declares none there. A key another
    choice declares there is refused naming that choice; any other as unknown."""
    own_names = chooser.own_keys(chosen, section)
    owners = chooser.owners(section)
    for key in values:
        if key in own_names:
            continue
        where = origins.of(f"{section}.{key}")
        if key in owners:
            raise _not_its_key(
                where, f"{section}.{key}", owners[key], chooser.path, chosen, own_names
            )
        raise unknown_key(where, section, key, [*shared, *own_names] or list(owners))
    if not own_names:  # it has no keys, or keeps them in another section
        return None
    return _build_section(chooser.registry()[chosen].settings, values, section, origins)


def _not_its_key(
    where: str, path: str, owners: list[str], chooser: str, chosen: str, own_names: list[str]
) -> ConfigError:
    """`path` belongs to other choices of `chooser` (method.name, train.stage): say whose."""
    return ConfigError(
        f"{where}: {path} is a key of {chooser}={', '.join(owners)}, not of {chooser}={chosen}"
        + (f" (whose keys are {', '.join(own_names)})." if own_names else ".")
    )


def _build_method(values: dict[str, Any], origins: Origins) -> MethodConfig:
    """The method section: `name` and the keys every method shares, then the chosen method's
    own keys beside them."""
    shared = list(user_fields(MethodConfig))
    given = {k: v for k, v in values.items() if k in shared}
    section = _build_section(MethodConfig, given, "method", origins)
    own = {k: v for k, v in values.items() if k not in shared}
    section.own = _build_own(METHOD, section.name, own, "method", origins, shared)
    return section


def _build_stage_section(raw: dict[str, Any], stage: str, origins: Origins) -> StageSection:
    """The chosen stage's own section (its defaults when the config has none); a key in
    another stage's section is refused naming that stage (an empty one is let be)."""
    own = None
    for place in STAGE.sections():
        values = raw.get(place)
        if values is None:
            values = {}
        if not isinstance(values, dict):
            raise ConfigError(f"{origins.of(place)}: section '{place}' must be a mapping of keys.")
        built = _build_own(STAGE, stage, values, place, origins)
        if built is not None:  # the chosen stage's section (only it builds anything)
            own = built
    record = STAGE.registry()[stage]
    if record.settings is None:
        return StageSection()
    return StageSection(STAGE.section_of(record), own if own is not None else record.settings())


def _build_section(cls: type, values: dict[str, Any], section: str, origins: Origins) -> Any:
    hints = typing.get_type_hints(cls, include_extras=False)
    fields = user_fields(cls)
    names = list(fields)
    kwargs = {}
    for key, value in values.items():
        where = origins.of(f"{section}.{key}")
        if key not in names:
            raise unknown_key(where, section, key, names)
        value = coerce(value, hints[key], f"{where}: {section}.{key}")
        choices = fields[key].metadata["choices"]
        if choices is not None:
            one_of(value, choices(), f"{where}: {section}.{key}")
        check = fields[key].metadata["check"]
        if value is not None and check is not None and not check[0](value):
            raise ConfigError(f"{where}: {section}.{key} is {value!r}, but must be {check[1]}.")
        kwargs[key] = value
    return cls(**kwargs)


def _resolve_paths(cfg: Config, origins: Origins, base: Path | None) -> None:
    """Make every local path in `cfg` absolute: a relative path written in the config file
    against the file's folder; one from the command line, a default, or one of a config built
    from a dict against the current directory. What the user wrote goes to cfg.given_paths."""
    for key, hub in PATH_KEYS.items():
        section, name = key.split(".")
        part = getattr(cfg, section)
        value = getattr(part, name)
        if value is None:
            continue
        in_file = base is not None and key in origins.lines and origins.from_file(key)
        folder = base if in_file else Path.cwd()

        def one(v: str, key: str = key, folder: Path = folder, hub: str | None = hub) -> str:
            if key in ("data.train", "data.eval"):  # names of data.dataset_dir stay names
                where = f"{origins.of(key)}: {key}"
                return resolve_data(v, where, folder, cfg.data.dataset_dir)
            return resolve(v, folder, hub)

        try:
            resolved = [one(v) for v in value] if isinstance(value, list) else one(value)
        except Ambiguous as e:
            raise ConfigError(f"{origins.of(key)}: {key}: {e}.") from None
        if resolved != value:
            setattr(part, name, resolved)
            where = (
                f" in {Path(origins.source).resolve()}"
                if in_file
                else " on the command line"
                if key in origins.overrides
                else f" (from {Path.cwd()})"
            )
            cfg.given_paths[key] = f"{json.dumps(value)}{where}"


def config_from_dict(
    raw: dict[str, Any],
    source: str = "config",
    origins: Origins | None = None,
    base: Path | None = None,
) -> Config:
    """A checked config from sections of plain values. `base`: the folder relative paths of the
    file's keys are read from (None: the current directory)."""
    origins = origins or Origins(source)
    if not isinstance(raw, dict):
        raise ConfigError(f"{source}: the top level must be a mapping of sections.")
    sections = section_types()
    stage_sections = STAGE.sections()  # the door opened: method.name's and train.stage's choices
    built = {}
    for name, values in raw.items():
        if name in stage_sections:
            continue  # built below, once train.stage is known
        if name not in sections and (placed := placed_elsewhere(str(name))):
            raise ConfigError(  # a key written at the top level (LLaMA-Factory's YAML is flat)
                f"{origins.of(str(name))}: '{name}' is not a section; did you mean {placed} "
                "(the key indented under its section)?"
            )
        if name not in sections:
            raise ConfigError(
                f"{origins.of(str(name))}: unknown section '{name}'"
                + nearest(str(name), [*sections, *stage_sections])
            )
        if values is None:
            values = {}
        if not isinstance(values, dict):
            raise ConfigError(f"{origins.of(name)}: section '{name}' must be a mapping of keys.")
        if name == "method":
            built[name] = _build_method(values, origins)
        else:
            built[name] = _build_section(sections[name], values, name, origins)
    stage = built["train"].stage if "train" in built else STAGE.default()
    cfg = Config(**built, stage_section=_build_stage_section(raw, stage, origins))
    check_combinations(cfg, source)
    _resolve_paths(cfg, origins, base)
    return cfg


def parse_override(text: str) -> tuple[str, str, Any]:
    """`section.key=value` -> (section, key, YAML-parsed value)."""
    where = f"command-line override '{text}'"
    if "=" not in text or "." not in text.split("=", 1)[0]:
        raise ConfigError(f"{where} must look like section.key=value (e.g. train.lr=1e-4).")
    path, raw = text.split("=", 1)
    section, key = path.split(".", 1)
    if not raw.strip():
        return section, key, ""
    not_yaml = f"{where}: the value is not valid YAML; quote it."
    return section, key, load_text(raw, where, ConfigError, not_yaml=not_yaml)


def load_config(
    path: str | Path | None,
    overrides: list[str] = (),
    read: tuple[dict[str, Any], dict[str, int]] | None = None,
) -> Config:
    """Read a YAML config (or start from defaults), apply overrides, validate everything.
    Relative paths in the file are read from the file's folder (a run's saved config.yaml is
    read like any other). An override choosing another method or stage sets the file's keys of
    its own aside (snug/config/switch.py); `cfg.set_aside` says which, for the command to
    print. `read`: the sections and their lines already read from `path` (a LLaMA-Factory
    config converted by snug/config/llamafactory.py; its paths are absolute)."""
    raw: dict[str, Any] = {}
    source = "config"
    lines: dict[str, int] = {}
    base = None
    if read is not None:
        source = str(path)
        raw, lines = copy.deepcopy(read[0]), dict(read[1])
    elif path is not None:
        source = str(path)
        if Path(path).is_dir():
            raise ConfigError(f"{path}: is a directory; give the config's YAML file.")
        if not Path(path).exists():
            raise ConfigError(f"{path}: no such config file.")
        raw, lines = read_mapping(path, "the config", ConfigError)
        raw = raw or {}
        if not isinstance(raw, dict):
            raise ConfigError(f"{path}: the top level must be a mapping of sections.")
        base = Path(path).resolve().parent
    origins = Origins(source, lines)
    in_file = file_choices(raw)
    for text in overrides:
        section, key, value = parse_override(text)
        origins.overrides[f"{section}.{key}"] = text
        origins.overrides.setdefault(section, text)
        if not isinstance(raw.get(section, {}), dict):
            raise ConfigError(
                f"{origins.of(section)}: section '{section}' must be a mapping of keys."
            )
        raw.setdefault(section, {})
        if raw[section] is None:
            raw[section] = {}
        raw[section][key] = value
    aside = set_aside(raw, in_file, set(origins.overrides), source)
    cfg = config_from_dict(raw, source, origins, base)
    cfg.set_aside = aside
    return cfg


def save_config(cfg: Config, path: Path, notes: dict[str, str] | None = None) -> None:
    """The resolved config as YAML (written aside, then renamed into place); each path made
    absolute carries what the user wrote as a comment, and each key of `notes`
    ('section.key' -> text) its note."""
    lines = []
    for name, values in cfg.to_dict().items():
        lines.append(f"{name}:")
        for key, value in values.items():
            text = yaml.safe_dump({key: value}, sort_keys=False).rstrip("\n").splitlines()
            given = cfg.given_paths.get(f"{name}.{key}")
            if given:
                text[0] += f"  # as given: {given}"
            if notes and f"{name}.{key}" in notes:
                text[0] += f"  # {notes[f'{name}.{key}']}"
            lines += ["  " + t for t in text]
    write_text_atomic(path, "\n".join(lines) + "\n")
