"""What one render of a chat template may spend: steps (its time) and what it holds (its memory).

A chat template is code that came with a model, and Jinja's sandbox keeps it from the files and
the interpreter but not from the machine's time and memory: `''.ljust(200000000)` builds
200 MB in one expression, a string doubled by `~` in a loop of 34 steps builds 17 GB, and one
`'x' in s` over a long string reads millions of characters in a single step. So a render
counts, in a budget of its own:

- steps, its time: each loop item, call (function, macro, method, filter) and each 10 nodes
  of a loop's, macro's or branch's body as it runs is a step (snug/data/template_rewrite.py);
  so is each COPY_CHARS characters copied, compared or searched at memory speed (`+`, `~`,
  slices, `==`, `in`, what is output), each READ_CHARS characters that a filter, method or
  test works through character by character, each item read, each MADE_ITEMS items of a
  list a call makes and each COPY_ITEMS of one copied. A render may take BASE_STEPS, and
  STEPS_PER_MESSAGE more for each message and one more for each CHARS_PER_STEP characters of
  the conversation (`limit`): a count, not a time, so a template fails the same way on any
  machine, and no step takes much longer than a loop item (a microsecond or two).
- what it holds, its memory: no string past MAX_CHARS characters, no list (tuple, dict) past
  MAX_ITEMS items, no number past MAX_BITS bits, no more than MAX_CHARS characters output and
  not yet taken into a value (rendered, or being rendered inside a macro or a `{% set %}`
  block), and no more than MAX_HELD characters held at once by the values it built (an item
  of a list counts as ITEM_CHARS). Those of TRACKED characters or more are tracked while they
  live, so what counts is what is held, not what was ever built: `+` on a growing text
  copies it each time, and each copy dropped at once holds nothing. An operation whose
  result size can be told from its arguments (a width, a count, a separator, a format) is
  refused before Python builds it (snug/data/template_sizes.py); the rest is checked as it
  comes back.

No library bounds a Jinja render's time or memory (jinja2's sandbox bounds only `range()`), and
a process-wide limit (RLIMIT_AS) would also bound the model loaded beside the render.
"""

from __future__ import annotations

import gc
from collections.abc import Iterable, Iterator
from contextvars import ContextVar, Token
from dataclasses import dataclass, field
from itertools import chain
from sys import getrefcount
from typing import Any, NamedTuple

from jinja2.runtime import LoopContext
from jinja2.utils import Namespace

BASE_STEPS = 1_000_000  # a render's steps, whatever the conversation (a few seconds at most)
STEPS_PER_MESSAGE = 2_000  # more steps for each message: room for a template that scans back
# over the messages before each one (trl's gemma4.jinja renders 1,000 turns in 2.9 of the 5.0
# million steps it may take then; refused from about 1,600 turns)
CHARS_PER_STEP = 10  # characters of the conversation that give one more step (room to read
# each character ten times, READ_CHARS at a step)
READ_CHARS = 100  # characters per step a filter, method or test reads (up to ~5 ns each:
# `split`, `title`, `list`)
COPY_CHARS = 10_000  # characters per step copied, compared or searched (memcpy speed, ~0.1 ns
# each, against about a microsecond for a loop item)
COPY_ITEMS = 3_000  # items of a list per step copied (~3 ns each: referenced, then let go)
ITEM_CHARS = 8  # an item of a list held counts as this many characters (a pointer's bytes)
MADE_ITEMS = 30  # items per step of a list a call or filter makes (`split`: ~60 ns an item)
DIGITS_SQUARED_PER_STEP = 50_000  # a whole number of 4,000 digits prints in ~0.2 ms
LET_GO_PER_STEP = 2  # values checked per step when looking for those no longer held (~0.4 us)

MAX_CHARS = 10_000_000  # characters of any string a template builds, and of what it renders
MAX_ITEMS = 1_000_000  # items of any list, tuple or dict it builds
MAX_HELD = 40_000_000  # characters the values it built hold at once (an item: ITEM_CHARS)
TRACKED = 1_000  # characters from which a value built is tracked while it lives
MAX_BITS = 1 << 16  # bits of a number it builds (a number of ~20,000 digits)
MAX_SOURCE = 1_000_000  # characters of a template's source (real ones hold a few thousand)

CONTAINERS = (list, tuple, set, frozenset, dict)
NUMBERS = frozenset({int, float, bool, type(None)})
_END = object()


class OverBudget(Exception):
    """Raised inside a render: not a jinja2 error, so nothing of jinja2 or transformers takes
    it for one of the template's own."""


class OutOfSteps(OverBudget):
    """The render spent the `steps` it may take (render.py says whose problem that is)."""

    def __init__(self, steps: int) -> None:
        super().__init__(steps)
        self.steps = steps


@dataclass
class _Spent:
    limit: float  # steps this render may take (before those of the conversation's characters)
    messages: list | None  # the conversation, until its characters are counted into `limit`
    steps: float = 0.0
    output: int = 0  # characters output and not yet taken into a value (a macro's, a block's)
    held: int = 0  # characters of the values in `values`
    values: dict[int, tuple[Any, int]] = field(default_factory=dict)  # id -> (value, size)
    collected: bool = False  # gc.collect() ran once, before refusing what reference cycles hold


