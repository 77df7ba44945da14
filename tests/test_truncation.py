"""Truncation to data.cutoff_len keeps the system prompt and the latest exchange: the earliest
history exchanges go first, then the prompt and the answer are cut as LLaMA-Factory cuts them
(its infer_seqlen); data.mask_history and data.default_system (issue 35 point 4)."""

import pytest

from snug.config import DataConfig
from snug.data.dataset import build_datasets
from snug.data.preference import tokenize_pairs
from snug.data.templates import BUILTIN
from snug.data.tokenize import IGNORE, chat_segments, encode_chat
from snug.data.truncate import infer_seqlen

from conftest import write_jsonl

SYSTEM = ("You are a careful pirate who answers every question in one rhyme. " * 2).strip()


def exchanges(n: int) -> list[dict]:
    out = []
    for i in range(n):
        out += [
            {"role": "user", "content": f"question {i}: what colour is the sea at night?"},
            {"role": "assistant", "content": f"answer {i}: dark as ink."},
        ]
    return out


def trained(tok, ids: list[int], labels: list[int]) -> str:
    return tok.decode([t for t, y in zip(ids, labels, strict=True) if y != IGNORE])


def templates(tok) -> list[str]:
    return [tok.chat_template, BUILTIN["llama3"]]


def test_a_long_conversation_drops_its_earliest_exchanges_first(tokenizer):
    """A system prompt, history and a last exchange over cutoff_len: the system prompt stays
    whole, the last exchange is trained, the earliest exchanges are dropped whole."""
    system = {"role": "system", "content": SYSTEM}
    talk = exchanges(5)
    for template in templates(tokenizer):
        tail = encode_chat(tokenizer, template, [system, *talk[-4:]], 10_000, False, "x")
        longer = encode_chat(tokenizer, template, [system, *talk[-6:]], 10_000, False, "x")
        assert len(tail[0]) + 5 < len(longer[0])
        ids, labels, status, prompt_len = encode_chat(
            tokenizer, template, [system, *talk], len(tail[0]) + 5, False, "x"
        )
        assert (ids, labels, prompt_len) == (tail[0], tail[1], tail[3]) and status == "truncated"
        assert SYSTEM in tokenizer.decode(ids) and "question 0" not in tokenizer.decode(ids)
        assert "answer 4: dark as ink." in trained(tokenizer, ids, labels)


def test_one_exchange_over_cutoff_keeps_the_system_prompt_and_cuts_as_llamafactory(tokenizer):
    messages = [
        {"role": "system", "content": SYSTEM},
        {"role": "user", "content": "word " * 100},
        {"role": "assistant", "content": "cat " * 200},
    ]
    prompt, answer = chat_segments(tokenizer, tokenizer.chat_template, messages, "x")[0]
    n_src = len(tokenizer(prompt, add_special_tokens=False)["input_ids"])
    n_tgt = len(tokenizer(answer, add_special_tokens=False)["input_ids"])
    cutoff = 250
    ids, labels, status, prompt_len = encode_chat(
        tokenizer, tokenizer.chat_template, messages, cutoff, False, "x"
    )
    keep_src, keep_tgt = infer_seqlen(n_src, n_tgt, cutoff)
    assert keep_src < n_src and keep_tgt < n_tgt  # both are cut
    assert status == "truncated" and len(ids) == cutoff == keep_src + keep_tgt
    assert prompt_len == keep_src and sum(y != IGNORE for y in labels) == keep_tgt
    kept_prompt = tokenizer.decode(ids[:prompt_len])
    assert kept_prompt.startswith(f"<|im_start|>system\n{SYSTEM}<|im_end|>\n")
    assert kept_prompt.endswith("word <|im_end|>\n<|im_start|>assistant\n")
    assert trained(tokenizer, ids, labels) == answer[: len(trained(tokenizer, ids, labels))]


@pytest.mark.parametrize("name", sorted(BUILTIN))
def test_every_builtin_template_keeps_the_system_prompt_and_the_answer_header(tokenizer, name):
    """Templates that render the system turn alone (chatml, llama3) and those that put it in
    the first user turn (mistral, gemma) alike."""
    messages = [
        {"role": "system", "content": SYSTEM},
        {"role": "user", "content": "word " * 100},
        {"role": "assistant", "content": "cat " * 200},
    ]
    prompt = chat_segments(tokenizer, BUILTIN[name], messages, "x")[0][0]
    whole = tokenizer(prompt, add_special_tokens=False)["input_ids"]
    ids, labels, status, prompt_len = encode_chat(
        tokenizer, BUILTIN[name], messages, 250, False, "x"
    )
    assert status == "truncated" and len(ids) == 250 and prompt_len < len(whole)
    assert SYSTEM in tokenizer.decode(ids[:prompt_len])
    assert ids[prompt_len - 4 : prompt_len] == whole[-4:]  # the header the answer follows


