"""The config reference (README's "Configuration reference", docs): every section's keys, their
types, defaults and docs, and each registered method's and stage's own keys, made from the
config classes' field declarations. `python -m snug.config.docs` prints it; a test keeps the
README's copy current."""

from __future__ import annotations

import dataclasses
import types
import typing
from typing import Any, Literal, Union, get_args, get_origin

from snug.config.build import _section_types, _user_fields
from snug.core.registry import methods, stages


def _type_name(annotation: Any) -> str:
    origin = get_origin(annotation)
    if origin is Literal:
        return " \\| ".join(map(str, get_args(annotation)))  # escaped: a table cell
    if origin in (Union, types.UnionType):
        return " or ".join(_type_name(a) for a in get_args(annotation))
    if origin is list:
        return f"list of {_type_name(get_args(annotation)[0])}"
    return "null" if annotation is type(None) else annotation.__name__


def config_markdown() -> str:
    """The config reference, made from the field docs (README embeds it; a test keeps it in sync)."""
    methods()  # method.name's choices
    lines = []
    # sections whose keys the choice of a method or stage declares: (the records, the
    # attribute holding each one's dataclass of keys)
    chosen = {
        "method": (methods(), "settings"),
        "train": (stages(), "settings"),
        "pref": (stages(), "pref_settings"),
    }
    for name, cls in _section_types().items():
        shared = _key_table(cls) if _user_fields(cls) else []
        lines += [f"#### `{name}` — {cls.__doc__.strip()}", "", *shared]
        owners: dict[type, list[str]] = {}  # each method's and stage's own keys, once
        records, attribute = chosen.get(name, ({}, "settings"))
        for choice in records.values():
            settings = getattr(choice, attribute, None)
            if settings is not None:
                owners.setdefault(settings, []).append(f"`{choice.name}`")
        for settings, names in owners.items():
            title = f"#### `{name}` keys of {'train.stage=' if name == 'pref' else ''}{', '.join(names)} — "
            lines += [title + settings.__doc__.strip(), ""]
            lines += _key_table(settings)
    return "\n".join(lines)


def _key_table(cls: type) -> list[str]:
    lines = ["| key | type | default | meaning |", "|---|---|---|---|"]
    hints = typing.get_type_hints(cls)
    for f in _user_fields(cls).values():
        default = f.default if f.default is not dataclasses.MISSING else f.default_factory()
        choices = f.metadata["choices"]
        kind = " \\| ".join(choices()) if choices else _type_name(hints[f.name])
        lines.append(f"| `{f.name}` | {kind} | `{default!r}` | {f.metadata['doc']} |")
    return [*lines, ""]


if __name__ == "__main__":  # python -m snug.config.docs: print the config reference for the README
    print(config_markdown())
