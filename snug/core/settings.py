"""How a config key is declared: its default, its documentation, a range check, and for a
string a registry fills (method names), the function that lists its choices. snug.config
builds and checks configs from these; a plug-in's own settings are declared with them too.
Imports nothing of snug's."""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import field
from typing import Any

Check = tuple[Callable[[Any], bool], str]
AT_LEAST_1: Check = (lambda v: v >= 1, "at least 1")
POSITIVE: Check = (lambda v: v > 0, "positive")
NON_NEGATIVE: Check = (lambda v: v >= 0, "zero or more")


def setting(
    default: Any,
    doc: str,
    check: Check | None = None,
    choices: Callable[[], tuple[str, ...]] | None = None,
) -> Any:
    """A field with its documentation, an optional range check, and for a string whose choices
    a registry holds (plug-ins add to it) the function that lists them (lists are copied)."""
    meta = {"doc": doc, "check": check, "choices": choices}
    if isinstance(default, list):
        return field(default_factory=lambda: list(default), metadata=meta)
    return field(default=default, metadata=meta)
