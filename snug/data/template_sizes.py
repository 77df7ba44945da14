"""What an operation of a chat template will build, told from its arguments before Python builds
it (snug/data/template_budget.py has the bounds and why).

Only the operations whose result can be far larger than what they are given need a check
here: a width or count (`ljust`, `center`, `zfill`, `%` and `format` widths, `batch`,
`slice`, `to_bytes`), a repetition (`*`, a separator, a replacement, a tab size, an
indentation, a format field), or a value printed whole (a list of a thousand references to
one long string prints it a thousand times). Each estimate is an upper bound of the result's
size, or close to one; the result is checked again as it comes back.
"""

from __future__ import annotations

import re
from collections.abc import Callable, Mapping
from itertools import islice
from string import Formatter
from typing import Any

from snug.data.template_budget import (
    MAX_BITS,
    MAX_CHARS,
    MAX_ITEMS,
    READ_CHARS,
    printed,
    read,
    refuse_bits,
    refuse_chars,
    refuse_items,
    size_of,
    spend,
)

FLOAT_CHARS = 330  # the longest a float prints without a precision ('%f' % 1e308)
BITS_SQUARED_PER_STEP = 2_000_000  # whole numbers multiplied or divided: a 65,536-bit number
# divided by a 32,768-bit one takes ~1.1 ms, which is ~1,100 steps


def _int(value: Any) -> int:
    """A count or width given to an operation (anything else counts as none)."""
    return value if isinstance(value, int) and not isinstance(value, bool) else 0


def _number(digits: str) -> int:
    return int(digits) if len(digits) < 9 else MAX_CHARS + 1


def _taken(items: Any, what: str) -> list:
    """The items of a list, string or iterator, refused past MAX_ITEMS before they are all
    taken."""
    if hasattr(items, "__len__"):
        refuse_items(len(items), what)
    taken = list(islice(items, MAX_ITEMS + 1))
    refuse_items(len(taken), what)
    return taken


# -- operators --------------------------------------------------------------------------------
def before_binop(op: str, left: Any, right: Any) -> None:
    """Refuse `left op right` when its result would pass a bound; spend the steps of
    multiplying or dividing long whole numbers (which takes up to the product of their
    lengths)."""
    if type(left) is int and type(right) is int and op != "+":
        a, b = left.bit_length(), right.bit_length()
        if op == "**":  # as long as the result, at most
            a = b = min(max(right, 0) * a, MAX_BITS)
        if a * b > BITS_SQUARED_PER_STEP:
            spend(a * b / BITS_SQUARED_PER_STEP)
    if op == "*":
        for seq, times in ((left, right), (right, left)):
            if isinstance(seq, (str, bytes)):
                refuse_chars(len(seq) * _int(times), "*")
            elif isinstance(seq, (list, tuple)):
                refuse_items(len(seq) * _int(times), "*")
        if isinstance(left, int) and isinstance(right, int):
            refuse_bits(left.bit_length() + right.bit_length(), "*")
    elif op == "**":
        if isinstance(left, int) and isinstance(right, int) and right > 0 and abs(left) > 1:
            refuse_bits(right * abs(left).bit_length(), "**")
    elif op == "+":
        if isinstance(left, (str, bytes)) and isinstance(right, (str, bytes)):
            refuse_chars(len(left) + len(right), "+")
        elif isinstance(left, (list, tuple)) and isinstance(right, (list, tuple)):
            refuse_items(len(left) + len(right), "+")
    elif op == "%" and isinstance(left, (str, bytes)):
        percent_format(left, right, "%")


_PERCENT = re.compile(r"%(?:\([^)]*\))?[-#0 +]*(\*|\d+)?(?:\.(\*|\d+))?[hlL]?([a-zA-Z%])")


def _widest_and_longest(values: list) -> tuple[int, int]:
    """The largest whole number among `values` (a width given as `*` or `{}`) and the longest
    any of them prints."""
    widest = max((_int(v) for v in values), default=0)
    longest = max((size_of(v, printed=True).chars for v in values), default=0)
    return widest, longest


