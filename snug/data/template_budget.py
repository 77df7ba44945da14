"""What one render of a chat template may spend: steps (its time) and what it builds (its memory).

A chat template is code that came with a model, and Jinja's sandbox keeps it from the files and
the interpreter but not from the machine's time and memory: `''.ljust(200000000)` builds
200 MB in one expression, a string doubled by `~` in a loop of 34 steps builds 17 GB, and one
`'x' in s` over a long string reads millions of characters in a single step. So a render
counts, in a budget of its own:

- steps: every loop iteration, call (function, macro, method, filter) and `range()` item is a
  step, and so is every STEP_UNITS characters that a call, filter, operator, comparison or
  test reads (an item read counts as ITEM_UNITS characters: a step) or builds, or that the
  template outputs. A render stops after MAX_STEPS: a count, not a time, so a template fails the same
  way on any machine, and no step can read or build much more than its share.
- what it builds: no string past MAX_CHARS characters, no list (tuple, dict) past MAX_ITEMS
  items, no number past MAX_BITS bits, and no more than MAX_BUILT characters and items in all
  (every string and list a call, filter or operator returns, and everything output, counted
  once when built), which bounds what a render can hold, also across the frames of a macro
  that calls itself. An operation whose result size can be told from its arguments (a width,
  a count, a separator, a format) is refused before Python builds it
  (snug/data/template_sizes.py); the rest is checked as it comes back.

No library bounds a Jinja render's memory (jinja2's sandbox bounds only `range()`), and a
process-wide limit (RLIMIT_AS) would also bound the model loaded beside the render.
"""

from __future__ import annotations

from collections.abc import Iterator
from contextvars import ContextVar, Token
from dataclasses import dataclass
from itertools import chain
from typing import Any, NamedTuple

from jinja2.runtime import LoopContext
from jinja2.utils import Namespace

MAX_STEPS = 1_000_000  # a 3,000-turn conversation by a usual template takes 6,000 to 35,000
STEP_UNITS = 100  # characters read or built per step
ITEM_UNITS = 100  # characters an item read counts as: a step (a filter's Python loop over it,
# such as `sort`'s key, costs about what a loop iteration costs)
MAX_CHARS = 10_000_000  # characters of any string a template builds, and of what it renders
MAX_ITEMS = 1_000_000  # items of any list, tuple or dict it builds
MAX_BUILT = 40_000_000  # characters and items it builds in all, output included
MAX_BITS = 1 << 16  # bits of a number it builds (a number of ~20,000 digits)
MAX_SOURCE = 1_000_000  # characters of a template's source (real ones hold a few thousand)

CONTAINERS = (list, tuple, set, frozenset, dict)
_NUMBERS = {int, float, bool, type(None)}
_END = object()


class OverBudget(Exception):
    """Raised inside a render: not a jinja2 error, so nothing of jinja2 or transformers takes
    it for one of the template's own."""


@dataclass
class _Spent:
    steps: int = 0
    built: int = 0


_spent: ContextVar[_Spent] = ContextVar("chat_template_budget")


def start() -> Token:
    """A new budget for one render, until `_spent.reset(token)` (the checks find none at
    compile time, where Jinja folds constant expressions, and so never run there)."""
    return _spent.set(_Spent())


def stop(token: Token) -> None:
    _spent.reset(token)


def spend(steps: int) -> None:
    spent = _spent.get()
    spent.steps += steps
    if spent.steps > MAX_STEPS:
        raise OverBudget(
            f"did not finish within {MAX_STEPS:,} steps (loop iterations, calls, range() items, "
            f"and each {STEP_UNITS} characters or items read or built)"
        )


def refuse_chars(n: int, what: str) -> None:
    if n > MAX_CHARS:
        raise OverBudget(f"builds a string of more than {MAX_CHARS:,} characters ({what})")


def refuse_items(n: int, what: str) -> None:
    if n > MAX_ITEMS:
        raise OverBudget(f"builds a list of more than {MAX_ITEMS:,} items ({what})")


def refuse_bits(n: int, what: str) -> None:
    if n > MAX_BITS:
        raise OverBudget(f"builds a number of more than {MAX_BITS:,} bits ({what})")


class Size(NamedTuple):
    chars: int  # characters (printed: about len(str(value)))
    items: int  # container items, at any depth
    depth: int  # containers nested


