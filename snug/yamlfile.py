"""Read a YAML mapping strictly: duplicate keys refused, every key's line kept for messages.

pyyaml keeps the last of two equal keys without a word (a config with two `train:` sections
silently loses the first one's keys), and its loaded values carry no line numbers. pyyaml's own
composer gives both: its node tree has every key's position, so this module walks that tree
instead of adding a second YAML library for it.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

import yaml

from snug.errors import UserError, read_utf8


def _walk(node: yaml.Node, where: str, prefix: str, lines: dict[str, int], error) -> None:
    if isinstance(node, yaml.SequenceNode):
        for item in node.value:
            _walk(item, where, prefix, lines, error)
        return
    if not isinstance(node, yaml.MappingNode):
        return
    seen: dict[str, int] = {}
    for key_node, value_node in node.value:
        line = key_node.start_mark.line + 1
        if isinstance(key_node, yaml.ScalarNode):
            key = key_node.value
            if key in seen and key != "<<":
                raise error(
                    f"{where} lines {seen[key]} and {line}: '{prefix}{key}' is given twice "
                    "(YAML would keep only the second); merge them into one."
                )
            seen[key] = line
            lines.setdefault(prefix + key, line)
            _walk(value_node, where, f"{prefix}{key}.", lines, error)
        else:
            _walk(value_node, where, prefix, lines, error)


def read_mapping(path: str | Path, what: str, error: type[UserError]) -> tuple[Any, dict[str, int]]:
    """(the YAML document of `path`, {'section.key': line}); `error` names the file and line of
    text that is not UTF-8, not YAML, or holds a key twice."""
    text = read_utf8(path, what, error)
    try:
        node = yaml.compose(text, Loader=yaml.SafeLoader)
        lines: dict[str, int] = {}
        if node is not None:
            _walk(node, str(path), "", lines, error)
        return yaml.safe_load(text), lines
    except yaml.YAMLError as e:
        mark = getattr(e, "problem_mark", None)
        line = f" line {mark.line + 1}" if mark else ""
        problem = getattr(e, "problem", None) or e.__class__.__name__
        raise error(f"{path}{line}: not valid YAML ({problem}).") from None