def percent_format(fmt: str | bytes, args: Any, what: str) -> None:
    """`fmt % args`: each conversion prints a value, padded to its width and precision."""
    values = list(args) if isinstance(args, tuple) else [args]
    if isinstance(args, Mapping):
        values += list(args.values())
    widest, longest = _widest_and_longest(values)
    text = fmt.decode("latin-1") if isinstance(fmt, bytes) else fmt
    size = len(fmt)
    for spec in _PERCENT.finditer(text):  # one at a time: a format can hold millions
        width, precision, kind = spec.groups()
        if kind != "%":
            size += longest + FLOAT_CHARS
            size += sum(widest if n == "*" else _number(n) for n in (width, precision) if n)
            refuse_chars(size, what)


def str_format(fmt: str, args: tuple, kwargs: Mapping, what: str) -> None:
    """`fmt.format(*args, **kwargs)`: each field prints a value, padded to the numbers of its
    format spec (or to a width given as an argument, `{:{}}`)."""
    widest, longest = _widest_and_longest([*args, *kwargs.values()])
    size = len(fmt)
    for _, field, spec, _ in Formatter().parse(fmt):
        if field is not None:
            size += longest + FLOAT_CHARS + sum(_number(n) for n in re.findall(r"\d+", spec))
            size += widest if "{" in spec else 0
            refuse_chars(size, what)


# -- methods of strings and numbers ----------------------------------------------------------
def _pad(s: str, width: Any = 0, *_: Any) -> int:
    return max(len(s), _int(width))


def _expandtabs(s: str, tabsize: Any = 8) -> int:
    return len(s) + s.count("\t" if isinstance(s, str) else b"\t") * max(_int(tabsize), 0)


def _kind(s: str | bytes) -> type:
    """str or bytes: what `s` takes as a separator or a replacement (a Markup takes a str)."""
    return bytes if isinstance(s, bytes) else str


def _replace(s: str, old: Any, new: Any, count: Any = -1) -> int:
    if not (isinstance(old, _kind(s)) and isinstance(new, _kind(s))):
        return len(s)  # str.replace refuses them
    found = s.count(old) if old else len(s) + 1
    if isinstance(count, int) and count >= 0:
        found = min(found, count)
    return len(s) + found * max(0, len(new) - len(old))


def _translate(s: str, table: Any) -> int:
    values = table.values() if isinstance(table, Mapping) else table
    values = values if isinstance(values, (list, tuple)) or isinstance(table, Mapping) else ()
    widest = max((len(v) for v in values if isinstance(v, (str, bytes))), default=1)
    return len(s) * max(widest, 1)


_SPACES = " \t\n\r\x0b\x0c\x1c\x1d\x1e\x1f"
_LINE_BREAKS = "\n\r\x0b\x0c\x1c\x1d\x1e\x85\u2028\u2029"


def _count_any(s: str | bytes, chars: str) -> int:
    if isinstance(s, bytes):
        return sum(s.count(c.encode("latin-1")) for c in chars if c < "\x80")
    return sum(s.count(c) for c in chars)


def _split(s: str, sep: Any = None, maxsplit: Any = -1) -> int:
    if sep is None:  # words: at most one more than the whitespace characters
        parts = len(s) // 2 + 1 if isinstance(s, str) and not s.isascii() else 0
        parts = parts or _count_any(s, _SPACES) + 1
    else:
        parts = s.count(sep) + 1 if isinstance(sep, _kind(s)) and sep else 1
    return min(parts, maxsplit + 1) if _int(maxsplit) >= 0 and maxsplit is not None else parts


def _splitlines(s: str, keepends: Any = False) -> int:
    return _count_any(s, _LINE_BREAKS) + 1