def size_of(value: Any, printed: bool = False, limit: int = MAX_CHARS) -> Size:
    """The characters and items of `value` and of what it holds, at any depth (a list of a
    thousand references to one long string counts it a thousand times: so does reading or
    printing it). `printed`: about len(str(value)), brackets, quotes and numbers included.
    Counting stops soon after `limit`, so it costs about what it counts, which is spent (an
    item as ITEM_UNITS characters: walking one costs about that)."""
    if type(value) is str:  # the usual case, at once
        spend(len(value) // STEP_UNITS)
        return Size(len(value), 0, 0)
    chars = items = depth = 0
    stack: list[Iterator] = [iter((value,))]
    while stack and chars + items <= limit:
        v = next(stack[-1], _END)
        if v is _END:
            stack.pop()
        elif isinstance(v, (str, bytes)):
            chars += len(v) + (2 if printed and len(stack) > 1 else 0)
        elif isinstance(v, CONTAINERS):
            items += len(v)
            depth = max(depth, len(stack))
            chars += 2 * len(v) + 2 if printed else 0
            if isinstance(v, dict):
                stack.append(chain(v.keys(), v.values()))
                continue
            kinds = set(map(type, v))  # a list of strings or numbers, counted at C speed
            if kinds <= {str}:
                chars += sum(map(len, v)) + (2 * len(v) if printed else 0)
            elif kinds <= {int, bool}:
                chars += sum(map(int.bit_length, v)) // 3 if printed else 0
            elif printed or not kinds <= _NUMBERS:
                stack.append(iter(v))
        elif isinstance(v, Namespace):  # prints as <Namespace {its attributes}>
            stack.append(iter((object.__getattribute__(v, "_Namespace__attrs"),)))
            chars += 12 if printed else 0
        elif printed and isinstance(v, int):
            chars += v.bit_length() // 3 + 2
        elif printed:
            chars += 100  # a float, None, a macro or loop: a short text
    spend((chars + ITEM_UNITS * items) // STEP_UNITS)
    return Size(chars, items, depth)


def read(*values: Any, deep: bool = True) -> None:
    """Spend the steps of reading `values` whole (searching, comparing, copying them); not
    `deep`: the lists themselves, not what they hold (`+` and `*` copy references)."""
    for value in values:
        if type(value) is str:
            spend(len(value) // STEP_UNITS)
        elif deep:
            size_of(value, limit=MAX_BUILT)
        elif isinstance(value, (bytes, *CONTAINERS)):
            spend(len(value) * (1 if isinstance(value, bytes) else ITEM_UNITS) // STEP_UNITS)


def printed(value: Any, what: str) -> str:
    """str(value), refused before it is built when it would pass MAX_CHARS."""
    if type(value) is str:
        return value
    refuse_chars(size_of(value, printed=True).chars, what)
    return str(value)


def charge(units: int, steps: int = 0) -> None:
    """Count `units` characters or items built, and their steps (and `steps` more)."""
    spent = _spent.get()
    spent.built += units
    if spent.built > MAX_BUILT:
        raise OverBudget(f"builds more than {MAX_BUILT:,} characters and items in all")
    spent.steps += steps + units // STEP_UNITS
    if spent.steps > MAX_STEPS:
        spend(0)  # says why


def built(value: Any, what: str, inputs: tuple = (), nested: bool = True) -> Any:
    """`value`, which an operation on `inputs` returned, counted against the budget: a string
    or list past its bound, or past MAX_BUILT in all, stops the render. `nested`: also count
    the strings and lists it holds (a split or a groupby builds them too). An iterator is
    counted item by item as it is taken, and may yield no more than MAX_ITEMS."""
    if isinstance(value, (str, bytes)):
        refuse_chars(len(value), what)
        units = len(value)
    elif isinstance(value, CONTAINERS):
        refuse_items(len(value), what)
        units = len(value)
        if nested and units:
            parts = value.values() if isinstance(value, dict) else value
            units += sum(len(p) for p in parts if isinstance(p, (str, bytes, *CONTAINERS)))
    elif isinstance(value, Iterator) and not isinstance(value, LoopContext):
        return _built_each(value, what)
    else:
        return value
    if units and not any(value is i for i in inputs):  # handed back, not built
        charge(units)
    return value


def _built_each(items: Iterator, what: str) -> Iterator:
    for taken, item in enumerate(items, 1):
        refuse_items(taken, what)
        yield built(item, what)