_spent: ContextVar[_Spent] = ContextVar("chat_template_budget")


def limit(messages: list[dict]) -> int:
    """The steps a render of `messages` may take: BASE_STEPS, and more for a longer
    conversation (so a long conversation under a template whose steps grow with the square of
    the messages renders, as transformers renders it)."""
    texts = (m.get("content") for m in messages if isinstance(m, dict))
    chars = sum(len(text) for text in texts if isinstance(text, str))
    return BASE_STEPS + STEPS_PER_MESSAGE * len(messages) + chars // CHARS_PER_STEP


def start(messages: list[dict]) -> Token:
    """A new budget for one render of `messages`, until `stop(token)` (the checks find none at
    compile time, where Jinja folds constant expressions, and so never run there). Its
    characters are counted only if the render needs their steps."""
    return _spent.set(_Spent(BASE_STEPS + STEPS_PER_MESSAGE * len(messages), messages))


def stop(token: Token) -> None:
    _spent.reset(token)


current = _spent.get  # this render's budget (a C call: the counting in loops calls it)


def check(spent: _Spent) -> None:
    """Stop the render if it is past its steps or output."""
    if spent.output > MAX_CHARS:
        raise OverBudget(f"renders more than {MAX_CHARS:,} characters")
    if spent.steps > spent.limit:
        if spent.messages is not None:
            spent.limit, spent.messages = limit(spent.messages), None
        if spent.steps > spent.limit:
            raise OutOfSteps(int(spent.limit))


def spend(steps: float) -> None:
    spent = _spent.get()
    spent.steps += steps
    if spent.steps > spent.limit:
        check(spent)


def output(chars: int) -> None:
    """`chars` characters output (they are held until the render, or the macro or block that
    outputs them, ends)."""
    spent = _spent.get()
    spent.output += chars
    spent.steps += chars / COPY_CHARS
    if spent.output > MAX_CHARS or spent.steps > spent.limit:
        check(spent)


def charge(steps: float, text: int) -> None:
    """A body run: its `steps`, and the `text` it outputs as written in the template."""
    spent = _spent.get()
    spent.steps += steps
    spent.output += text
    if spent.steps > spent.limit or spent.output > MAX_CHARS:
        check(spent)


def captured(value: Any, what: Any) -> Any:
    """`value`, the text a macro, `{% set %}` block or recursive loop output, taken out of
    the output (where it was counted) as a value the template holds."""
    if isinstance(value, str):
        spent = _spent.get()  # (text the template's top level outputs, once, is not counted)
        spent.output = max(spent.output - len(value), 0)
    return built(value, what)


def describe(what: Any) -> str:
    """What built a value, for a refusal: a name, or the callable's (`str.ljust`)."""
    if isinstance(what, str):
        return what
    owner = getattr(what, "__self__", None)
    name = getattr(what, "__name__", type(what).__name__)
    return f"{type(owner).__name__}.{name}" if owner is not None else name


def refuse_chars(n: int, what: Any) -> None:
    if n > MAX_CHARS:
        raise OverBudget(
            f"builds a string of more than {MAX_CHARS:,} characters ({describe(what)})"
        )


def refuse_items(n: int, what: Any) -> None:
    if n > MAX_ITEMS:
        raise OverBudget(f"builds a list of more than {MAX_ITEMS:,} items ({describe(what)})")


def refuse_bits(n: int, what: Any) -> None:
    if n > MAX_BITS:
        raise OverBudget(f"builds a number of more than {MAX_BITS:,} bits ({describe(what)})")


class Size(NamedTuple):
    chars: int  # characters (printed: about len(str(value)))
    items: int  # container items, at any depth
    depth: int  # containers nested


def size_of(
    value: Any, printed: bool = False, limit: int = MAX_CHARS, per_step: int = READ_CHARS
) -> Size:
    """The characters and items of `value` and of what it holds, at any depth (a list of a
    thousand references to one long string counts it a thousand times: so does reading or
    printing it). `printed`: about len(str(value)), brackets, quotes and numbers included.
    Counting stops soon after `limit`, so it costs about what it counts, which is spent: an
    item as a step, and `per_step` characters as one."""
    if type(value) is str:  # the usual case, at once
        spend(len(value) / per_step)
        return Size(len(value), 0, 0)
    chars = items = depth = 0
    slow = 0.0  # steps of printing whole numbers (in time that grows with their digits squared)
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
            elif printed or not kinds <= NUMBERS:
                stack.append(iter(v))
        elif isinstance(v, range):  # prints as range(0, n); read, its items
            items += 0 if printed else len(v)
            chars += 30 if printed else 0
        elif isinstance(v, Namespace):  # prints as <Namespace {its attributes}>
            stack.append(iter((object.__getattribute__(v, "_Namespace__attrs"),)))
            chars += 12 if printed else 0
        elif printed and isinstance(v, int):
            digits = v.bit_length() // 3 + 2
            chars += digits
            slow += digits * digits / DIGITS_SQUARED_PER_STEP if digits > 100 else 0
        elif printed:
            chars += 100  # a float, None, a macro or loop: a short text
    spend(items + chars / per_step + slow)
    return Size(chars, items, depth)


