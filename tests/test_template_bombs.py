"""Chat templates built to fill memory or run long (issue 33, point 6, round two): every way a
sandboxed template can build something huge or spend long on one step is refused by a bound
(snug/data/template_budget.py), in one line naming the template.

Each template here builds 2 to 3 times what a bound allows, a few tens of MB, so that without
the bound it renders (and the test fails on a missing error) instead of taking the machine
down; the ones that would run long run under `deadline`."""

from __future__ import annotations

import re

import pytest
from test_bombs import STYLES, deadline

ORIGIN = "m/chat_template.jinja"
HI = [{"role": "user", "content": "hi"}]
MB = "' '.ljust(1000000)"  # a string of 1,000,000 characters, built without `*`


def render(tokenizer, template: str, messages: list[dict] = HI) -> str:
    from snug.data.render import ChatTemplate, render_chat

    return render_chat(tokenizer, ChatTemplate(template, ORIGIN), messages, True)


def refused(tokenizer, template: str, message: str, seconds: float = 5) -> str:
    """The one-line TemplateError `template` stops with (naming it), within `seconds`."""
    from snug.data.render import TemplateError

    with deadline(seconds), pytest.raises(TemplateError) as e:
        render(tokenizer, template)
    line = str(e.value)
    assert "\n" not in line and line.startswith(f"{ORIGIN}: the chat template "), line
    assert re.search(message, line), line
    return line


# Each builds 20 to 33 million characters (or 1.5 to 3 million items) in one expression or a
# few steps: a string past 10,000,000 characters, a list past 1,000,000 items, a number past
# 65,536 bits, or past 20,000,000 characters and items in all.
BUILDS = {
    "str_ljust": "{{ ''.ljust(20000000)|length }}",
    "str_zfill": "{{ '1'.zfill(20000000)|length }}",
    "center_filter": "{{ 'x'|center(20000000)|length }}",
    "percent_width": "{{ ('%020000000d' % 1)|length }}",
    "percent_star_width": "{{ ('%*d' % (20000000, 1))|length }}",
    "percent_precision": "{{ ('%.20000000f' % 1.5)|length }}",
    "format_width": "{{ '{:>20000000}'.format('x')|length }}",
    "format_nested_width": "{{ '{:>{}}'.format('x', 20000000)|length }}",
    "format_filter": "{{ '%020000000d'|format(1)|length }}",
    "concat_doubling": "{% set ns = namespace(s='x') %}{% for i in range(25) %}"
    "{% set ns.s = ns.s ~ ns.s %}{% endfor %}{{ ns.s|length }}",
    "plus_doubling": "{% set ns = namespace(s='x') %}{% for i in range(25) %}"
    "{% set ns.s = ns.s + ns.s %}{% endfor %}{{ ns.s|length }}",
    "list_plus": "{{ ([1] * 600000 + [1] * 600000)|length }}",
    "join_separator": "{{ " + MB + ".join(range(30)|map('string'))|length }}",
    "join_filter": "{{ range(30)|join(" + MB + ")|length }}",
    "replace": "{{ " + MB + ".replace(' ', '                              ')|length }}",
    "replace_filter": "{{ " + MB + "|replace(' ', '                              ')|length }}",
    "expandtabs": "{{ '\t'.ljust(1000000, '\t').expandtabs(30)|length }}",
    "indent": "{{ '\n'.ljust(1000000, '\n')|indent(30, true, true)|length }}",
    "wordwrap": "{{ 'a b '.ljust(1000000, 'a')|wordwrap(1, true, '                    ')|length }}",
    "translate": "{{ " + MB + ".translate({32: '                              '})|length }}",
    "output": "{% set s = " + MB + " %}{% for i in range(30) %}{{ s }}{% endfor %}",
    "literal_output": "{% for i in range(30000) %}" + "x" * 1000 + "{% endfor %}",
    "string_of_a_list": "{{ ([" + MB + "] * 30)|string|length }}",
    "tojson_of_a_list": "{{ ([" + MB + "] * 30)|tojson|length }}",
    "concat_of_a_list": "{{ ('' ~ [" + MB + "] * 30)|length }}",
    "join_of_a_list": "{{ ([" + MB + "] * 30)|join|length }}",
    "output_of_a_list": "{{ [" + MB + "] * 30 }}",
    "number_squared": "{% set ns = namespace(n=2 ** 30000) %}{% for i in range(8) %}"
    "{% set ns.n = ns.n * ns.n %}{% endfor %}{{ ns.n.bit_length() }}",
    "bytes_repeat": "{{ ('x'.encode() * 30000000)|length }}",
    "int_to_bytes": "{{ (1).to_bytes(30000000, 'big')|length }}",
    "batch_fill": "{{ ([1]|batch(3000000, 'x')|first)|length }}",
    "slice_count": "{{ [1]|slice(1500000)|list|length }}",
    "list_of_a_string": "{{ (' '.ljust(2000000))|list|length }}",
    "split": "{{ " + MB + ".replace(' ', ' a').split()|length }}",
    "lipsum": "{{ lipsum(1, false, 1500000, 1500001)|length }}",
    "strftime_now": "{{ strftime_now(" + MB + ".replace(' ', '%c'))|length }}",
    "kept_in_macro_frames": "{% macro m(k) %}{% set s = ' '.ljust(1000000) ~ k %}"
    "{{ m(k + 1) }}{{ s|length }}{% endmacro %}{{ m(0) }}",
    "kept_by_slices": "{% set s = " + MB + " %}{% set ns = namespace(l=[]) %}"
    "{% for i in range(100) %}{% set ns.l = ns.l + [s[i:]] %}{% endfor %}{{ ns.l|length }}",
    "kept_in_variables": "".join(f"{{% set v{i} = {MB} ~ {i} %}}" for i in range(100))
    + "{{ v0|length }}",
    "star_args": "{% set c = cycler(*' '.ljust(5000000)) %}{{ c.current|length }}",
    "filter_block_output": "{% for i in range(30000) %}{% filter center(1000) %}x{% endfilter %}"
    "{% endfor %}",
    "call_block_output": "{% macro m() %}{{ caller() }}{% endmacro %}{% for i in range(30000) %}"
    "{% call m() %}" + "x" * 1000 + "{% endcall %}{% endfor %}",
    "kept_in_a_list": "{% set ns = namespace(l=[]) %}{% for i in range(100) %}"
    "{% set ns.l = ns.l + [' '.ljust(500000) ~ i] %}{% endfor %}{{ ns.l|length }}",
}


