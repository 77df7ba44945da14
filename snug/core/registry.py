"""The registry of methods, stages and preference losses, and its one door.

Every method, stage and preference loss, snug's own and a plug-in's, comes in the same way: a
module the door imports calls `register(METHOD)`, `register_stage(STAGE)` or
`register_pref_loss(LOSS)`. The door (`load_plugins`) imports, once and in this order: the
modules installed packages declare under the entry-point group `snug.plugins` (snug's own
package declares `snug.builtin` there, first; pyproject.toml), then the modules $SNUG_PLUGINS
names (comma-separated module names or paths of .py files). Importing
a method or stage module registers nothing by itself: its package's `snug.builtin`-like module
does, so the order of the choices is the order of those lines.

A name taken twice is refused in one line naming both modules, unless the later registration
asks for it (`register(m, replace=True)`), which is then said on stderr as it happens.

`methods()`, `stages()` and `pref_losses()` give the registered records with the door opened; `get_method` and
`get_stage` one of them by name. This module imports nothing of snug's above the bottom layer
(snug/core/) and no torch.
"""

from __future__ import annotations

import functools
import sys
from pathlib import Path
from typing import TYPE_CHECKING, Any

from snug.errors import UserError

if TYPE_CHECKING:
    from snug.core.method import Method

METHODS: dict[str, Method] = {}
# name -> a snug.core.stage.Stage. Not typed by it: that protocol is typed with the config's
# sections (snug/core/sections.py), which list these names, so naming it here would close a loop.
STAGES: dict[str, Any] = {}
# name -> a preference loss class (snug.stages.pref_losses.PairLoss), chosen by name from a
# preference stage's config (dpo: pref.loss).
PREF_LOSSES: dict[str, type] = {}
# The group installed packages declare their plug-in modules under (snug's own included).
ENTRY_POINTS = "snug.plugins"
# What a `replace=True` registration replaced: "kind 'name' of module -> module" lines.
REPLACED: list[str] = []

_loaded: set[str] = set()
_opening = False


class PluginError(UserError):
    """A plug-in cannot be imported, or registers a name already taken (names both)."""


# (kind, name) -> the module that registered it, as said in messages (a plug-in given as a
# .py file by its path)
_OWNERS: dict[tuple[str, str], str] = {}
# the module names the door gives plug-ins it loads from .py files -> their paths
_FILES: dict[str, str] = {}


def _add(kind: str, table: dict, name: str, record: object, module: str, replace: bool) -> None:
    """Register `record` under `name`; `module`: the module it comes from."""
    if not name:
        raise ValueError(f"{type(record).__name__}: a {kind} needs a name.")
    new = _FILES.get(module, module)
    if name in table and table[name] is not record:
        old = _OWNERS[(kind, name)]
        if not replace:
            raise PluginError(
                f"{kind} name {name!r} is taken: {new} registers it and {old} already did; "
                f"rename it, or register it with replace=True to replace {old}'s."
            )
        line = f"{kind} {name!r} of {old} replaced by {new} (it asked to: replace=True)"
        REPLACED.append(line)
        print(f"snug: {line}", file=sys.stderr)
    table[name] = record
    _OWNERS[(kind, name)] = new


def register(method: Method, replace: bool = False) -> None:
    """Make a method known by its name; a name taken is refused unless `replace`."""
    _add("method", METHODS, method.name, method, method.apply.__module__, replace)


def register_stage(stage: Any, replace: bool = False) -> None:
    """Make a stage known by its name; a name taken is refused unless `replace`."""
    _add("stage", STAGES, stage.name, stage, type(stage).__module__, replace)


def register_pref_loss(loss: type, replace: bool = False) -> None:
    """Make a preference loss class known by its `name`; a name taken is refused unless
    `replace`."""
    _add("preference loss", PREF_LOSSES, loss.name, loss, loss.__module__, replace)


@functools.cache
def _entry_points() -> tuple[tuple[str, str], ...]:
    """(how to say it, what to import) for each module of the entry-point group, snug's own
    first; read once a process (a scan of every installed package's metadata)."""
    from importlib.metadata import entry_points

    found = sorted(
        entry_points(group=ENTRY_POINTS),
        key=lambda ep: (ep.dist is None or ep.dist.name != "snug", ep.name),
    )
    if not any(ep.dist is not None and ep.dist.name == "snug" for ep in found):
        raise PluginError(
            f"snug's own methods and stages come in through the entry-point group "
            f"{ENTRY_POINTS!r}, which names none of snug's: install snug (pip install -e . in "
            f"its folder; make test does) rather than running it from the source folder."
        )
    return tuple((f"entry point {ep.name}={ep.value}", ep.value.split(":")[0]) for ep in found)


def _wanted() -> list[tuple[str, str]]:
    """(how to say it, what to import) for each plug-in, in the door's order."""
    import os

    wanted = list(_entry_points())
    for plugin in os.environ.get("SNUG_PLUGINS", "").split(","):
        if plugin.strip():
            wanted.append((plugin.strip(), plugin.strip()))
    return wanted


def _import(target: str) -> None:
    import importlib
    import importlib.util

    if not target.endswith(".py"):
        importlib.import_module(target)
        return
    path = Path(target).expanduser().resolve()
    spec = importlib.util.spec_from_file_location(f"snug_plugin_{path.stem}", path)
    if spec is None or not path.is_file():
        raise FileNotFoundError(f"no file {path}")
    module = importlib.util.module_from_spec(spec)
    sys.modules[spec.name] = module
    _FILES[spec.name] = str(path)
    spec.loader.exec_module(module)


def load_plugins() -> None:
    """Open the door: import each plug-in module (snug's own first) that is not imported yet.
    Importing one runs its register lines (docs/extending.md)."""
    global _opening
    if _opening:  # a plug-in module asking for the registry while it registers
        return
    _opening = True
    try:
        for said, target in _wanted():
            if said in _loaded:
                continue
            _loaded.add(said)
            try:
                _import(target)
            except PluginError:  # a name it takes is taken
                _loaded.discard(said)
                raise
            except Exception as e:  # anything a plug-in raises on import: say which one
                _loaded.discard(said)
                first = str(e).strip().splitlines()[0] if str(e).strip() else ""
                raise PluginError(
                    f"snug plug-in {said!r} (from $SNUG_PLUGINS or an installed entry point) "
                    f"failed to import: {type(e).__name__}: {first}"
                ) from None
    finally:
        _opening = False


def methods() -> dict[str, Method]:
    """Every registered method, snug's own and the plug-ins', in the order they came."""
    load_plugins()
    return METHODS


def stages() -> dict[str, Any]:
    """Every registered stage, snug's own and the plug-ins', in the order they came."""
    load_plugins()
    return STAGES


def pref_losses() -> dict[str, type]:
    """Every registered preference loss class, snug's own and the plug-ins', in the order they
    came."""
    load_plugins()
    return PREF_LOSSES


def get_method(name: str) -> Method:
    if name not in methods():
        raise ValueError(
            f"method.name={name} is not available yet; choose one of {', '.join(sorted(METHODS))}."
        )
    return METHODS[name]


def get_stage(name: str) -> Any:
    if name not in stages():
        raise ValueError(f"train.stage={name} is not available; choose one of {', '.join(STAGES)}.")
    return STAGES[name]
