"""Another method or stage chosen on the command line than the config file's.

`method.name` picks a method and `train.stage` a stage, and each has keys of its own (a method's
in the `method:` section, a stage's in `train:` and `pref:`). A config file sets the keys of its
own choice; `snug train cfg.yaml method.name=full` (or `snug plan cfg.yaml --method ptuning`)
chooses another. The file's keys of its own choice that the new one does not have are then set
aside, and the command says which in one line, instead of refusing the file's `method.r` as a
key of the wrong method. Only those: a key given on the command line for a method or stage it
does not belong to is still refused, and so is a key in the file that belongs to neither the
file's choice nor the new one (snug.config's checks see them as before).
"""

from __future__ import annotations

import dataclasses
import sys
from collections.abc import Callable
from typing import Any

from snug.core.registry import METHODS, STAGES
from snug.core.sections import MethodConfig, TrainConfig

# Each key that picks: (the registry of its choices, the field's class, and where a choice's own
# keys live: (section, the class of its record that declares them: Method.settings,
# Stage.settings and Stage.pref_settings, None when it has none)).
Declared = Callable[[Any], type | None]
CHOOSERS: dict[str, tuple[dict[str, Any], type, tuple[tuple[str, Declared], ...]]] = {
    "method.name": (METHODS, MethodConfig, (("method", lambda method: method.settings),)),
    "train.stage": (
        STAGES,
        TrainConfig,
        (("train", lambda stage: stage.settings), ("pref", lambda stage: stage.pref_settings)),
    ),
}


def _own_keys(record: Any, declared_by: Declared) -> set[str]:
    declared = declared_by(record)
    if declared is None:
        return set()
    return {f.name for f in dataclasses.fields(declared) if not f.metadata.get("internal")}


def _default(cls: type, key: str) -> Any:
    return next(f.default for f in dataclasses.fields(cls) if f.name == key)


def file_choices(raw: dict[str, Any]) -> dict[str, Any]:
    """What the config file chooses for each chooser (its default when the file is silent), read
    before the command line's overrides are applied."""
    chosen = {}
    for chooser, (_, cls, _) in CHOOSERS.items():
        section, key = chooser.split(".")
        values = raw.get(section)
        given = values.get(key) if isinstance(values, dict) else None
        chosen[chooser] = _default(cls, key) if given is None else given
    return chosen


def set_aside(
    raw: dict[str, Any], in_file: dict[str, Any], overridden: set[str], source: str
) -> list[str]:
    """Remove from `raw` (the sections, overrides applied) the file's keys of the file's method
    or stage (`in_file`: file_choices) that the one an override chose does not declare; return
    one line for each chooser that set keys aside, naming them. `overridden`: the 'section.key'
    names the command line gave. The registries must be filled (snug.config does it)."""
    lines = []
    for chooser, (registry, _, places) in CHOOSERS.items():
        section, key = chooser.split(".")
        old, new = in_file[chooser], (raw.get(section) or {}).get(key)
        if chooser not in overridden or old == new:
            continue
        if not (isinstance(old, str) and isinstance(new, str)):
            continue  # a name of the wrong type: snug.config names it
        if old not in registry or new not in registry:
            continue  # an unknown name: snug.config names it and the choices
        aside = []
        for place, declared_by in places:
            values = raw.get(place)
            if not isinstance(values, dict):
                continue
            theirs = _own_keys(registry[old], declared_by) - _own_keys(registry[new], declared_by)
            for name in list(values):
                if name in theirs and f"{place}.{name}" not in overridden:
                    del values[name]
                    aside.append(f"{place}.{name}")
        if aside:
            one = len(aside) == 1
            lines.append(
                f"{source}: {', '.join(aside)} set aside: "
                f"{'not a key' if one else 'not keys'} of {chooser}={new}, chosen on the command "
                f"line (the file sets {'it' if one else 'them'} for {chooser}={old})."
            )
    return lines


def say_set_aside(cfg: Any) -> None:
    """The config file's keys set aside for a method or stage the command line chose (one line
    each), on stderr: stdout may be JSON (`snug plan --json`)."""
    for line in cfg.set_aside:
        print(line, file=sys.stderr)