def test_infer_seqlen_keeps_short_sides_whole_and_shares_long_ones():
    assert infer_seqlen(10, 5, 100) == (10, 5)  # fits
    assert infer_seqlen(300, 20, 100) == (80, 20)  # short answer whole, prompt cut
    assert infer_seqlen(20, 300, 100) == (20, 80)  # short prompt whole, answer cut
    assert infer_seqlen(300, 100, 100) == (75, 25)  # both long: in proportion
    assert infer_seqlen(300, 50, 100) == (86, 14)  # an answer of half the budget is shared


def test_mask_history_trains_only_the_last_answer(tokenizer):
    talk = exchanges(3)
    ids, labels, status, prompt_len = encode_chat(
        tokenizer, tokenizer.chat_template, talk, 10_000, False, "x", mask_history=True
    )
    everything = encode_chat(tokenizer, tokenizer.chat_template, talk, 10_000, False, "x")
    assert ids == everything[0] and prompt_len == everything[3] and status == "kept"
    assert trained(tokenizer, ids, labels) == "answer 2: dark as ink.<|im_end|>\n"
    assert "answer 0" in trained(tokenizer, everything[0], everything[1])


def test_default_system_mask_history_and_counts_through_the_config(tokenizer, tmp_path):
    talk = exchanges(6)
    rows = [
        {"messages": exchanges(1)},
        {"messages": [{"role": "system", "content": "Own."}, *exchanges(1)]},
        {"messages": talk},  # over cutoff_len: its first exchanges go
    ]
    path = write_jsonl(tmp_path / "d.jsonl", rows)
    system = {"role": "system", "content": "Be brief."}
    tail = encode_chat(tokenizer, tokenizer.chat_template, [system, *talk[-4:]], 10**4, False, "x")
    cfg = DataConfig(
        train=str(path), cutoff_len=len(tail[0]) + 2, default_system="Be brief.", mask_history=True
    )
    train, _, stats = build_datasets(cfg, tokenizer, "sft", 0, "t")
    assert (stats.kept, stats.truncated, stats.dropped) == (3, 1, 0)
    want = [
        encode_chat(tokenizer, tokenizer.chat_template, m, 10**4, False, "x", mask_history=True)
        for m in ([system, *exchanges(1)], rows[1]["messages"], [system, *talk[-4:]])
    ]
    assert [(r["input_ids"], r["labels"]) for r in train] == [w[:2] for w in want]
    assert trained(tokenizer, *want[2][:2]) == "answer 5: dark as ink.<|im_end|>\n"


def _pair(tok, record: dict, cutoff: int, **keys) -> dict:
    out = tokenize_pairs(
        {k: [v] for k, v in record.items()},
        [0],
        tok=tok,
        template=tok.chat_template,
        cutoff_len=cutoff,
        paired=True,
        where=lambda i: "p.jsonl line 1",
        **keys,
    )
    return {k: v[0] for k, v in out.items()}


@pytest.mark.parametrize("history", [True, False])
def test_a_long_preference_prompt_keeps_its_system_prompt_and_last_turn(tokenizer, history):
    talk = [
        {"from": m["role"].replace("assistant", "gpt"), "value": m["content"]} for m in exchanges(4)
    ]
    last = {"from": "user", "value": "and by day?" if history else "word " * 100}
    record = {"system": SYSTEM, "chosen": "blue " * 3, "rejected": "green " * 5}
    whole = _pair(tokenizer, {**record, "conversations": [*talk[-2:], last]}, 10**4)
    cutoff = len(whole["rejected_ids"]) + 3 if history else 160
    out = _pair(tokenizer, {**record, "conversations": [*talk, last]}, cutoff)
    assert out["status"] == "truncated" and len(out["rejected_ids"]) <= cutoff
    prompt = tokenizer.decode(out["input_ids"][: out["prompt_len"]])
    assert prompt.startswith(f"<|im_start|>system\n{SYSTEM}<|im_end|>\n")
    assert prompt.endswith("<|im_start|>assistant\n") and "question 0" not in prompt
    if history:  # the earliest exchanges dropped whole, nothing else cut
        assert {k: out[k] for k in whole if k != "status"} == {
            k: whole[k] for k in whole if k != "status"
        }
    else:
        assert "green " * 5 in tokenizer.decode(out["rejected_ids"][out["prompt_len"] :])


def test_default_system_reaches_preference_prompts(tokenizer):
    record = {"conversations": [{"from": "human", "value": "Hi"}], "chosen": "a", "rejected": "b"}
    given = _pair(tokenizer, {**record, "system": "Be brief."}, 64)
    assert _pair(tokenizer, {**record, "system": "Be brief."}, 64) == given
    assert _pair(tokenizer, record, 64, default_system="Be brief.") == given
    assert _pair(tokenizer, record, 64) != given
