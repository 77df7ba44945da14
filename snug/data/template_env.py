"""The environment chat templates render in: transformers' (snug/data/render.py copies it),
with hooks and a rewrite of each template's syntax tree that count what a render spends
against its budget (snug/data/template_budget.py):

- the environment's hooks: every call (functions, macros, methods; a method of a string checked
  for what it will build, snug/data/template_sizes.py), the operators `+`, `*`, `**` and `%`,
  `str.format`, every filter and the tests that read, and every value output (`finalize`);
- the rewritten tree: each loop item and each run of a loop's, macro's or block's body (a
  step per item, the body's weight in nodes, and the literal text it outputs), `~` (a checked
  join), slices (copies), and what comparisons read.
"""

from __future__ import annotations

import functools
import inspect
import types
from collections.abc import Callable, Iterable, Iterator, Mapping
from typing import Any

import jinja2
from jinja2 import nodes
from jinja2.runtime import LoopContext
from jinja2.sandbox import ImmutableSandboxedEnvironment, safe_range
from jinja2.visitor import NodeTransformer

from snug.data.template_budget import (
    MAX_CHARS,
    STEP_UNITS,
    built,
    charge,
    printed,
    read,
    refuse_chars,
    spend,
)
from snug.data.template_sizes import GLOBALS, before_binop, before_filter, before_method, str_format

STEP_NODES = 10  # nodes of a loop's or macro's body that count as one step each time it runs


# -- what the rewritten syntax tree calls (pass_context: Jinja never folds them at compile time)
@jinja2.pass_context
def _counted(context: Any, iterable: Iterable, steps: int = 1, text: int = 0) -> Iterator:
    """A loop's items, each `steps` (1 and the weight of the loop's body) and the `text` its
    body outputs as it is written in the template."""
    for item in iterable:
        charge(text, steps)
        yield item


@jinja2.pass_context
def _spend(context: Any, steps: int, text: int) -> None:
    """A macro's (or block's) body run: its weight, and the text it outputs as written."""
    charge(text, steps)


@jinja2.pass_context
def _read(context: Any, value: Any) -> Any:
    if type(value) is not str or len(value) >= STEP_UNITS:  # a short string reads at once
        read(value)
    return value


@jinja2.pass_context
def _read_container(context: Any, value: Any) -> Any:
    """The right side of `in`: a mapping is looked up, not read."""
    if not isinstance(value, Mapping):
        read(value)
    return value


@jinja2.pass_context
def _copied(context: Any, value: Any) -> Any:
    return built(value, "[:]", nested=False)


@jinja2.pass_context
def _concat(context: Any, parts: tuple) -> str:
    """`a ~ b`, as Jinja's str_join makes it (transformers renders without autoescape)."""
    texts = [printed(part, "~") for part in parts]
    refuse_chars(sum(map(len, texts)), "~")
    return built("".join(texts), "~", nested=False)


def _counted_range(*args: int) -> range:
    items = safe_range(*args)
    spend(max(len(items), 1))
    return items


def _weight(body: list[nodes.Node]) -> tuple[int, int]:
    """The steps a body of statements counts each time it runs (by its nodes: a body of a
    thousand statements is a thousand times the work of one), and the characters of the text
    it outputs as written (literal text; counted here, not as it is output, which costs
    nothing: the text of a branch not taken is counted too)."""
    found = [n for node in body for n in (node, *node.find_all(nodes.Node))]
    text = sum(len(n.data) for n in found if isinstance(n, nodes.TemplateData))
    return len(found) // STEP_NODES, text


def _filter(node: nodes.Expr, name: str, *args: nodes.Expr) -> nodes.Filter:
    return nodes.Filter(node, name, list(args), [], None, None, lineno=node.lineno)


