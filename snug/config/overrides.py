"""A config with some keys replaced: what the planner's search, its cheapest-change list and
the tests vary one candidate by."""

from __future__ import annotations

import dataclasses

from snug.core.sections import Config, with_method


def with_overrides(cfg: Config, **sections) -> Config:
    """A copy of cfg with some keys of some sections replaced, e.g. memory={"optimizer": ...}.
    A new method.name brings that method's own keys (snug.core.registry.with_method)."""
    out = {}
    for name, keys in sections.items():
        section = getattr(cfg, name)
        if name == "method" and keys.get("name", section.name) != section.name:
            keys = dict(keys)
            section = with_method(section, keys.pop("name"))
        if name == "method" and section.own is not None:
            own = {k: keys.pop(k) for k in list(keys) if hasattr(section.own, k)}
            section = dataclasses.replace(section, own=dataclasses.replace(section.own, **own))
        out[name] = dataclasses.replace(section, **keys)
    return dataclasses.replace(cfg, **out)