def _encode(s: str, encoding: Any = "utf-8", errors: Any = "strict") -> int:
    return len(s) * (4 if str(encoding).lower().replace("_", "-") in ("utf-8", "utf8") else 10)


# method name -> (what its result is: "chars" or "items", its size from self and arguments)
STRING_METHODS: dict[str, tuple[str, Callable[..., int]]] = {
    "center": ("chars", _pad),
    "ljust": ("chars", _pad),
    "rjust": ("chars", _pad),
    "zfill": ("chars", _pad),
    "expandtabs": ("chars", _expandtabs),
    "replace": ("chars", _replace),
    "translate": ("chars", _translate),
    "encode": ("chars", _encode),
    "hex": ("chars", lambda s, *_: 3 * len(s)),
    "split": ("items", _split),
    "rsplit": ("items", _split),
    "splitlines": ("items", _splitlines),
}


def before_method(self: Any, name: str, args: tuple, kwargs: dict) -> tuple | None:
    """Refuse a method of a string or number whose result would pass a bound; for `join`,
    the items it joins, taken once (an iterator can be read only once)."""
    what = f"{type(self).__name__}.{name}"
    if isinstance(self, (str, bytes)):
        if name == "join" and len(args) == 1 and not kwargs:
            items = _taken(args[0], what)
            sizes = sum(len(i) for i in items if isinstance(i, (str, bytes)))
            refuse_chars(sizes + len(self) * max(len(items) - 1, 0), what)
            return (items,)
        if name in STRING_METHODS:
            kind, size = STRING_METHODS[name]
            (refuse_chars if kind == "chars" else refuse_items)(size(self, *args, **kwargs), what)
    elif isinstance(self, int) and name == "to_bytes":
        length = args[0] if args else kwargs.get("length", 1)
        refuse_chars(_int(length), what)
    return None


# -- filters ----------------------------------------------------------------------------------
# Filters that print their first argument whole, besides those with a check below (any filter
# not named in READ_ONLY counts as one): a value printed must not pass MAX_CHARS.
READ_ONLY = frozenset(
    "abs attr batch count d default dictsort first float filesizeformat groupby int items last "
    "length list map max min random reject rejectattr reverse round select selectattr slice "
    "sort sum unique".split()
)
# Filters that only look at their argument's length or first item: no steps for reading it.
CONSTANT_TIME = frozenset("attr count d default first last length".split())
_SCALED = {"e": 6, "escape": 6, "forceescape": 6, "xmlattr": 6, "urlencode": 12}  # per char


def _indent(s: Any, width: Any = 4, first: Any = False, blank: Any = False) -> None:
    text = printed(s, "indent")
    pad = len(width) if isinstance(width, str) else _int(width)
    refuse_chars(pad, "indent")
    refuse_chars(len(text) + (text.count("\n") + 1) * pad, "indent")