class _Budgeted(NodeTransformer):
    """The syntax tree rewritten to count: each loop item and each run of a loop's, macro's or
    block's body (its weight and literal text), `~` (built by a checked join), and what
    comparisons read."""

    def _weighed(self, node: nodes.Node) -> nodes.Node:
        self.generic_visit(node)
        steps, text = _weight(node.body)
        if steps or text:
            spent = _filter(nodes.Const(steps), "snug_spend", nodes.Const(text))
            node.body.insert(0, nodes.ExprStmt(spent, lineno=node.lineno))
        return node

    visit_Macro = visit_CallBlock = visit_Block = _weighed  # noqa: N815 (NodeTransformer's)

    def visit_For(self, node: nodes.For) -> nodes.For:  # noqa: N802
        if node.recursive:  # loop(items) runs the body on items that do not pass node.iter
            self._weighed(node)
            node.iter = _filter(node.iter, "snug_counted")
            return node
        self.generic_visit(node)
        steps, text = _weight(node.body)
        node.iter = _filter(node.iter, "snug_counted", nodes.Const(1 + steps), nodes.Const(text))
        return node

    def visit_Concat(self, node: nodes.Concat) -> nodes.Filter:  # noqa: N802
        self.generic_visit(node)
        return _filter(nodes.Tuple(node.nodes, "load", lineno=node.lineno), "snug_concat")

    def visit_Getitem(self, node: nodes.Getitem) -> nodes.Expr:  # noqa: N802
        """A slice (which Jinja takes without the environment's getitem) is a copy."""
        self.generic_visit(node)
        return _filter(node, "snug_copied") if isinstance(node.arg, nodes.Slice) else node

    def visit_Compare(self, node: nodes.Compare) -> nodes.Compare:  # noqa: N802
        self.generic_visit(node)
        if not isinstance(node.expr, nodes.Const):
            node.expr = _filter(node.expr, "snug_read")
        for op in node.ops:
            if not isinstance(op.expr, nodes.Const):
                reader = "snug_read_container" if op.op in ("in", "notin") else "snug_read"
                op.expr = _filter(op.expr, reader)
        return node


# Jinja's tests whose time depends on what they read (the others look at a type or a flag).
READING_TESTS = frozenset(
    "in eq equalto == ne != lt < lessthan le <= gt > greaterthan ge >= lower upper".split()
)
# What Jinja passes to every call besides the template's arguments (Context.call takes them).
JINJA_KWARGS = frozenset({"_loop_vars", "_block_vars"})
# Methods of a mapping that look up, not read (a message's .get('content')).
LOOKUPS = frozenset("get keys items values".split())


def _skip(func: Callable) -> int:
    """How many leading arguments Jinja passes to `func` before the template's own (its
    context, eval context or environment, as `pass_context` ... mark it)."""
    return 1 if hasattr(func, "jinja_pass_arg") else 0


def _checked_filter(name: str, func: Callable) -> Callable:
    skip = _skip(func)

    @functools.wraps(func)  # keeps how Jinja passes it its context
    def checked(*args: Any, **kwargs: Any) -> Any:
        spend(1)
        taken = before_filter(name, args[skip:], kwargs)
        if taken is not None:
            args = (*args[:skip], *taken)
        return built(func(*args, **kwargs), name, args)

    return checked


def _checked_test(func: Callable) -> Callable:
    skip = _skip(func)

    @functools.wraps(func)
    def checked(*args: Any, **kwargs: Any) -> Any:
        read(*args[skip:], *kwargs.values())
        return func(*args, **kwargs)

    return checked


def _checked_global(func: Callable, check: Callable[..., None]) -> Callable:
    @functools.wraps(func)
    def checked(*args: Any, **kwargs: Any) -> Any:
        check(*args, **kwargs)
        return func(*args, **kwargs)

    return checked


def _name(obj: Any) -> str:
    owner = getattr(obj, "__self__", None)
    name = getattr(obj, "__name__", type(obj).__name__)
    return f"{type(owner).__name__}.{name}" if owner is not None else name


