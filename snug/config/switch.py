"""Another method or stage chosen on the command line than the config file's.

`method.name` picks a method and `train.stage` a stage, and each has keys of its own (a method's
in the `method:` section, a stage's in the section it names: snug/config/choosers.py). A config
file sets the keys of its own choice; `snug train cfg.yaml method.name=full` (or `snug plan
cfg.yaml --method ptuning`) chooses another. The file's keys of its own choice that the new one does not have are then set
aside, and the command says which in one line, instead of refusing the file's `method.r` as a
key of the wrong method. Only those: a key given on the command line for a method or stage it
does not belong to is still refused, and so is a key in the file that belongs to neither the
file's choice nor the new one (snug.config's checks see them as before).
"""

from __future__ import annotations

import sys
from typing import Any

from snug.config.choosers import CHOOSERS


def file_choices(raw: dict[str, Any]) -> dict[str, Any]:
    """What the config file chooses for each chooser (its default when the file is silent), read
    before the command line's overrides are applied."""
    chosen = {}
    for chooser in CHOOSERS:
        values = raw.get(chooser.section)
        given = values.get(chooser.key) if isinstance(values, dict) else None
        chosen[chooser.path] = chooser.default() if given is None else given
    return chosen


def set_aside(
    raw: dict[str, Any], in_file: dict[str, Any], overridden: set[str], source: str
) -> list[str]:
    """Remove from `raw` (the sections, overrides applied) the file's keys of the file's method
    or stage (`in_file`: file_choices) that the one an override chose does not declare; return
    one line for each chooser that set keys aside, naming them. `overridden`: the 'section.key'
    names the command line gave."""
    lines = []
    for chooser in CHOOSERS:
        old, new = in_file[chooser.path], (raw.get(chooser.section) or {}).get(chooser.key)
        if chooser.path not in overridden or old == new:
            continue
        if not (isinstance(old, str) and isinstance(new, str)):
            continue  # a name of the wrong type: snug.config names it
        registry = chooser.registry()
        if old not in registry or new not in registry:
            continue  # an unknown name: snug.config names it and the choices
        place = chooser.section_of(registry[old])
        values = raw.get(place) if place else None
        if not isinstance(values, dict):
            continue
        theirs = set(chooser.own_keys(old, place)) - set(chooser.own_keys(new, place))
        aside = []
        for name in list(values):
            if name in theirs and f"{place}.{name}" not in overridden:
                del values[name]
                aside.append(f"{place}.{name}")
        if aside:
            one = len(aside) == 1
            lines.append(
                f"{source}: {', '.join(aside)} set aside: "
                f"{'not a key' if one else 'not keys'} of {chooser.path}={new}, chosen on the "
                f"command line (the file sets {'it' if one else 'them'} for {chooser.path}={old})."
            )
    return lines


def say_set_aside(cfg: Any) -> None:
    """The config file's keys set aside for a method or stage the command line chose (one line
    each), on stderr: stdout may be JSON (`snug plan --json`)."""
    for line in cfg.set_aside:
        print(line, file=sys.stderr)