@pytest.mark.parametrize("name", sorted(BUILDS))
def test_a_template_that_builds_something_huge_stops_naming_it(name, tokenizer):
    refused(tokenizer, BUILDS[name], r"(builds|renders) .*more than [\d,]+ (characters|items|bits)")


# Each would hold one render for minutes: a step that reads or builds a large value, repeated
# within the budget of steps (before: one step, whatever it read).
RUNS_LONG = {
    "in_a_long_string": "{% set s = ' '.ljust(5000000) %}{% for i in range(100000) %}"
    "{% if 'x' in s %}{% endif %}{% endfor %}",
    "equal_long_strings": "{% set a = ' '.ljust(5000000) %}{% set b = ' '.ljust(5000000) %}"
    "{% for i in range(100000) %}{% if a == b %}{% endif %}{% endfor %}",
    "count_in_a_long_string": "{% set s = ' '.ljust(5000000) %}{% for i in range(100000) %}"
    "{% set n = s.count('x') %}{% endfor %}",
    "sort_a_long_list": "{% set l = range(100000)|list %}{% for i in range(100000) %}"
    "{% set x = l|sort|first %}{% endfor %}",
    "big_literal_in_a_loop": "{% for i in range(100000) %}{% set l = ["
    + ", ".join(["0"] * 20000)
    + "] %}{% endfor %}",
    "recursive_loop": "{% set big = range(100000)|list %}{% for x in [1] recursive %}"
    "{% if loop.depth < 3 %}{{ loop(big) }}{% endif %}{% endfor %}",
    "is_in_test": "{% set s = ' '.ljust(5000000) %}{% for i in range(100000) %}"
    "{% if 'x' is in s %}{% endif %}{% endfor %}",
    # a number of 65,535 bits divided by one of 32,001: ~1 ms each (before: one step)
    "divide_long_numbers": "{% set a = 2 ** 32767 * 2 ** 32767 + 1 %}{% set b = 2 ** 32000 + 1 %}"
    "{% for i in range(100000) %}{% set c = a // b %}{% endfor %}",
}


@pytest.mark.parametrize("name", sorted(RUNS_LONG))
def test_a_template_whose_steps_read_long_values_stops_within_the_budget(name, tokenizer):
    refused(tokenizer, RUNS_LONG[name], r"did not finish within 1,000,000 steps")


def test_a_template_cannot_call_what_counts_its_budget(tokenizer):
    """The filters the rewritten template calls to count (snug_spend ...) are not the
    template's: named in it, it is not valid; by name through `map`, the conversation is
    refused (before: `(-1000000000)|snug_spend(0)` took a billion steps off the count, and two
    nested loops of 3,000 rendered past the budget)."""
    from snug.data.render import TemplateError, TemplateRefused

    loops = "{% for i in range(3000) %}{% for j in range(3000) %}{% endfor %}{% endfor %}done"
    with deadline(5), pytest.raises(TemplateError, match=r"No filter named 'snug_spend'"):
        render(tokenizer, "{{ (-1000000000)|snug_spend(0) }}" + loops)
    with deadline(5), pytest.raises(TemplateRefused, match=r"No filter named 'snug_spend'"):
        render(tokenizer, "{{ [-1000000000]|map('snug_spend', 0)|list }}" + loops)


def test_a_template_longer_than_the_bound_is_refused_before_it_compiles(tokenizer):
    from snug.data.template_budget import MAX_SOURCE

    template = "{# " + "x" * MAX_SOURCE + " #}hello"
    refused(tokenizer, template, rf"is more than {MAX_SOURCE:,} characters long")


