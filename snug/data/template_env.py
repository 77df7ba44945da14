"""The environment chat templates render in: transformers' (snug/data/render.py copies it),
with hooks that count what a render spends against its budget (snug/data/template_budget.py):
every call (functions, macros, methods; a method of a string checked for what it will build,
snug/data/template_sizes.py), the operators `*`, `**`, `%` and `//` (`+` is rewritten),
`str.format`, every filter and the tests that read, and every value output (`finalize`); and
a rewrite of each template's syntax tree for what the hooks do not see
(snug/data/template_rewrite.py).
"""

from __future__ import annotations

import functools
import inspect
import types
from collections.abc import Callable, Mapping
from typing import Any

import jinja2
from jinja2 import TemplateRuntimeError, nodes
from jinja2.runtime import LoopContext, Macro
from jinja2.sandbox import ImmutableSandboxedEnvironment

from snug.data import template_budget as budget
from snug.data.template_budget import (
    CONTAINERS,
    COPY_CHARS,
    MAX_CHARS,
    TRACKED,
    built,
    captured,
    check,
    printed,
    read,
    scanned,
    spend,
)
from snug.data.template_rewrite import INTERNAL, counted, rewrite
from snug.data.template_sizes import (
    GLOBALS,
    before_binop,
    before_filter,
    before_method,
    str_format,
)

ARGS_PER_STEP = 8  # arguments of a call that count as one more step

# Jinja's tests whose time depends on what they read (the others look at a type or a flag).
COMPARING_TESTS = frozenset(
    "in eq equalto == ne != lt < lessthan le <= gt > greaterthan ge >=".split()
)
READING_TESTS = COMPARING_TESTS | {"lower", "upper"}
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


def _checked_test(name: str, func: Callable) -> Callable:
    skip = _skip(func)
    reads = (lambda *values: [scanned(v) for v in values]) if name in COMPARING_TESTS else read

    @functools.wraps(func)
    def checked(*args: Any, **kwargs: Any) -> Any:
        reads(*args[skip:], *kwargs.values())
        return func(*args, **kwargs)

    return checked


def _checked_global(func: Callable, before: Callable[..., None]) -> Callable:
    @functools.wraps(func)
    def checked(*args: Any, **kwargs: Any) -> Any:
        before(*args, **kwargs)
        return func(*args, **kwargs)

    return checked


class BudgetedEnvironment(ImmutableSandboxedEnvironment):
    """transformers' chat template environment with a budget of steps and sizes (see the
    module)."""

    intercepted_binops = frozenset({"*", "**", "+", "%", "//"})

    def call(__self, __context, __obj, *args, **kwargs):  # noqa: N805 (jinja2's signature)
        spend(1 + len(args) // ARGS_PER_STEP)
        kind = type(__obj)
        if kind is types.BuiltinMethodType or kind is types.MethodType:  # str.strip, dict.get
            return __self._call_method(__context, __obj, args, kwargs)
        if kind is Macro:  # its text, counted as it was output, is now a value
            text = super().call(__context, __obj, *args, **kwargs)
            if "caller" in kwargs:  # of a {% call %} block, which outputs it as it is
                return text
            return captured(text, __obj.name)
        if kind is LoopContext:  # loop(items) of a recursive loop
            args = (counted(__context, args[0]), *args[1:]) if args else args
            return captured(super().call(__context, __obj, *args, **kwargs), "loop")
        return built(super().call(__context, __obj, *args, **kwargs), __obj, args)

    def _call_method(self, context: Any, method: Any, args: tuple, kwargs: dict) -> Any:
        """A method of a value: what it reads is spent, and what it will build checked first
        (a mapping's look-up reads nothing)."""
        owner, name = method.__self__, method.__name__
        if name in LOOKUPS and (type(owner) is dict or isinstance(owner, Mapping)):
            return super().call(context, method, *args, **kwargs)
        given = {k: v for k, v in kwargs.items() if k not in JINJA_KWARGS}
        if isinstance(owner, (str, bytes, range, *CONTAINERS)):  # not an extension's own
            read(owner)
        read(*args, *given.values())
        args = before_method(owner, name, args, given) or args
        return built(super().call(context, method, *args, **kwargs), method, (owner, *args))

    def call_binop(self, context, operator: str, left: Any, right: Any) -> Any:
        if type(left) is str and type(right) is str and operator == "+":  # the usual case
            if len(left) + len(right) < TRACKED:
                return left + right
        before_binop(operator, left, right)
        result = super().call_binop(context, operator, left, right)
        return built(result, operator, (left, right), nested=False)

    def wrap_str_format(self, value: Any) -> Callable[..., str] | None:
        kind = type(value)
        if kind is not types.BuiltinMethodType and kind is not types.MethodType:
            return None  # (as jinja2 finds, at once: it runs on every attribute)
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
        return rewrite(super()._parse(source, name, filename))

    def call_filter(self, name: str, *args: Any, **kwargs: Any) -> Any:
        """A filter called by its name (`map('trim')`): never one of INTERNAL."""
        if name in INTERNAL:
            raise TemplateRuntimeError(f"No filter named {name!r}.")
        return super().call_filter(name, *args, **kwargs)


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
        spent = budget.current()  # output(len(text)) inline: it runs for every value
        spent.output += len(text)
        spent.steps += len(text) / COPY_CHARS
        if spent.output > MAX_CHARS or spent.steps > spent.limit:
            check(spent)
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
    env.tests.update({n: _checked_test(n, f) for n, f in env.tests.items() if n in READING_TESTS})
    env.globals.update(theirs.globals)
    for name in GLOBALS.keys() & env.globals.keys():
        env.globals[name] = _checked_global(env.globals[name], GLOBALS[name])
    env.filters.update(INTERNAL)
    return env
