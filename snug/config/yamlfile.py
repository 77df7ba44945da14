"""Read YAML strictly: duplicate keys refused, every key's line kept for messages, and no
document that could make snug hang or fill memory.

pyyaml keeps the last of two equal keys without a word (a config with two `train:` sections
silently loses the first one's keys), and its loaded values carry no line numbers. pyyaml's own
composer gives both: its node tree has every key's position, so this module walks that tree
instead of adding a second YAML library for it.

That tree is a graph: an alias (`*a`) is the very node its anchor (`&a`) names, so a few
hundred bytes of nested anchors ("billion laughs") stand for a document of billions of nodes,
and anything that walks it (this module, or snug's config checks on the loaded values) never
ends. pyyaml has no limit for it (its `SafeLoader` shares the objects it builds, which only
moves the explosion to whoever walks them next), so before anything walks or constructs the
document, its expanded size is counted on the graph, each node once, and a document of more
than MAX_NODES nodes is refused, as is a file of more than MAX_BYTES or values nested more than
MAX_DEPTH deep.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

import yaml

from snug.errors import UserError, read_utf8

MAX_BYTES = 1 << 20  # a config is a few kB; snug's largest example is under 2 kB
MAX_NODES = 10_000  # values, keys, lists and mappings, every alias expanded; a config has ~200
MAX_DEPTH = 100  # lists and mappings inside each other; a config's deepest value is 3 levels in


class _TooDeep(Exception):
    def __init__(self, line: int) -> None:
        self.line = line


class _Loader(yaml.SafeLoader):
    """pyyaml's safe loader that stops composing at MAX_DEPTH levels of nesting (it composes
    recursively: deeper documents would end in a RecursionError wherever the stack runs out)."""

    depth = 0

    def compose_node(self, parent, index):
        self.depth += 1
        try:
            if self.depth > MAX_DEPTH:
                raise _TooDeep(self.peek_event().start_mark.line + 1)
            return super().compose_node(parent, index)
        finally:
            self.depth -= 1


def _children(node: yaml.Node) -> list[yaml.Node]:
    if isinstance(node, yaml.SequenceNode):
        return node.value
    if isinstance(node, yaml.MappingNode):
        return [n for pair in node.value for n in pair]
    return []


def check_expansion(root: yaml.Node, where: str, error: type[UserError]) -> None:
    """`error` naming the line of the smallest value whose aliases expand past MAX_NODES, or of
    an alias inside the value it names (a loop), before anything walks the document.

    Each node's expanded size is counted once (memoised on the graph, in a loop of our own, not
    Python's recursion), so this takes time in proportion to the file, not to its expansion."""
    size: dict[int, int] = {}
    open_: set[int] = set()  # entered, not yet counted: meeting one again is a loop
    stack: list[tuple[yaml.Node, bool]] = [(root, False)]
    while stack:
        node, children_counted = stack.pop()
        if children_counted:
            open_.discard(id(node))
            total = 1 + sum(size[id(c)] for c in _children(node))
            if total > MAX_NODES:
                raise error(
                    f"{where} line {node.start_mark.line + 1}: its aliases (*name) expand this "
                    f"value to more than {MAX_NODES:,} YAML values (a config has a few hundred); "
                    "write the values out instead of repeating anchors."
                )
            size[id(node)] = total
        elif id(node) in open_:
            raise error(
                f"{where} line {node.start_mark.line + 1}: this value holds an alias of itself "
                "(a loop, which never ends when expanded); write the value out."
            )
        elif id(node) not in size:
            open_.add(id(node))
            stack.append((node, True))
            stack.extend((c, False) for c in _children(node) if id(c) not in size)


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


def load_text(
    text: str,
    where: str,
    error: type[UserError],
    lines: dict[str, int] | None = None,
    not_yaml: str | None = None,
) -> Any:
    """The YAML document `text` (from `where`, named in errors): parsed once, its expansion
    checked, then walked (filling `lines`: {'section.key': line}, duplicate keys refused) and
    built. `error` names the line of text that is not YAML (or says `not_yaml`)."""
    try:
        loader = _Loader(text)
        try:
            node = loader.get_single_node()
            if node is None:
                return None
            check_expansion(node, where, error)
            _walk(node, where, "", {} if lines is None else lines, error)
            return loader.construct_document(node)
        finally:
            loader.dispose()
    except yaml.YAMLError as e:
        if not_yaml is not None:
            raise error(not_yaml) from None
        mark = getattr(e, "problem_mark", None)
        line = f" line {mark.line + 1}" if mark else ""
        problem = getattr(e, "problem", None) or e.__class__.__name__
        raise error(f"{where}{line}: not valid YAML ({problem}).") from None
    except _TooDeep as e:
        raise error(
            f"{where} line {e.line}: values nested more than {MAX_DEPTH} levels deep; a config "
            "needs 3."
        ) from None


def read_mapping(path: str | Path, what: str, error: type[UserError]) -> tuple[Any, dict[str, int]]:
    """(the YAML document of `path`, {'section.key': line}); `error` names the file and line of
    text that is not UTF-8, not YAML, holds a key twice, or expands past MAX_NODES, and a file
    of more than MAX_BYTES."""
    text = read_utf8(path, what, error, limit=MAX_BYTES)
    lines: dict[str, int] = {}
    return load_text(text, str(path), error, lines), lines
