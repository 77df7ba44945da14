"""The rewrite of a chat template's syntax tree that counts what a render spends against its
budget (snug/data/template_budget.py), where the environment's hooks (snug/data/template_env.py)
see nothing: each loop item, and each run of a loop's, macro's or block's body or of a branch of
an `if` heavy enough to count by itself (a step per item, the body's nodes, and the literal
text it outputs); `+` chains and `~` (checked joins), slices (copies), what comparisons read,
`f(*args)`, and the text a `{% set %}` or `{% filter %}` block takes out of the output.

What the rewritten tree calls are filters of the environment (INTERNAL), never a template's
own: `rewrite` refuses a template that names one, and the environment one called by its name
(`map('...')`): one that spent negative steps would have no budget.
"""

from __future__ import annotations

import functools
import operator
from collections.abc import Iterable, Iterator, Mapping
from itertools import islice
from typing import Any

import jinja2
from jinja2 import TemplateSyntaxError, nodes
from jinja2.visitor import NodeTransformer

from snug.data import template_budget as budget
from snug.data.template_budget import (
    COPY_CHARS,
    MAX_CHARS,
    NUMBERS,
    TRACKED,
    OverBudget,
    built,
    captured,
    charge,
    check,
    output,
    printed,
    refuse_chars,
    scanned,
    size_of,
)

STEP_NODES = 10  # nodes of a body that count as one step each time it runs
BRANCH_NODES = 5  # nodes from which a branch of an `if` counts itself when taken (shorter
# ones count with the body around them, whether taken or not)
BRANCH_TEXT = 100  # characters of literal text from which a branch counts its own text
MAX_ARGS = 10_000  # arguments of one call (`f(*items)`; templates pass a few)


@jinja2.pass_context
def counted(context: Any, iterable: Iterable, steps: float = 1, text: int = 0) -> Iterator:
    """A loop's items, each `steps` (1 and its body's nodes) and the `text` its body outputs
    as written in the template."""
    spent = budget.current()
    for item in iterable:
        spent.steps += steps
        spent.output += text
        if spent.steps > spent.limit or spent.output > MAX_CHARS:
            check(spent)
        yield item


@jinja2.pass_context
def _spend(context: Any, steps: float, text: int) -> None:
    """A body run (a macro's, block's or branch's): its nodes, and the text it outputs as
    written."""
    charge(steps, text)


@jinja2.pass_context
def _scanned(context: Any, value: Any) -> Any:
    """An operand of a comparison, read as it is compared (a short string at once)."""
    kind = type(value)
    if kind is str and len(value) < COPY_CHARS or kind in NUMBERS:
        return value
    scanned(value)
    return value


@jinja2.pass_context
def _scanned_container(context: Any, value: Any) -> Any:
    """The right side of `in`: a mapping is looked up, not read."""
    if not isinstance(value, Mapping):
        _scanned(context, value)
    return value


@jinja2.pass_context
def _copied(context: Any, value: Any) -> Any:
    return built(value, "[:]", nested=False)


@jinja2.pass_context
def _concat(context: Any, parts: tuple) -> str:
    """`a ~ b`, as Jinja's str_join makes it (transformers renders without autoescape)."""
    texts = [part if type(part) is str else printed(part, "~") for part in parts]
    size = sum(map(len, texts))
    refuse_chars(size, "~")
    text = "".join(texts)
    return text if size < TRACKED else built(text, "~", parts, nested=False)


@jinja2.pass_context
def _star_args(context: Any, values: Any) -> Any:
    """`f(*values)` or `f(**values)`: no more than MAX_ARGS (Python copies them a few times on
    the way to `f`: a string of 9,000,000 characters made 800 MB of arguments)."""
    if not hasattr(values, "__len__"):  # an iterator: taken here, once
        values = list(islice(values, MAX_ARGS + 1))
    if len(values) > MAX_ARGS:
        raise OverBudget(f"builds a list of more than {MAX_ARGS:,} items (the arguments of a call)")
    return values


_STR = {str}