def read(*values: Any, deep: bool = True) -> None:
    """Spend the steps of reading `values` whole, character by character (a filter's, method's
    or test's work); not `deep`: the lists themselves, not what they hold."""
    for value in values:
        kind = type(value)
        if kind is str:
            spend(len(value) / READ_CHARS)
        elif kind in NUMBERS:
            continue
        elif deep:
            size_of(value, limit=MAX_HELD)
        elif isinstance(value, (bytes, *CONTAINERS, range)):
            spend(len(value) / (READ_CHARS if isinstance(value, bytes) else 1))


def scanned(value: Any) -> None:
    """Spend the steps of comparing or searching `value` (at memory speed: `==`, `in`)."""
    kind = type(value)
    if kind is str:
        if len(value) >= COPY_CHARS:
            spend(len(value) / COPY_CHARS)
    elif kind not in NUMBERS:
        size_of(value, limit=MAX_HELD, per_step=COPY_CHARS)


def printed(value: Any, what: str) -> str:
    """str(value), refused before it is built when it would pass MAX_CHARS."""
    if type(value) is str:
        return value
    refuse_chars(size_of(value, printed=True).chars, what)
    return str(value)


def built(value: Any, what: Any, inputs: tuple = (), nested: bool = True) -> Any:
    """`value`, which an operation on `inputs` returned, counted against the budget: a string
    or list past its bound stops the render, and one held with the others past MAX_HELD.
    `nested`: also count the strings and lists it holds (a split or a groupby builds them
    too). An iterator is counted item by item as it is taken, and may yield no more than
    MAX_ITEMS. `what`: its name, or the callable that built it."""
    if type(value) is str and len(value) < TRACKED:  # the usual case: at once (< 0.1 step)
        return value
    if isinstance(value, (str, bytes)):
        size = len(value)
        refuse_chars(size, what)
        steps = size / COPY_CHARS
    elif isinstance(value, CONTAINERS):
        items = len(value)
        refuse_items(items, what)
        chars, steps = 0, items / COPY_ITEMS
        if nested and items:  # made by the call, item by item, with what they hold
            chars, inner = _parts(value.values() if isinstance(value, dict) else value)
            items += inner
            steps = items / MADE_ITEMS + chars / COPY_CHARS
        size = ITEM_CHARS * items + chars
    elif isinstance(value, Iterator) and not isinstance(value, LoopContext):
        return _built_each(value, what)
    else:
        return value
    if size and not any(value is i for i in inputs):  # handed back, not built
        spend(steps)
        if size >= TRACKED:
            hold(value, size)
    return value


def _parts(parts: Iterable) -> tuple[int, int]:
    """The characters of the strings among `parts`, and the items of the lists (at C speed for
    a list of strings or numbers, the usual results)."""
    kinds = set(map(type, parts))
    if kinds <= {str}:
        return sum(map(len, parts)), 0
    if kinds <= NUMBERS:
        return 0, 0
    chars = sum(len(p) for p in parts if isinstance(p, (str, bytes)))
    return chars, sum(len(p) for p in parts if isinstance(p, CONTAINERS))


def _built_each(items: Iterator, what: Any) -> Iterator:
    for taken, item in enumerate(items, 1):
        refuse_items(taken, what)
        yield built(item, what)


def hold(value: Any, size: int) -> None:
    """Track `value` (of `size` characters and items) while the render holds it: past
    MAX_HELD held at once, the values no longer referenced but here are let go, and if
    that is not enough the render stops."""
    spent = _spent.get()
    if id(value) in spent.values:
        return
    spent.values[id(value)] = (value, size)
    spent.held += size
    if spent.held > MAX_HELD:
        _let_go(spent)
        if spent.held > MAX_HELD and not spent.collected:  # or held in reference cycles
            spent.collected = True
            gc.collect()
            _let_go(spent)
        if spent.held > MAX_HELD:
            raise OverBudget(
                f"builds values that hold more than {MAX_HELD:,} characters and items at once"
            )


def _let_go(spent: _Spent) -> None:
    """Forget the tracked values that only this budget still references (CPython frees a
    value as its last reference goes: a copy the template dropped is referenced here only)."""
    spend(len(spent.values) / LET_GO_PER_STEP)
    spent.values, spent.held = _referenced_elsewhere(spent.values)


def _referenced_elsewhere(values: dict[int, tuple[Any, int]]) -> tuple[dict, int]:
    kept, held = {}, 0
    for key, entry in values.items():
        if getrefcount(entry[0]) > _ALONE:
            kept[key] = entry
            held += entry[1]
    return kept, held


def _alone() -> int:
    """What getrefcount says in `_referenced_elsewhere` of a value only the budget references
    (2: the entry, and getrefcount's argument)."""
    for _, entry in {0: (object(), 0)}.items():
        return getrefcount(entry[0])
    raise AssertionError


_ALONE = _alone()
