"""`snug generate` and `snug eval` on the bundled base and data, against independent numbers:
a direct, unbatched `model.generate` for the answers, the training loop's own held-out loss
(summary.json) for the loss."""

from __future__ import annotations

import json
import math

import pytest
import torch
from peft import PeftModel
from transformers import AutoModelForCausalLM, AutoTokenizer

from snug.cli import main
from snug.config import config_from_dict
from snug.deploy import generate as generate_mod
from snug.deploy.session import SessionError
from snug.train.loop import run_training

from conftest import ROOT, write_jsonl

BASE = ROOT / "models/tiny"
INSTRUCT = ROOT / "data/instruct"
HELD_OUT = 8  # held-out records the run evaluates and these tests score


@pytest.fixture(scope="module")
def run(tmp_path_factory):
    """A LoRA run of a few steps on the bundled task: its summary.json holds the training
    loop's held-out loss before (adapter = 0, i.e. the base) and after training."""
    out = tmp_path_factory.mktemp("gen") / "run"
    raw = {
        "model": {"name_or_path": str(BASE)},
        "method": {"name": "lora", "r": 4},
        "data": {
            "train": str(INSTRUCT / "train.jsonl"),
            "eval": str(INSTRUCT / "heldout.jsonl"),
            "max_samples": HELD_OUT,  # of train and of eval
            "cutoff_len": 64,
        },
        "train": {
            "max_steps": 4,
            "micro_batch": 4,
            "grad_accum": 1,
            "lr": 3e-3,
            "eval_generate": HELD_OUT,
            "max_new_tokens": 12,
            "log_every": 10,
        },
        "memory": {"grad_checkpointing": False},
        "output": {"dir": str(out), "plot_loss": False},
    }
    summary = run_training(config_from_dict(raw))
    assert summary["status"] == "completed"
    return out


def prompts_file(tmp_path):
    """Every accepted row shape, mixed; prompts of several lengths, so batches are padded."""
    held = [json.loads(line) for line in (INSTRUCT / "heldout.jsonl").read_text().splitlines()]
    rows = [
        {"prompt": held[0]["instruction"], "id": 0},
        {"messages": [{"role": "user", "content": held[1]["instruction"]}]},
        held[2],  # alpaca, with its reference "output"
        {"conversations": [{"from": "human", "value": held[3]["instruction"]}]},
        {
            "messages": [
                {"role": "system", "content": "Answer briefly."},
                {"role": "user", "content": held[4]["instruction"]},
                {"role": "assistant", "content": "a reference answer, left out of the prompt"},
            ]
        },
        {"prompt": "hi"},
        {"instruction": held[5]["instruction"], "input": "and then some more words here"},
    ]
    return write_jsonl(tmp_path / "prompts.jsonl", rows), rows


def direct_greedy(model, tok, messages, max_new_tokens):
    """One prompt at a time, no padding: transformers' own greedy answer."""
    text = tok.apply_chat_template(messages, tokenize=False, add_generation_prompt=True)
    ids = tok(text, add_special_tokens=False, return_tensors="pt")["input_ids"]
    stops = [tok.eos_token_id, tok.convert_tokens_to_ids("<|im_end|>")]
    with torch.no_grad():
        out = model.generate(
            input_ids=ids,
            max_new_tokens=max_new_tokens,
            do_sample=False,
            eos_token_id=stops,
            pad_token_id=tok.pad_token_id,
        )
    return tok.decode(out[0, ids.shape[1] :], skip_special_tokens=True)


def read_rows(path):
    return [json.loads(line) for line in path.read_text().splitlines()]


def test_generate_answers_every_row_in_order_as_greedy_decoding_would(run, tmp_path):
    source, rows = prompts_file(tmp_path)
    out = tmp_path / "out.jsonl"
    argv = ["generate", "--adapter", f"mine={run}", "--input", str(source), "--output", str(out)]
    assert main([*argv, "--batch-size", "3", "--max-new-tokens", "12"]) == 0

    got = read_rows(out)
    assert len(got) == len(rows)
    for row, written in zip(rows, got, strict=True):
        assert written["adapter"] == "mine"
        given = {k: v for k, v in written.items() if k not in ("output", "adapter", "reference")}
        assert given == {k: v for k, v in row.items() if k != "output"}  # same row, same place
        assert written.get("reference") == row.get("output")

    tok = AutoTokenizer.from_pretrained(BASE)
    model = PeftModel.from_pretrained(AutoModelForCausalLM.from_pretrained(BASE), run / "adapter")
    model.eval()
    conversations = [
        [{"role": "user", "content": rows[0]["prompt"]}],
        rows[1]["messages"],
        [{"role": "user", "content": rows[2]["instruction"]}],
        [{"role": "user", "content": rows[3]["conversations"][0]["value"]}],
        rows[4]["messages"][:2],
        [{"role": "user", "content": "hi"}],
        [{"role": "user", "content": f"{rows[6]['instruction']}\n\n{rows[6]['input']}"}],
    ]
    want = [direct_greedy(model, tok, c, 12) for c in conversations]
    assert [r["output"] for r in got] == want

    # --use base: the base model answers, and says so
    base_out = tmp_path / "base.jsonl"
    argv = ["generate", "--adapter", f"mine={run}", "--input", str(source)]
    assert main([*argv, "--output", str(base_out), "--use", "base", "--max-new-tokens", "12"]) == 0
    with model.disable_adapter():
        want_base = [direct_greedy(model, tok, c, 12) for c in conversations]
    assert [r["output"] for r in read_rows(base_out)] == want_base
    assert {r["adapter"] for r in read_rows(base_out)} == {"base"}
    assert want_base != want  # the adapter changes answers, so the comparisons above can fail