@jinja2.pass_context
def _added(context: Any, parts: tuple) -> Any:
    """`a + b + c ...` (Jinja's Add nodes of one chain, whose parts are taken first): strings
    joined at once when all are, else added two at a time as `call_binop` adds them."""
    kinds = set(map(type, parts))
    if kinds == _STR:
        size = sum(map(len, parts))
        refuse_chars(size, "+")
        text = "".join(parts)
        return text if size < TRACKED else built(text, "+", parts, nested=False)
    add = operator.add if kinds <= NUMBERS else functools.partial(_binop, context)
    return functools.reduce(add, parts)


def _binop(context: Any, left: Any, right: Any) -> Any:
    return context.environment.call_binop(context, "+", left, right)


@jinja2.pass_context
def _captured(context: Any, text: str) -> str:
    """What a `{% set %}` or `{% filter %}` block output, taken as a value."""
    return captured(text, "{% set %}")


@jinja2.pass_context
def _output_as_is(context: Any, value: Any) -> Any:
    """What a `{% filter %}` block writes to the output as it is (not through `finalize`)."""
    output(len(value) if isinstance(value, str) else size_of(value, printed=True).chars)
    return value


def _filter(node: nodes.Expr | None, name: str, *args: nodes.Expr) -> nodes.Filter:
    line = node.lineno if node is not None else None
    return nodes.Filter(node, name, list(args), [], None, None, lineno=line)