def test_a_long_refusal_is_cut_to_one_short_line(tokenizer):
    """A template that refuses a conversation with a text of millions of characters is one
    short line too (before: the whole text, as the record's problem)."""
    from snug.data.render import TemplateRefused

    template = "{{ raise_exception('no: ' ~ 'x'.ljust(5000000, 'x')) }}"
    with pytest.raises(TemplateRefused, match=r"refuses this conversation \(no: x+\)") as e:
        render(tokenizer, template)
    assert len(str(e.value)) < 500


def test_running_out_of_memory_stops_the_run_not_one_record(tokenizer):
    """A MemoryError is the template's problem (before: one record's, which
    data.on_error=skip would have met again on every record)."""
    from snug.data.render import ChatTemplate, TemplateError, render_chat

    class Huge:
        def __str__(self) -> str:
            raise MemoryError

    template = ChatTemplate("{{ messages[0]['content'] }}", ORIGIN)
    with pytest.raises(TemplateError, match=rf"{ORIGIN}: the chat template ran out of memory"):
        render_chat(tokenizer, template, [{"role": "user", "content": Huge()}], True)


def test_conversations_within_the_bounds_render_as_transformers_renders_them(tokenizer):
    """The bounds leave room: a 2,000,000-character conversation (a long prompt to `generate`)
    renders byte-identical to transformers with the bundled template and a Qwen-style one
    (whose `+` copy each message several times)."""
    long = " ".join(f"word{i}" for i in range(250_000))  # 2.1 million characters
    messages = [
        {"role": "system", "content": "Be brief."},
        {"role": "user", "content": long[: len(long) // 2]},
        {"role": "assistant", "content": long[len(long) // 2 :]},
        {"role": "user", "content": "And then?"},
    ]
    for template in (tokenizer.chat_template, STYLES["qwen_like"]):
        theirs = tokenizer.apply_chat_template(
            messages, chat_template=template, tokenize=False, add_generation_prompt=True
        )
        assert render(tokenizer, template, messages) == theirs


# A hand-written template that builds the whole text in a namespace, one `+` per piece: each
# `+` copies the text so far, which is dropped at once (transformers renders 1,000 turns of
# 1 KB in about 0.8 s).
ACCUMULATES = (
    "{% set ns = namespace(text='') %}{% for m in messages %}"
    "{% set ns.text = ns.text + '<|' + m['role'] + '|>' + m['content'] + '\\n' %}"
    "{% endfor %}{{ ns.text }}"
)


def conversation(turns: int, chars: int = 1000) -> list[dict]:
    """A system prompt and `turns` exchanges, each message of `chars` characters."""

    def text(head: str) -> str:
        return (head + " lorem ipsum" * chars)[:chars]

    messages = [{"role": "system", "content": "Be brief."}]
    for i in range(turns):
        messages.append({"role": "user", "content": text(f"question {i}:")})
        messages.append({"role": "assistant", "content": text(f"answer {i}:")})
    return messages


# Turns of 1 KB messages each template renders as transformers does. gemma_like scans back over
# the messages before each one: 500 turns is past what the code before the budget of sizes
# rendered (about 460) and past where 609ca08 refused it (about 350).
LONG = {"models/tiny": 1000, "qwen_like": 1000, "accumulates": 1000, "gemma_like": 500}


@pytest.mark.parametrize("name", sorted(LONG))
def test_a_long_conversation_renders_as_transformers_renders_it(name, tokenizer):
    """The bounds of memory count what a render holds, not every copy it makes and drops, and
    the steps grow with the conversation (before: `accumulates` was refused from 100 turns,
    "builds more than 40,000,000 characters and items in all", and `gemma_like` from about
    350, each item of its inner loop 4 to 5 steps)."""
    template = {"models/tiny": tokenizer.chat_template, "accumulates": ACCUMULATES, **STYLES}
    messages = conversation(LONG[name])
    theirs = tokenizer.apply_chat_template(
        messages, chat_template=template[name], tokenize=False, add_generation_prompt=True
    )
    assert render(tokenizer, template[name], messages) == theirs


def test_a_transformers_without_the_environment_is_one_line_naming_the_version(
    tokenizer, monkeypatch
):
    """render.py builds its environment from transformers' private
    `_cached_compile_jinja_template`: a release without it is one line that names the
    release snug needs (before: "ImportError (unexpected)" on every chat dataset)."""
    import transformers
    from transformers.utils import chat_template_utils

    from snug.data import render as render_module
    from snug.data.render import TemplateError
    from snug.errors import UserError

    monkeypatch.delattr(chat_template_utils, "_cached_compile_jinja_template")
    render_module._environment.cache_clear()
    render_module._compiled.cache_clear()
    try:
        with pytest.raises(TemplateError) as e:
            render(tokenizer, "{{ messages[0]['content'] }}")
    finally:
        render_module._environment.cache_clear()
        render_module._compiled.cache_clear()
    line = str(e.value)
    assert isinstance(e.value, UserError) and "\n" not in line
    assert f"transformers {transformers.__version__} " in line, line
    assert "_cached_compile_jinja_template" in line and "pip install" in line, line
    assert re.search(r"transformers==\d+\.\d+", line), line
