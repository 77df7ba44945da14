"""Module names a method's key gives (lora's, dora's and ia3's `targets`, freeze's
`trainable_modules`), checked against the
model built on the meta device before anything is tokenized or loaded: peft would refuse a list
matching nothing only when the model is applied, after tokenizing, and train a list matching
partly on the names it found, silently dropping the rest."""

from __future__ import annotations

import difflib
import re
from fnmatch import fnmatch
from typing import TYPE_CHECKING

from snug.errors import ConfigError

if TYPE_CHECKING:
    from torch import nn


def adaptable_names(model: nn.Module) -> list[str]:
    """The last part of the name of each module holding a 2-d weight (linear layers, embeddings,
    GPT-2's Conv1D): the names a user gives as targets, in the model's order."""
    seen: dict[str, None] = {}
    for name, module in model.named_modules():
        weight = getattr(module, "weight", None)
        if name and getattr(weight, "ndim", 0) == 2:
            seen.setdefault(name.rsplit(".", 1)[-1], None)
    return list(seen)


def _matches(target: str, names: list[str]) -> bool:
    """peft's rule for a list entry: a module's whole name, or its last dotted parts."""
    return any(name == target or name.endswith(f".{target}") for name in names)


def check_targets(model: nn.Module, targets: str | list[str], key: str = "method.targets") -> None:
    """Every entry of a list of module names names a module of `model`, and a single string
    other than all-linear (peft reads it as a regular expression over whole names) matches
    one; else one ConfigError naming the key, what matched nothing and the near names."""
    if targets == "all-linear":
        return
    names = [name for name, _ in model.named_modules() if name]
    known = adaptable_names(model)
    of = f" of {model.config.name_or_path}" if getattr(model.config, "name_or_path", "") else ""
    listed = f"its modules are {', '.join(known)}, or give all-linear"
    if isinstance(targets, str):
        try:
            found = any(re.fullmatch(targets, name) for name in names)
        except re.error as e:
            raise ConfigError(
                f"{key} is {targets!r}, which peft reads as a regular expression, but it is not "
                f"one ({e}); give a list of module names or all-linear."
            ) from None
        if not found:
            raise ConfigError(
                f"{key} is {targets!r}, a regular expression (as peft reads one string) that "
                f"matches no module{of}{_near(targets, known)}; {listed}."
            )
        return
    missing = [t for t in targets if not _matches(t, names)]
    if missing:
        said = ", ".join(f"'{t}'{_near(t, known)}" for t in missing)
        raise ConfigError(f"{key} names no module{of} called {said}; {listed}.")


def check_patterns(model: nn.Module, patterns: list[str] | None, key: str) -> None:
    """Every glob pattern (fnmatch over whole module names, as freeze reads them) matches a
    module of `model`; else one ConfigError naming the key, the pattern and the near name."""
    names = [name for name, _ in model.named_modules() if name]
    missing = [p for p in patterns or [] if not any(fnmatch(name, p) for name in names)]
    if missing:
        of = f" of {model.config.name_or_path}" if getattr(model.config, "name_or_path", "") else ""
        said = ", ".join(f"'{p}'{_near(p.rstrip('.*'), names, whole=True)}" for p in missing)
        raise ConfigError(
            f"{key}: no module{of} matches {said}; give glob patterns over whole module "
            "names, such as model.layers.1.* or lm_head."
        )


def _near(word: str, known: list[str], whole: bool = False) -> str:
    """' (did you mean X?)' for the known name nearest `word` (its last part, unless `whole`)."""
    word = word if whole else word.rsplit(".", 1)[-1]
    close = difflib.get_close_matches(word, known, n=1, cutoff=0.6)
    return f" (did you mean '{close[0]}'?)" if close else ""