class BudgetedEnvironment(ImmutableSandboxedEnvironment):
    """transformers' chat template environment with a budget of steps and sizes (see the
    module)."""

    intercepted_binops = frozenset({"*", "**", "+", "%"})

    def call(__self, __context, __obj, *args, **kwargs):  # noqa: N805 (jinja2's signature)
        spend(1)
        inputs = args
        if isinstance(__obj, LoopContext) and args:  # loop(items) of a recursive loop
            args = (_counted(__context, args[0]), *args[1:])
        elif isinstance(__obj, (types.BuiltinMethodType, types.MethodType)):
            owner, name = __obj.__self__, __obj.__name__
            if isinstance(owner, Mapping) and name in LOOKUPS:
                return super().call(__context, __obj, *args, **kwargs)
            given = {k: v for k, v in kwargs.items() if k not in JINJA_KWARGS}
            read(owner, *args, *given.values())
            args = before_method(owner, name, args, given) or args
            inputs = (owner, *args)
        result = super().call(__context, __obj, *args, **kwargs)
        return built(result, _name(__obj), inputs)

    def call_binop(self, context, operator: str, left: Any, right: Any) -> Any:
        before_binop(operator, left, right)
        read(left, right, deep=False)
        result = super().call_binop(context, operator, left, right)
        return built(result, operator, (left, right), nested=False)

    def wrap_str_format(self, value: Any) -> Callable[..., str] | None:
        formats = super().wrap_str_format(value)
        if formats is None:
            return None
        text, what = value.__self__, f"str.{value.__name__}"

        @functools.wraps(formats)
        def checked(*args: Any, **kwargs: Any) -> str:
            read(text, *args, *kwargs.values())
            if what == "str.format_map":
                given = args[0] if args and isinstance(args[0], Mapping) else {}
                str_format(text, (), given, what)
            else:
                str_format(text, args, kwargs, what)
            return formats(*args, **kwargs)

        return checked

    def _parse(self, source: str, name: str | None, filename: str | None) -> nodes.Template:
        return _Budgeted().visit(super()._parse(source, name, filename))


# The options of jinja2.Environment that transformers may set (all but how templates load).
_OPTIONS = [
    p
    for p in inspect.signature(jinja2.Environment.__init__).parameters
    if p not in ("self", "extensions", "loader", "cache_size", "auto_reload", "bytecode_cache")
    and p != "enable_async"  # kept as `is_async`; transformers renders synchronously
]


def _output(theirs: Callable | None) -> Callable:
    """Jinja's `finalize`, which every value a template outputs goes through (its literal
    text is counted by _Budgeted): printed and counted, after transformers' own finalize if it
    sets one."""

    @jinja2.pass_context
    def finalize(context: Any, value: Any) -> str:
        if theirs is not None:
            value = theirs(value)
        text = value if type(value) is str else printed(value, "output")
        if len(text) > MAX_CHARS:
            refuse_chars(len(text), "output")
        charge(len(text))
        return text

    return finalize


def budgeted(theirs: jinja2.Environment) -> BudgetedEnvironment:
    """transformers' environment `theirs`, copied with the budget's hooks. What it configures
    is copied, not restated, so a transformers release that adds a filter or global brings it
    here too (checked like the others)."""
    options = {name: getattr(theirs, name) for name in _OPTIONS}
    env = BudgetedEnvironment(
        extensions=[type(e) for e in theirs.extensions.values()],
        **{**options, "finalize": _output(theirs.finalize)},
    )
    env.filters.update(theirs.filters)
    env.filters.update({name: _checked_filter(name, f) for name, f in env.filters.items()})
    env.tests.update({n: _checked_test(f) for n, f in env.tests.items() if n in READING_TESTS})
    env.globals.update(theirs.globals)
    for name in GLOBALS.keys() & env.globals.keys():
        env.globals[name] = _checked_global(env.globals[name], GLOBALS[name])
    env.filters.update(
        snug_counted=_counted,
        snug_spend=_spend,
        snug_read=_read,
        snug_read_container=_read_container,
        snug_concat=_concat,
        snug_copied=_copied,
    )
    env.globals["range"] = _counted_range
    return env
