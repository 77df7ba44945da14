"""The config reference (README's "Configuration reference", docs): every section's keys, their
types, defaults and docs, each registered stage with what it learns, and each registered
method's and stage's own keys (a stage's in its own section), made from the config classes'
field declarations. `python -m snug.config.docs` prints it; a test keeps the
README's copy current."""

from __future__ import annotations

import dataclasses
import types
import typing
from typing import Any, Literal, Union, get_args, get_origin

from snug.config.choosers import METHOD, STAGE, Chooser
from snug.config.keys import section_types, user_fields


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
    lines = []
    for name, cls in section_types().items():
        lines += [f"#### `{name}` — {cls.__doc__.strip()}", "", *_key_table(cls)]
        if name == METHOD.section:
            lines += _own_tables(METHOD, "")
        if name == STAGE.section:
            lines += [*_stage_table(), *_own_tables(STAGE, f"{STAGE.path}=")]
    return "\n".join(lines)


def _stage_table() -> list[str]:
    """Each registered stage (plug-ins too): what it learns (Stage.help), where its keys live."""
    lines = [
        f"#### `{STAGE.path}` — the stages",
        "",
        "| stage | what it learns | section of its keys |",
    ]
    lines.append("|---|---|---|")
    for name, stage in STAGE.registry().items():
        place = STAGE.section_of(stage)
        lines.append(f"| `{name}` | {stage.help} | {f'`{place}:`' if place else 'none'} |")
    return [*lines, ""]


def _own_tables(chooser: Chooser, said: str) -> list[str]:
    """Each choice's own keys, one table per declaration (choices sharing one listed together),
    headed by the section they live in and the choices (`said` before their names)."""
    owners: dict[type, list[str]] = {}
    for record in chooser.registry().values():
        if record.settings is not None:
            owners.setdefault(record.settings, []).append(f"`{record.name}`")
    lines = []
    for settings, names in owners.items():
        place = chooser.section_of(chooser.registry()[names[0].strip("`")])
        heading = f"#### `{place}` keys of {said}{', '.join(names)} — {settings.__doc__.strip()}"
        lines += [heading, ""]
        lines += _key_table(settings)
    return lines


def _key_table(cls: type) -> list[str]:
    lines = ["| key | type | default | meaning |", "|---|---|---|---|"]
    hints = typing.get_type_hints(cls)
    for f in user_fields(cls).values():
        default = f.default if f.default is not dataclasses.MISSING else f.default_factory()
        choices = f.metadata["choices"]
        kind = " \\| ".join(choices()) if choices else _type_name(hints[f.name])
        lines.append(f"| `{f.name}` | {kind} | `{default!r}` | {f.metadata['doc']} |")
    return [*lines, ""]


if __name__ == "__main__":  # python -m snug.config.docs: print the config reference for the README
    print(config_markdown())
