"""Render a chat template within a budget of steps, with errors that name the template.

A chat template is code that came with a model (or a config), and Jinja runs it to the end:
two nested loops of 100,000 never finish for any practical purpose, and the sandbox's only
bound, 100,000 items per `range()`, does not stop them. transformers' `apply_chat_template`
renders in its own sandboxed environment and offers no budget, so snug renders through an
environment of its own, built like the one transformers builds (every constructor option,
filter, global and extension copied from it, so `tojson`, `raise_exception`, `namespace`,
`{% generation %}` ... behave as there) and differing only in the budget:

- every loop iteration, every call (functions, macros, methods) and every item of a `range()`
  is a step; a render stops after MAX_STEPS (a step count, not a time limit: the same template
  and conversation fail the same way on any machine, however busy);
- a string or list repeated (`*`) past MAX_ITEMS items, or a power (`**`) past MAX_BITS bits,
  is refused before Python builds it (both would otherwise hold a single step for hours).

The text rendered is transformers' for the conversations snug renders (messages of a role and
a content string), which `tests/test_bombs.py` checks byte by byte.
"""

from __future__ import annotations

import functools
import inspect
from collections.abc import Iterable, Iterator
from contextvars import ContextVar
from typing import Any

import jinja2
from jinja2 import nodes
from jinja2.sandbox import ImmutableSandboxedEnvironment, safe_range

from snug.data.formats import DataError
from snug.errors import first_line

MAX_STEPS = 1_000_000  # a render of a 3,000-turn conversation by a usual template takes ~15,000
MAX_ITEMS = 1_000_000  # characters (or items) a `*` may build
MAX_BITS = 1 << 16  # bits a `**` may build (a number of ~20,000 digits)


class TemplateError(DataError):
    """No usable chat template, or one that cannot render (a DataError: the data cannot be
    rendered); stops a run whatever data.on_error says."""


class TemplateRefused(DataError):
    """The template refuses one conversation (its `raise_exception`, or an error in its code on
    these messages): a problem of that record, which data.on_error=skip drops (unlike a
    TemplateError, a problem of the template itself)."""


class ChatTemplate(str):
    """A chat template's Jinja source that knows where it came from (a file, or a built-in
    named by data.template), for errors. Everywhere else it is the plain string."""

    origin: str

    def __new__(cls, source: str, origin: str) -> ChatTemplate:
        template = super().__new__(cls, source)
        template.origin = origin
        return template

    def __reduce__(self):
        return ChatTemplate, (str(self), self.origin)


class _OverBudget(Exception):
    """Raised inside a render: not a jinja2 error, so nothing of jinja2 or transformers takes
    it for one of the template's own."""


_steps_left: ContextVar[list[int]] = ContextVar("chat_template_steps")


def _spend(steps: int) -> None:
    left = _steps_left.get()
    left[0] -= steps
    if left[0] < 0:
        raise _OverBudget(
            f"did not finish within {MAX_STEPS:,} steps (loop iterations, calls and range() items)"
        )


@jinja2.pass_context  # never called at compile time (constant folding skips context filters)
def _counted(context: Any, iterable: Iterable) -> Iterator:
    for item in iterable:
        _spend(1)
        yield item


def _counted_range(*args: int) -> range:
    items = safe_range(*args)
    _spend(max(len(items), 1))
    return items


class BudgetedEnvironment(ImmutableSandboxedEnvironment):
    """transformers' chat template environment with a budget of steps (see the module)."""

    intercepted_binops = frozenset({"*", "**"})

    def call(__self, __context, __obj, *args, **kwargs):  # noqa: N805 (jinja2's signature)
        _spend(1)
        return super().call(__context, __obj, *args, **kwargs)

    def call_binop(self, context, operator: str, left: Any, right: Any) -> Any:
        if operator == "*":
            for seq, times in ((left, right), (right, left)):
                if isinstance(seq, (str, list, tuple)) and isinstance(times, int):
                    if len(seq) * times > MAX_ITEMS:
                        raise _OverBudget(f"repeats a value to more than {MAX_ITEMS:,} items")
        if operator == "**" and isinstance(left, int) and isinstance(right, int) and right > 0:
            if abs(left) > 1 and right * abs(left).bit_length() > MAX_BITS:
                raise _OverBudget(f"raises a number to more than {MAX_BITS:,} bits")
        return super().call_binop(context, operator, left, right)

    def _parse(self, source: str, name: str | None, filename: str | None) -> nodes.Template:
        """The template's syntax tree with every loop's items counted as they are taken."""
        tree = super()._parse(source, name, filename)
        for loop in tree.find_all(nodes.For):
            loop.iter = nodes.Filter(
                loop.iter, "snug_counted", [], [], None, None, lineno=loop.iter.lineno
            )
        return tree