def test_system_goes_first_unless_the_row_brings_its_own(tmp_path):
    source, rows = prompts_file(tmp_path)
    read = generate_mod.read_prompts(source, system="Be kind.")
    assert [row for row, _ in read] == rows
    firsts = [messages[0] for _, messages in read]
    assert firsts[4] == {"role": "system", "content": "Answer briefly."}
    assert all(
        m == {"role": "system", "content": "Be kind."} for i, m in enumerate(firsts) if i != 4
    )
    assert read[4][1][-1]["role"] == "user"  # the reference answer is not part of the prompt


def test_sampling_repeats_with_the_seed(run, tmp_path):
    source, _ = prompts_file(tmp_path)
    outs = []
    for name in ("a", "b"):
        outs.append(tmp_path / f"{name}.jsonl")
        argv = ["generate", "--adapter", str(run), "--input", str(source), "--output"]
        argv += [str(outs[-1]), "--temperature", "1.5", "--top-p", "0.9", "--seed", "7"]
        assert main([*argv, "--max-new-tokens", "8"]) == 0
    assert read_rows(outs[0]) == read_rows(outs[1])


def test_eval_loss_is_the_training_loops_held_out_loss(run, tmp_path):
    summary = json.loads((run / "summary.json").read_text())["eval"]
    results = tmp_path / "results.json"
    argv = ["eval", "--adapter", str(run), "--data", str(INSTRUCT / "heldout.jsonl")]
    assert main([*argv, "--limit", str(HELD_OUT), "--output", str(results)]) == 0
    report = json.loads(results.read_text())
    mine = report["models"]["run"]
    assert mine["loss"] == pytest.approx(summary["loss_after"], rel=1e-6)
    assert mine["perplexity"] == pytest.approx(math.exp(mine["loss"]), rel=1e-12)
    assert mine["exact_match"] == summary["after"]
    assert 0 <= mine["exact_match"] <= mine["contains"] <= 1
    assert report["counts"] == {"records": 8, "samples": 8, "dropped": 0, "generated": 8}
    assert report["data"] == str(INSTRUCT / "heldout.jsonl")
    assert len(mine["samples"]) == 3 and {"reference", "answer"} <= set(mine["samples"][0])
    assert list(report["models"]) == ["run"]  # without --compare: only the active adapter


def test_compare_puts_base_and_each_adapter_side_by_side(run, tmp_path, capsys):
    summary = json.loads((run / "summary.json").read_text())["eval"]
    results = tmp_path / "compare.json"
    argv = ["eval", "--adapter", f"mine={run}", "--data", str(INSTRUCT / "heldout.jsonl")]
    argv += ["--limit", str(HELD_OUT), "--compare", "--metrics", "loss", "--output", str(results)]
    capsys.readouterr()
    assert main(argv) == 0
    table = capsys.readouterr().out.splitlines()
    header = next(line for line in table if line.startswith("metric"))
    assert header.split() == ["metric", "base", "mine"]
    loss_row = next(line for line in table if line.startswith("loss")).split()
    assert len(loss_row) == 3 and loss_row[1] != loss_row[2]
    models = json.loads(results.read_text())["models"]
    # LoRA starts at B = 0: the loop's loss before training is the base's
    assert models["base"]["loss"] == pytest.approx(summary["loss_before"], rel=1e-5)
    assert models["mine"]["loss"] == pytest.approx(summary["loss_after"], rel=1e-6)
    assert models["mine"]["loss"] < models["base"]["loss"]
    assert "exact_match" not in models["base"]  # --metrics loss: no generation


@pytest.mark.parametrize(
    "line,why",
    [
        ('{"prompt": "unclosed"', "not valid JSON"),
        ('{"question": "what?"}', "cannot tell the prompt"),
        ('{"messages": [{"role": "user", "content": ""}]}', "field 'messages' is empty"),
    ],
)
def test_a_bad_row_is_named_by_its_line(line, why, tmp_path, capsys):
    source = tmp_path / "prompts.jsonl"
    source.write_text('{"prompt": "one"}\n\n' + line + "\n")
    out = tmp_path / "out.jsonl"
    assert (
        main(["generate", "--model", str(BASE), "--input", str(source), "--output", str(out)]) == 2
    )
    err = capsys.readouterr().err.strip()
    assert err.startswith(f"error: {source} line 3: ") and why in err and "\n" not in err
    assert not out.exists()


def test_an_existing_output_is_never_overwritten(tmp_path, capsys):
    source = write_jsonl(tmp_path / "prompts.jsonl", [{"prompt": "one"}])
    out = tmp_path / "out.jsonl"
    out.write_text("mine\n")
    argv = ["--model", str(BASE), "--output", str(out)]
    assert main(["generate", *argv, "--input", str(source)]) == 2
    assert "already exists" in capsys.readouterr().err
    assert main(["eval", *argv, "--data", str(INSTRUCT / "heldout.jsonl")]) == 2
    assert "already exists" in capsys.readouterr().err
    assert out.read_text() == "mine\n"


def test_a_failed_write_leaves_no_file(tmp_path, monkeypatch):
    out = tmp_path / "out.jsonl"

    def crash(*_):
        raise OSError("disk full")

    monkeypatch.setattr(generate_mod.os, "replace", crash)
    with pytest.raises(OSError):
        generate_mod.write_atomically(out, "x\n", "--output")
    assert list(tmp_path.iterdir()) == []
    out.write_text("there\n")
    with pytest.raises(SessionError, match="already exists"):  # appeared while generating
        generate_mod.write_atomically(out, "x\n", "--output")
    assert out.read_text() == "there\n" and len(list(tmp_path.iterdir())) == 1