class _Budgeted(NodeTransformer):
    """The syntax tree rewritten to count: each loop item and each run of a loop's, macro's or
    block's body or of a heavy branch (its nodes and literal text), `~` (built by a checked
    join), slices, what comparisons read, and what blocks capture."""

    def __init__(self) -> None:
        self.counting: set[int] = set()  # ids of the bodies that count themselves as they run
        self.chains: set[int] = set()  # ids of the `+` chains rewritten

    def _weight(self, body: list[nodes.Node]) -> tuple[int, int]:
        """The nodes a body runs each time it runs, less those of the bodies within it that
        count themselves (an upper bound: a short branch counts whether taken or not; a body
        of a thousand statements is a thousand times the work of one), and the characters of
        the literal text it outputs as written."""
        count = text = 0
        stack: list[Any] = list(body)
        while stack:
            item = stack.pop()
            if isinstance(item, list):
                if id(item) not in self.counting:
                    stack.extend(item)
            elif isinstance(item, nodes.Node):
                count += 1
                if isinstance(item, nodes.TemplateData):
                    text += len(item.data)
                stack.extend(v for _, v in item.iter_fields() if isinstance(v, (list, nodes.Node)))
        return count, text

    def _counts_itself(self, body: list[nodes.Node], always: bool = True) -> None:
        """`body` counts its nodes and text each time it runs (`always`, or when heavy)."""
        count, text = self._weight(body)
        if always or count >= BRANCH_NODES or text >= BRANCH_TEXT:
            if count >= BRANCH_NODES or text:
                spent = _filter(nodes.Const(count / STEP_NODES), "snug_spend", nodes.Const(text))
                body.insert(0, nodes.ExprStmt(spent, lineno=body[0].lineno if body else 1))
            self.counting.add(id(body))

    def _each_run(self, node: nodes.Node) -> nodes.Node:
        self.generic_visit(node)
        self._counts_itself(node.body)
        return node

    # (a {% call %} block's body runs as caller())
    visit_Macro = visit_Block = visit_CallBlock = _each_run  # noqa: N815 (NodeTransformer's)

    def visit_If(self, node: nodes.If) -> nodes.If:  # noqa: N802
        """Each branch heavy enough counts when taken (an `elif` is an If of its own)."""
        self.generic_visit(node)
        self._counts_itself(node.body, always=False)
        self._counts_itself(node.else_, always=False)
        return node

    def visit_For(self, node: nodes.For) -> nodes.For:  # noqa: N802
        self.generic_visit(node)
        if node.recursive:  # loop(items) runs the body on items that do not pass node.iter
            self._counts_itself(node.body)
            node.iter = _filter(node.iter, "snug_counted")
            return node
        count, text = self._weight(node.body)
        if node.test is not None:  # `for x in xs if test`: the test runs on every item
            count += self._weight([node.test])[0]
        self.counting.add(id(node.body))
        steps = nodes.Const(1 + count / STEP_NODES)
        node.iter = _filter(node.iter, "snug_counted", steps, nodes.Const(text))
        return node

    def visit_AssignBlock(self, node: nodes.AssignBlock) -> nodes.AssignBlock:  # noqa: N802
        """The block's text, before its own filters, is taken out of the output."""
        self.generic_visit(node)
        if node.filter is None:
            node.filter = _filter(None, "snug_captured")
        else:
            self._captured_first(node.filter)
        return node

    def visit_FilterBlock(self, node: nodes.FilterBlock) -> nodes.FilterBlock:  # noqa: N802
        """The block's text is taken out of the output, and what its filters make of it
        written back to it as it is."""
        self.generic_visit(node)
        self._captured_first(node.filter)
        node.filter = _filter(node.filter, "snug_output_as_is")
        return node

    @staticmethod
    def _captured_first(chain: nodes.Filter) -> None:
        innermost = chain
        while innermost.node is not None:
            innermost = innermost.node
        innermost.node = _filter(None, "snug_captured")

    def visit_Call(self, node: nodes.Call) -> nodes.Call:  # noqa: N802
        self.generic_visit(node)
        if node.dyn_args is not None:
            node.dyn_args = _filter(node.dyn_args, "snug_star_args")
        if node.dyn_kwargs is not None:
            node.dyn_kwargs = _filter(node.dyn_kwargs, "snug_star_args")
        return node

    def visit_Add(self, node: nodes.Add) -> nodes.Filter:  # noqa: N802
        """A chain of `+` (`'<|im_start|>' + m.role + '\\n' + ...`) as one call: its parts are
        evaluated first, left to right, then added (one string built, not one per `+`)."""
        self.generic_visit(node)
        left = node.left
        if id(left) in self.chains:  # a + b, rewritten first: (a, b) + c is (a, b, c)
            parts = [*left.node.items, node.right]
        else:
            parts = [left, node.right]
        added = _filter(nodes.Tuple(parts, "load", lineno=node.lineno), "snug_added")
        self.chains.add(id(added))
        return added

    def visit_Concat(self, node: nodes.Concat) -> nodes.Filter:  # noqa: N802
        self.generic_visit(node)
        return _filter(nodes.Tuple(node.nodes, "load", lineno=node.lineno), "snug_concat")

    def visit_Getitem(self, node: nodes.Getitem) -> nodes.Expr:  # noqa: N802
        """A slice (which Jinja takes without the environment's getitem) is a copy."""
        self.generic_visit(node)
        return _filter(node, "snug_copied") if isinstance(node.arg, nodes.Slice) else node

    def visit_Compare(self, node: nodes.Compare) -> nodes.Compare:  # noqa: N802
        """What a comparison reads: the container of `in`, and one side of any other
        comparison unless the other is a constant (`role == 'user'` reads at most 'user'); a
        constant (`role in ['system', 'developer']`) is counted with the nodes."""
        self.generic_visit(node)
        operands = [node.expr] + [op.expr for op in node.ops]
        for i, op in enumerate(node.ops):
            if _constant(operands[i + 1]):
                continue
            if op.op in ("in", "notin"):
                op.expr = _filter(op.expr, "snug_scanned_container")
            elif not _constant(operands[i]):
                op.expr = _filter(op.expr, "snug_scanned")
        return node


def _constant(node: nodes.Expr) -> bool:
    """A constant, or a list or tuple of constants, as written in the template."""
    if isinstance(node, (nodes.List, nodes.Tuple)):
        return all(isinstance(item, nodes.Const) for item in node.items)
    return isinstance(node, nodes.Const)


# What the rewritten tree calls, as filters: never a template's own (refused at parse time, and
# by name from `map` or `select`: a template that spends negative steps has no budget).
INTERNAL = {
    "snug_counted": counted,
    "snug_spend": _spend,
    "snug_scanned": _scanned,
    "snug_scanned_container": _scanned_container,
    "snug_concat": _concat,
    "snug_added": _added,
    "snug_copied": _copied,
    "snug_captured": _captured,
    "snug_output_as_is": _output_as_is,
    "snug_star_args": _star_args,
}


def rewrite(tree: nodes.Template) -> nodes.Template:
    """`tree` (a template as parsed) rewritten to count what it spends; a template that names
    one of the INTERNAL filters is not valid (as if there were no such filter)."""
    for node in tree.find_all(nodes.Filter):
        if node.name in INTERNAL:
            raise TemplateSyntaxError(f"No filter named {node.name!r}.", node.lineno)
    return _Budgeted().visit(tree)