def _wordwrap(
    s: Any, width: Any = 79, break_long_words: Any = True, wrapstring: Any = None, *_: Any
) -> None:
    text, wide = printed(s, "wordwrap"), max(_int(width), 1)
    breaks = len(text) // wide + text.count("\n") + 1
    refuse_chars(
        len(text) + breaks * (len(wrapstring) if isinstance(wrapstring, str) else 1), "wordwrap"
    )
    if break_long_words and wide < len(text):  # textwrap cuts a long word by copying its rest
        words = re.finditer(rf"\S{{{wide + 1},}}", text)
        spend(sum((w.end() - w.start()) ** 2 // (2 * wide) for w in words) / READ_CHARS)


def _join(value: Any, d: Any = "", attribute: Any = None) -> tuple:
    items = _taken(value, "join")
    size = len(printed(d, "join")) * max(len(items) - 1, 0)
    for item in items:
        size += size_of(item, printed=True).chars
        refuse_chars(size, "join")
    return (items, d, attribute)


def _sum(iterable: Any, attribute: Any = None, start: Any = 0) -> tuple | None:
    """A sum of lists copies the total so far at each item."""
    if attribute is not None or not isinstance(start, (list, tuple)):
        return None
    items = _taken(iterable, "sum")
    total = len(start) + sum(len(i) for i in items if isinstance(i, (list, tuple)))
    refuse_items(total, "sum")
    spend(len(items) * total / (2 * READ_CHARS))
    return (items, attribute, start)


def _tojson(
    x: Any,
    ensure_ascii: Any = False,
    indent: Any = None,
    separators: Any = None,
    *_: Any,
    **__: Any,
) -> None:
    size = size_of(x, printed=True)
    pad = len(indent) if isinstance(indent, str) else _int(indent)
    refuse_chars(pad, "tojson")
    between = (
        sum(len(s) for s in separators if isinstance(s, str))
        if isinstance(separators, (list, tuple))
        else 4
    )
    refuse_chars(size.chars + size.items * (pad * size.depth + between + 1), "tojson")


def _urlize(
    value: Any,
    trim_url_limit: Any = None,
    nofollow: Any = False,
    target: Any = None,
    rel: Any = None,
    *_: Any,
) -> None:
    text = printed(value, "urlize")
    extra = sum(len(printed(a, "urlize")) for a in (target, rel) if a)
    refuse_chars(3 * len(text) + (_count_any(text, _SPACES) + 1) * (40 + extra), "urlize")


def _replace_filter(s: Any, old: Any, new: Any, count: Any = None) -> None:
    text, old, new = (printed(v, "replace") for v in (s, old, new))
    refuse_chars(_replace(text, old, new, -1 if count is None else count), "replace")


def _format(value: Any, *args: Any, **kwargs: Any) -> None:
    percent_format(printed(value, "format"), kwargs or args, "format")


def _sized(what: str) -> Callable[..., None]:
    def check(value: Any, *_: Any, **__: Any) -> None:
        if hasattr(value, "__len__"):
            refuse_items(len(value), what)

    return check


FILTERS: dict[str, Callable[..., tuple | None]] = {
    "center": lambda value, width=80: refuse_chars(_pad(printed(value, "center"), width), "center"),
    "indent": _indent,
    "wordwrap": _wordwrap,
    "replace": _replace_filter,
    "join": _join,
    "format": _format,
    "batch": lambda value, linecount, fill_with=None: refuse_items(_int(linecount), "batch"),
    "slice": lambda value, slices, fill_with=None: refuse_items(_int(slices), "slice"),
    "list": _sized("list"),
    "sort": _sized("sort"),
    "sum": _sum,
    "tojson": _tojson,
    "urlize": _urlize,
}


def before_filter(name: str, args: tuple, kwargs: dict) -> tuple | None:
    """Spend the steps of filter `name` reading `args` (its value first), and refuse it when
    its result would pass a bound; the arguments to call it with instead, when the check had
    to take an iterator's items."""
    if not args or name in CONSTANT_TIME:
        return None
    read(*args[1:], *kwargs.values())
    if name in READ_ONLY or name in FILTERS:
        read(args[0])
    else:  # prints its value whole
        refuse_chars(size_of(args[0], printed=True).chars * _SCALED.get(name, 1), name)
    check = FILTERS.get(name)
    return check(*args, **kwargs) if check else None


# -- globals ----------------------------------------------------------------------------------
def _lipsum(n: Any = 5, html: Any = True, *args: Any, **kwargs: Any) -> None:
    """lipsum(n, html, min, max): n paragraphs of up to `max` words of up to 14 letters."""
    words = args[1] if len(args) > 1 else kwargs.get("max", 100)
    refuse_chars(_int(n) * (_int(words) * 15 + 20), "lipsum")


def _strftime_now(fmt: Any = "", *_: Any) -> None:
    refuse_chars(15 * len(printed(fmt, "strftime_now")), "strftime_now")  # '%c': 24 from 2


GLOBALS: dict[str, Callable[..., None]] = {"lipsum": _lipsum, "strftime_now": _strftime_now}
