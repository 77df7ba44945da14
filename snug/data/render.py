"""Render a chat template within a budget, with errors that name the template.

A chat template is code that came with a model (or a config), and Jinja runs it to the end:
two nested loops of 100,000 never finish for any practical purpose, `''.ljust(200000000)`
builds 200 MB in one expression, and the sandbox's only bound, 100,000 items per `range()`,
stops neither. transformers' `apply_chat_template` renders in its own sandboxed environment
and offers no budget, so snug renders through an environment of its own, built like the one
transformers builds (every constructor option, filter, global and extension copied from it,
so `tojson`, `raise_exception`, `namespace`, `{% generation %}` ... behave as there) and
differing only in the budget of steps and sizes (snug/data/template_budget.py), which its
hooks and a rewrite of the template's syntax tree count (snug/data/template_env.py).

The text rendered is transformers' for the conversations snug renders (messages of a role and
a content string), which `tests/test_bombs.py` checks byte by byte.
"""

from __future__ import annotations

import functools
from typing import Any

import jinja2

from snug.data.formats import DataError
from snug.data.template_budget import (
    BASE_STEPS,
    CHARS_PER_STEP,
    MAX_CHARS,
    MAX_SOURCE,
    STEPS_PER_MESSAGE,
    OutOfSteps,
    OverBudget,
    start,
    stop,
)
from snug.data.template_env import BudgetedEnvironment, budgeted
from snug.errors import first_line

# The transformers release whose chat template environment this one was last compared with,
# byte by byte (tests/test_bombs.py); snug builds on its private
# `_cached_compile_jinja_template`, which a later release may rename.
TESTED_TRANSFORMERS = "5.25.0"


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


def _their_environment() -> jinja2.Environment:
    """transformers' chat template environment, or one line naming the release snug needs.
    transformers builds it inside a private function and keeps no handle on it; the template
    it compiles carries it."""
    import transformers

    try:
        from transformers.utils.chat_template_utils import _cached_compile_jinja_template

        return _cached_compile_jinja_template("").environment
    except (ImportError, AttributeError):
        raise TemplateError(
            f"transformers {transformers.__version__} no longer has the chat template "
            "environment snug renders in (transformers.utils.chat_template_utils."
            "_cached_compile_jinja_template); install the release snug is tested with: "
            f"pip install 'transformers=={TESTED_TRANSFORMERS}'."
        ) from None


@functools.cache
def _environment() -> BudgetedEnvironment:
    return budgeted(_their_environment())


@functools.lru_cache(maxsize=16)
def _compiled(source: str) -> jinja2.Template:
    return _environment().from_string(source)


def origin_of(template: str) -> str:
    return template.origin if isinstance(template, ChatTemplate) else "the chat template"


def _reason(e: Exception) -> str:
    """The first line of why a template refused a conversation, of at most 300 characters
    (a template can raise a text as long as it likes, or a list of them)."""
    if all(isinstance(a, (int, float)) or isinstance(a, str) and len(a) <= 300 for a in e.args):
        return first_line(e)
    text = next((a for a in e.args if isinstance(a, str)), "")[:300].strip()
    return text.splitlines()[0] if text else type(e).__name__


def _out_of_steps(origin: str, where: str, count: int, steps: int) -> DataError:
    """A render past its steps: the template's problem on a conversation shorter than the one
    that doubles the budget (a template that needs more than BASE_STEPS for it loops without
    end, or far beyond the conversation: it would fail on every record), that conversation's
    on a longer one (a template whose steps grow faster than the conversation meets one long
    enough sooner or later: data.on_error=skip drops it)."""
    budget = (
        f"{BASE_STEPS:,} steps, {STEPS_PER_MESSAGE:,} more a message and one more per "
        f"{CHARS_PER_STEP} characters"
    )
    if steps - BASE_STEPS < BASE_STEPS:
        return TemplateError(
            f"{origin}: the chat template did not finish within {budget} ({steps:,} for "
            f"one conversation of {count:,} messages); it loops without end or far beyond "
            "the conversation: fix it, or set data.template to a built-in template."
        )
    at = f"{where}: " if where else ""
    return TemplateRefused(
        f"{at}the chat template ({origin}) did not finish this conversation of {count:,} "
        f"messages within {steps:,} steps ({budget}): its work grows faster than the "
        "conversation."
    )


def render_chat(
    tok: Any,
    template: str,
    messages: list[dict],
    add_generation_prompt: bool,
    where: str = "",
    tools: list[dict] | None = None,
) -> str:
    """`messages` rendered by `template` as `tok.apply_chat_template(messages, tokenize=False,
    tools=tools)` renders them (the tokenizer's special tokens as variables), within the budget of steps and
    sizes. TemplateError names the template when it cannot compile, spends past its budget
    (its steps on a conversation of under 500 messages), runs out of memory or does what the
    sandbox forbids; TemplateRefused (naming `where` the messages are from) when it refuses
    these messages, or spends past its steps on a longer conversation."""
    origin = origin_of(template)
    if len(template) > MAX_SOURCE:
        raise TemplateError(
            f"{origin}: the chat template is more than {MAX_SOURCE:,} characters long; is it "
            "the right file? Set data.template to a built-in template."
        )
    try:
        compiled = _compiled(template)  # (a ChatTemplate keeps its hash: not str())
    except jinja2.TemplateSyntaxError as e:
        raise TemplateError(
            f"{origin} line {e.lineno}: not a valid Jinja template ({e.message}); fix it, or "
            "set data.template to a built-in template."
        ) from None
    token = start(messages)
    try:
        text = compiled.render(
            messages=messages,
            tools=tools,
            documents=None,
            add_generation_prompt=add_generation_prompt,
            **tok.special_tokens_map,
        )
        if len(text) > MAX_CHARS:
            raise OverBudget(f"renders more than {MAX_CHARS:,} characters")
        return text
    except Exception as e:  # noqa: BLE001 (a template's code can raise any type on bad input)
        raise _problem(e, origin, where, len(messages)) from None
    finally:
        stop(token)


def _problem(e: Exception, origin: str, where: str, count: int) -> DataError:
    """What a render that raised `e` says: a TemplateError when the template is at fault, a
    TemplateRefused when these messages are (or the template refuses them)."""
    fix = "fix it, or set data.template to a built-in template."
    if isinstance(e, OutOfSteps):
        return _out_of_steps(origin, where, count, e.steps)
    if isinstance(e, OverBudget):
        return TemplateError(
            f"{origin}: the chat template {e} while rendering one conversation of {count:,} "
            f"messages; it loops without end or builds values far larger than a conversation: "
            + fix
        )
    if isinstance(e, MemoryError):
        return TemplateError(
            f"{origin}: the chat template ran out of memory while rendering one conversation "
            f"of {count:,} messages; " + fix
        )
    if isinstance(e, jinja2.exceptions.SecurityError):
        return TemplateError(
            f"{origin}: the chat template tried what the sandbox forbids "
            f"({_reason(e).rstrip('.')}); do not use it: set data.template to a built-in template."
        )
    if isinstance(e, RecursionError):
        return TemplateError(
            f"{origin}: the chat template calls itself without end (a macro or recursive "
            "loop); " + fix
        )
    at = f"{where}: " if where else ""
    return TemplateRefused(
        f"{at}the chat template ({origin}) refuses this conversation ({_reason(e)})."
    )