# The options of jinja2.Environment that transformers may set (all but how templates load).
_OPTIONS = [
    p
    for p in inspect.signature(jinja2.Environment.__init__).parameters
    if p not in ("self", "extensions", "loader", "cache_size", "auto_reload", "bytecode_cache")
    and p != "enable_async"  # kept as `is_async`; transformers renders synchronously
]


@functools.cache
def _environment() -> BudgetedEnvironment:
    # transformers builds its environment inside a private function and keeps no handle on it;
    # the template it compiles carries it. What it configures there is copied, not restated,
    # so a transformers release that adds a filter or global brings it here too.
    from transformers.utils.chat_template_utils import _cached_compile_jinja_template

    theirs = _cached_compile_jinja_template("").environment
    env = BudgetedEnvironment(
        extensions=[type(e) for e in theirs.extensions.values()],
        **{name: getattr(theirs, name) for name in _OPTIONS},
    )
    env.filters.update(theirs.filters)
    env.globals.update(theirs.globals)
    env.filters["snug_counted"] = _counted
    env.globals["range"] = _counted_range
    return env


@functools.lru_cache(maxsize=16)
def _compiled(source: str) -> jinja2.Template:
    return _environment().from_string(source)


def origin_of(template: str) -> str:
    return template.origin if isinstance(template, ChatTemplate) else "the chat template"


def render_chat(
    tok: Any, template: str, messages: list[dict], add_generation_prompt: bool, where: str = ""
) -> str:
    """`messages` rendered by `template` as `tok.apply_chat_template(messages, tokenize=False)`
    renders them (the tokenizer's special tokens as variables), within MAX_STEPS steps.
    TemplateError names the template when it cannot compile, runs out of steps or does what
    the sandbox forbids; TemplateRefused (naming `where` the messages are from) when it refuses
    these messages."""
    origin = origin_of(template)
    try:
        compiled = _compiled(str(template))
    except jinja2.TemplateSyntaxError as e:
        raise TemplateError(
            f"{origin} line {e.lineno}: not a valid Jinja template ({e.message}); fix it, or "
            "set data.template to a built-in template."
        ) from None
    token = _steps_left.set([MAX_STEPS])
    try:
        return compiled.render(
            messages=messages,
            tools=None,
            documents=None,
            add_generation_prompt=add_generation_prompt,
            **tok.special_tokens_map,
        )
    except _OverBudget as e:
        raise TemplateError(
            f"{origin}: the chat template {e} while rendering one conversation of "
            f"{len(messages)} messages; it loops without end or builds values far larger than "
            "any conversation: fix it, or set data.template to a built-in template."
        ) from None
    except jinja2.exceptions.SecurityError as e:
        raise TemplateError(
            f"{origin}: the chat template tried what the sandbox forbids ({first_line(e).rstrip('.')}); do "
            "not use it: set data.template to a built-in template."
        ) from None
    except RecursionError:
        raise TemplateError(
            f"{origin}: the chat template calls itself without end (a macro or recursive "
            "loop); fix it, or set data.template to a built-in template."
        ) from None
    except Exception as e:  # noqa: BLE001 (a template's code can raise any type on bad input)
        at = f"{where}: " if where else ""
        raise TemplateRefused(
            f"{at}the chat template ({origin}) refuses this conversation ({first_line(e)})."
        ) from None
    finally:
        _steps_left.reset(token)
