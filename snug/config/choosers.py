"""The keys that pick a registered method or stage, and where each choice's own keys live.

`method.name` picks a method, whose own keys sit in the `method:` section beside `name`;
`train.stage` picks a stage, whose own keys live in a section the stage names (`Stage.section`:
`pref` for dpo, orpo, simpo and kto, `cls` for cls, a plug-in's own). Building a config
(build.py), setting keys aside when the command line picks another choice (switch.py) and the
config reference (reference.py) all read this one description.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

from snug.core.registry import PluginError, methods, stages
from snug.core.sections import SECTIONS, Config


@dataclass(frozen=True)
class Chooser:
    """A key that picks one registered record (a method, a stage), whose own keys (its
    `settings` dataclass) live in the section `section_of(record)`."""

    path: str  # "method.name", "train.stage"
    registry: Callable[[], dict[str, Any]]  # the registered records, the door opened
    section_of: Callable[[Any], str]  # where a record's own keys live ("" where it has none)

    @property
    def section(self) -> str:
        """The section holding the choosing key itself."""
        return self.path.split(".")[0]

    @property
    def key(self) -> str:
        return self.path.split(".")[1]

    def default(self) -> str:
        """What a config that does not say picks."""
        return getattr(getattr(Config(), self.section), self.key)

    def own_keys(self, name: str, section: str) -> list[str]:
        """The keys the choice `name` declares in `section` (none where its keys live elsewhere)."""
        record = self.registry()[name]
        if record.settings is None or self.section_of(record) != section:
            return []
        return _declared(record.settings)

    def owners(self, section: str) -> dict[str, list[str]]:
        """Each key some choice declares in `section` -> the names of the choices declaring it."""
        owners: dict[str, list[str]] = {}
        for name in self.registry():
            for key in self.own_keys(name, section):
                owners.setdefault(key, []).append(name)
        return owners

    def sections(self) -> dict[str, list[str]]:
        """Each section its choices keep their keys in -> the choices that keep them there."""
        found: dict[str, list[str]] = {}
        for name, record in self.registry().items():
            if record.settings is not None:
                found.setdefault(self.section_of(record), []).append(name)
        return found


def _declared(settings: type) -> list[str]:
    return [f.name for f in dataclasses.fields(settings) if not f.metadata.get("internal")]


def _stage_section(stage: Any) -> str:
    """The section a stage's keys live in; one without a name, or with one of snug's own
    sections' (which hold every run's keys), is a plug-in's mistake, said in one line."""
    if stage.settings is None:
        return ""
    if not stage.section or stage.section in SECTIONS:
        said = f"names {stage.section!r}, one of snug's own" if stage.section else "names none"
        raise PluginError(
            f"stage {stage.name!r} of {type(stage).__module__} has keys of its own but its "
            f"section {said}: set Stage.section to a section name of its own (e.g. {stage.name!r})."
        )
    return stage.section


METHOD = Chooser("method.name", methods, lambda method: "method")
STAGE = Chooser("train.stage", stages, _stage_section)
CHOOSERS = (METHOD, STAGE)
