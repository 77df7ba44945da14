"""`snug generate` and `snug eval` on the bundled base and data, against independent numbers:
a direct, unbatched `model.generate` for the answers, the training loop's own held-out loss
(summary.json) for the loss."""

from __future__ import annotations

import json
import math
import shutil
from pathlib import Path

import pytest
import torch
from peft import PeftModel, PromptTuningConfig, get_peft_model
from transformers import AutoModelForCausalLM, AutoTokenizer

from snug.cli import main
from snug.config import config_from_dict, load_config, save_config
from snug.deploy import generate as generate_mod
from snug.deploy.session import SessionError, open_session, parse_adapters
from snug.methods import apply_method
from snug.models.load import load_model
from snug.train.evaluate import answer_text, end_of_turn, stop_token_ids
from snug.train.finish import save_final
from snug.train.training import run_training

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
        given = {k: v for k, v in written.items() if k not in ("output", "adapter", "expected")}
        assert given == {k: v for k, v in row.items() if k != "output"}  # same row, same place
        assert written.get("expected") == row.get("output")

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
    assert [p.row for p in read] == rows
    assert [p.line for p in read] == list(range(1, len(rows) + 1))
    firsts = [p.messages[0] for p in read]
    assert firsts[4] == {"role": "system", "content": "Answer briefly."}
    assert all(
        m == {"role": "system", "content": "Be kind."} for i, m in enumerate(firsts) if i != 4
    )
    assert read[4].messages[-1]["role"] == "user"  # the reference answer is not in the prompt


def test_sampling_repeats_with_the_seed_and_changes_with_it(run, tmp_path):
    source, _ = prompts_file(tmp_path)
    outs = []
    for name, seed in (("a", "7"), ("b", "7"), ("c", "8")):
        outs.append(tmp_path / f"{name}.jsonl")
        argv = ["generate", "--adapter", str(run), "--input", str(source), "--output"]
        argv += [str(outs[-1]), "--temperature", "1.5", "--top-p", "0.9", "--seed", seed]
        assert main([*argv, "--max-new-tokens", "8"]) == 0
    assert read_rows(outs[0]) == read_rows(outs[1])
    assert read_rows(outs[0]) != read_rows(outs[2])  # so the draw is sampled, and seeded


@pytest.fixture(scope="module")
def prompt_adapter(tmp_path_factory):
    """A peft prompt-tuning adapter on the bundled base, as peft saves it (random prompt)."""
    torch.manual_seed(0)
    model = AutoModelForCausalLM.from_pretrained(BASE)
    peft_config = PromptTuningConfig(task_type="CAUSAL_LM", num_virtual_tokens=8)
    out = tmp_path_factory.mktemp("prompt") / "virtual"
    get_peft_model(model, peft_config).save_pretrained(out)
    return out


def forward_greedy(model, prompt: list[int], stops: list[int], max_new_tokens: int) -> list[int]:
    """Greedy answer ids by whole forward passes, no cache, no padding: the model's own answer."""
    ids = list(prompt)
    with torch.no_grad():
        while len(ids) < len(prompt) + max_new_tokens:
            ids.append(int(model(input_ids=torch.tensor([ids])).logits[0, -1].argmax()))
            if ids[-1] in stops:
                break
    return ids[len(prompt) :]


def test_prompt_learning_answers_are_the_models_own_in_any_batch(prompt_adapter):
    session = open_session(adapters=[str(prompt_adapter)], device="cpu")
    assert session.context() == 512 - 8  # the virtual tokens take positions
    questions = ["hi", "What is the last word in the list small king uma lamp rain?", "Copy a b"]
    prompts = [session.prompt_ids([{"role": "user", "content": q}]) for q in questions]
    stops = stop_token_ids(session.model, session.tok, session.template)
    marker = end_of_turn(session.tok, session.template)
    want = [
        answer_text(session.tok, forward_greedy(session.model, p, stops, 8), marker)
        for p in prompts
    ]
    assert generate_mod.generate(session, prompts, 3, 8) == want
    session.use("base")
    assert generate_mod.generate(session, prompts, 3, 8) != want  # the prompt changes answers


@pytest.fixture(scope="module")
def full_run(tmp_path_factory):
    """A full fine-tuning run directory whose model is the bundled base, unchanged."""
    run = tmp_path_factory.mktemp("full") / "full"
    run.mkdir()
    save_config(
        load_config(None, [f"model.name_or_path={BASE}", "method.name=full"]), run / "config.yaml"
    )
    shutil.copytree(BASE, run / "model")
    return run


def test_a_full_run_as_model_carries_adapters_and_its_name(run, full_run, tmp_path, capsys):
    summary = json.loads((run / "summary.json").read_text())["eval"]
    results = tmp_path / "compare.json"
    argv = ["eval", "--model", str(full_run), "--adapter", f"mine={run}", "--compare"]
    argv += ["--data", str(INSTRUCT / "heldout.jsonl"), "--limit", str(HELD_OUT)]
    assert main([*argv, "--metrics", "loss", "--output", str(results)]) == 0
    models = json.loads(results.read_text())["models"]
    assert list(models) == ["full", "mine"]  # the run's name, not "base"
    # eval scores with the loop's own eval_loss, over the same micro-batches (the adapter run's
    # train.micro_batch) of the same float32 weights, and LoRA's B = 0 adds exact zeros: the
    # losses are equal to the last bit (measured), so any difference is a real change (other
    # batches, precision, data or weights), not rounding.
    assert models["full"]["loss"] == summary["loss_before"]
    assert models["mine"]["loss"] == summary["loss_after"]

    source = write_jsonl(tmp_path / "prompts.jsonl", [{"prompt": "hi", "adapter": "theirs"}])
    out = tmp_path / "out.jsonl"
    argv = ["generate", "--model", str(full_run), "--input", str(source), "--output", str(out)]
    assert main([*argv, "--max-new-tokens", "4"]) == 0
    (row,) = read_rows(out)
    assert row["adapter"] == "full" and row["expected_adapter"] == "theirs"


def snug_adapter_run(tmp_path):
    """A run of snug's own bottleneck adapter (method adapter), saved as training saves it."""
    cfg = load_config(None, [f"model.name_or_path={BASE}", "method.name=adapter"])
    model = apply_method(load_model(cfg, torch.device("cpu"), "fp32"), cfg.method)
    run = tmp_path / "bottleneck"
    run.mkdir()
    save_config(cfg, run / "config.yaml")
    save_final(model, AutoTokenizer.from_pretrained(BASE), cfg, run)
    return run


def test_eval_refuses_what_it_cannot_score_in_one_line(run, tmp_path, capsys):
    skipping = shutil.copytree(run, tmp_path / "skipping")
    cfg = load_config(skipping / "config.yaml")
    cfg.data.on_error = "skip"
    save_config(cfg, skipping / "config.yaml")
    no_answer = write_jsonl(tmp_path / "no_answer.jsonl", [{"instruction": "hi", "output": ""}])
    heldout = str(INSTRUCT / "heldout.jsonl")
    for argv, message in [
        # every record dropped: no loss 0 / perplexity 1 of nothing
        (["--adapter", str(skipping), "--data", str(no_answer), "--metrics", "loss"], "1 dropped"),
        (["--adapter", str(skipping), "--data", str(no_answer)], "no sample to score"),
        # snug's own adapter cannot be switched off to score the base
        (
            ["--adapter", str(snug_adapter_run(tmp_path)), "--data", heldout, "--compare"],
            "cannot be switched off",
        ),
    ]:
        capsys.readouterr()
        assert main(["eval", *argv]) == 2, argv
        err = capsys.readouterr().err.strip()
        assert err.count("\n") == 0 and message in err, err
        assert "scoring" not in err


def test_a_prompt_too_long_for_the_context_is_refused_by_its_line(tmp_path, capsys):
    rows = [{"prompt": "hi"}, {"prompt": "word " * 600}]
    source = write_jsonl(tmp_path / "prompts.jsonl", rows)
    out = tmp_path / "out.jsonl"
    argv = ["generate", "--model", str(BASE), "--input", str(source), "--output", str(out)]
    assert main(argv) == 2
    err = capsys.readouterr().err.strip()
    assert err.startswith(f"error: {source} line 2: ") and "512-token context" in err, err
    assert not out.exists()


def test_adapter_specs_name_and_path(tmp_path):
    swept = tmp_path / "lr=1e-4"
    swept.mkdir()
    assert parse_adapters([str(swept)]) == [("lr=1e-4", swept)]  # a directory, not NAME=DIR
    assert parse_adapters(["runs/lr=1e-4"]) == [("lr=1e-4", Path("runs/lr=1e-4"))]  # '/' first
    assert parse_adapters(["mine=runs/a", "runs/b/adapter"]) == [
        ("mine", Path("runs/a")),
        ("b", Path("runs/b/adapter")),
    ]


def test_eval_loss_is_the_training_loops_held_out_loss(run, tmp_path, capsys, monkeypatch):
    from snug.runtime import progress

    summary = json.loads((run / "summary.json").read_text())["eval"]
    results = tmp_path / "results.json"
    argv = ["eval", "--adapter", str(run), "--data", str(INSTRUCT / "heldout.jsonl")]
    monkeypatch.setattr(progress, "EVERY_S", 0.0)  # a line at every batch
    capsys.readouterr()
    assert main([*argv, "--limit", str(HELD_OUT), "--output", str(results)]) == 0
    # the samples scored are counted (stdout: stderr keeps to errors), with the time left
    err = capsys.readouterr().out.splitlines()
    for what, batch in (("loss", 4), ("answers by generation", HELD_OUT)):  # 4: micro_batch
        assert f"eval run: {what}: {HELD_OUT} samples" in err
        assert any(
            line.startswith(f"eval run: {what}: {batch} of {HELD_OUT} samples, ") for line in err
        )
        assert any(line.startswith(f"eval run: {what}: {HELD_OUT} samples done in") for line in err)
    assert any(
        line.startswith(f"eval run: loss: 4 of {HELD_OUT} samples, 0 s, about") for line in err
    )
    said = [line.rsplit(" (", 1)[-1] for line in err if line.startswith("eval: loading: 0 of 2")]
    assert said == ["importing torch, transformers and peft)"]
    assert any(line.endswith("(loading the base and adapters)") for line in err)
    report = json.loads(results.read_text())
    mine = report["models"]["run"]
    # bit for bit, as in test_a_full_run_as_model_carries_adapters_and_its_name; and the
    # perplexity is the same float64 exp of the same float
    assert mine["loss"] == summary["loss_after"]
    assert mine["perplexity"] == math.exp(mine["loss"])
    assert mine["exact_match"] == summary["after"]
    assert 0 <= mine["exact_match"] <= mine["contains"] <= 1
    assert report["counts"] == {"records": 8, "samples": 8, "dropped": 0, "generated": 8}
    assert report["data"] == str(INSTRUCT / "heldout.jsonl")
    assert len(mine["samples"]) == 3 and {"expected", "answer"} <= set(mine["samples"][0])
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
    assert models["base"]["loss"] == summary["loss_before"]  # bit for bit, as above
    assert models["mine"]["loss"] == summary["loss_after"]
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


def test_a_failed_write_leaves_no_file_and_a_late_rival_keeps_the_results(tmp_path, monkeypatch):
    out = tmp_path / "out.jsonl"

    def crash(*_):
        raise OSError("disk full")

    with monkeypatch.context() as m:
        m.setattr(generate_mod.os, "fsync", crash)
        with pytest.raises(OSError):
            generate_mod.write_atomically(out, "x\n", "--output")
    assert list(tmp_path.iterdir()) == []
    out.write_text("there\n")  # appeared while generating
    with pytest.raises(SessionError, match="appeared while this ran") as refused:
        generate_mod.write_atomically(out, "x\n", "--output")
    assert out.read_text() == "there\n"
    (kept,) = [p for p in tmp_path.iterdir() if p != out]
    assert kept.read_text() == "x\n" and str(kept) in str(refused.value)


def _full_disk_at(monkeypatch, batch: int) -> None:
    """The disk fills up during the `batch`-th write of answers (1 = first): half of it goes
    to the file, then ENOSPC, as a real disk fails part way."""
    import errno
    import os

    from snug.deploy import partial as partial_mod

    writes, real = [], os.write

    def write(fd, data):
        if not os.readlink(f"/proc/self/fd/{fd}").endswith(".partial"):  # the lock's holder
            return real(fd, data)
        writes.append(len(data))
        if len(writes) == batch:
            real(fd, bytes(data[: len(data) // 2]))
            raise OSError(errno.ENOSPC, "No space left on device")
        return real(fd, data)

    monkeypatch.setattr(partial_mod.os, "write", write)


def test_a_full_disk_keeps_the_answers_written_and_the_same_command_goes_on(
    run, tmp_path, capsys, monkeypatch
):
    """Answers are appended a batch at a time; a full disk stops the command with one line
    naming the file, what was written stays (whole batches), and the same command again goes
    on from there and ends with the file an uninterrupted run writes (sampled: each batch's
    draw is its own)."""
    source, rows = prompts_file(tmp_path)
    argv = ["generate", "--adapter", str(run), "--input", str(source), "--batch-size", "2"]
    argv += ["--max-new-tokens", "6", "--temperature", "1.5", "--seed", "3", "--output"]
    whole = tmp_path / "whole.jsonl"
    assert main([*argv, str(whole)]) == 0
    out = tmp_path / "out.jsonl"
    partial, job = tmp_path / "out.jsonl.partial", tmp_path / "out.jsonl.partial.job"
    capsys.readouterr()
    with monkeypatch.context() as m:
        _full_disk_at(m, 3)
        assert main([*argv, str(out)]) == 1
    (err,) = capsys.readouterr().err.strip().splitlines()  # progress went to stdout
    assert err == (
        f"error: --output {out}: the disk is full; {partial} keeps 4 of {len(rows)} answers: "
        "make room and run the same command again to go on from there."
    )
    assert not out.exists() and job.exists()
    written = whole.read_text().splitlines(keepends=True)
    assert partial.read_text() == "".join(written[:4])  # the half batch is cut off again

    assert main([*argv, str(out)]) == 0
    said = capsys.readouterr().out.splitlines()
    assert f"going on with {partial}: 4 of {len(rows)} answers there" in said
    assert "generate run: 3 rows" in said  # the rows left, counted
    assert any(line.startswith("generate run: 3 rows done in") for line in said)
    assert out.read_text() == whole.read_text()
    assert not partial.exists() and not job.exists()


def test_a_partial_output_of_another_job_is_refused_and_left_as_it_is(
    run, tmp_path, capsys, monkeypatch
):
    source, rows = prompts_file(tmp_path)
    argv = ["generate", "--adapter", str(run), "--input", str(source), "--batch-size", "2"]
    out = tmp_path / "out.jsonl"
    argv += ["--max-new-tokens", "4", "--output", str(out)]
    partial, job = tmp_path / "out.jsonl.partial", tmp_path / "out.jsonl.partial.job"
    with monkeypatch.context() as m:
        _full_disk_at(m, 2)
        assert main(argv) == 1
    kept = {p: p.read_bytes() for p in (partial, job)}

    def refused(args, *said):
        capsys.readouterr()
        assert main(args) == 2
        (line,) = capsys.readouterr().err.strip().splitlines()
        assert line.startswith(f"error: --output {out}: ") and all(s in line for s in said), line
        assert {p: p.read_bytes() for p in kept} == kept and not out.exists()

    refused([*argv, "--temperature", "0.7"], "--temperature 0.0 there, 0.7 now", str(partial))
    refused([*argv, "--max-new-tokens", "5"], "--max-new-tokens 4 there, 5 now")
    fewer = write_jsonl(tmp_path / "fewer.jsonl", rows[:5])
    refused([*argv, "--input", str(fewer)], "its 7 rows are other prompts than --input's 5")
    refused([*argv, "--system", "Be brief."], "the prompts render to other tokens")
    refused([*argv, "--use", "base"], "another model answered")
    lines = partial.read_text().splitlines(keepends=True)
    partial.write_text(lines[0].replace('"id": 0', '"id": 9') + lines[1])  # not row 1's
    kept[partial] = partial.read_bytes()
    refused(argv, f"{partial} line 1 is not the answer to input row 1")
    job.unlink()
    del kept[job]
    refused(argv, f"{partial} exists, but no out.jsonl.partial.job says what it holds")
    partial.unlink()
    job.write_text("my notes\n")
    kept = {job: job.read_bytes()}
    refused(argv, f"{job} is not a job record of snug generate")


@pytest.fixture
def small_disk(tmp_path):
    """A real 12 KiB filesystem (tmpfs: three pages, one the job record's, one the lock's
    holder's), where mounting is allowed (root)."""
    import subprocess

    disk = tmp_path / "disk"
    disk.mkdir()
    mounted = subprocess.run(
        ["mount", "-t", "tmpfs", "-o", "size=12k", "tmpfs", str(disk)], capture_output=True
    )
    if mounted.returncode != 0:
        pytest.skip(f"cannot mount a tmpfs here: {mounted.stderr.decode().strip()}")
    try:
        yield disk
    finally:
        subprocess.run(["umount", str(disk)], check=True)


def test_a_real_full_disk_keeps_whole_batches_and_room_made_lets_it_finish(
    run, small_disk, tmp_path, capsys
):
    import subprocess

    rows = [json.loads(line) for line in (INSTRUCT / "heldout.jsonl").read_text().splitlines()]
    source = write_jsonl(tmp_path / "prompts.jsonl", rows[:80])
    out = small_disk / "answers.jsonl"
    argv = ["generate", "--adapter", str(run), "--input", str(source), "--output", str(out)]
    argv += ["--max-new-tokens", "2", "--batch-size", "4"]
    capsys.readouterr()
    assert main(argv) == 1
    (err,) = capsys.readouterr().err.strip().splitlines()
    assert err.startswith(f"error: --output {out}: the disk is full; {out}.partial keeps ")
    kept = (small_disk / "answers.jsonl.partial").read_text().splitlines()
    assert f"keeps {len(kept)} of 80 answers" in err and 0 < len(kept) < 80 and len(kept) % 4 == 0
    subprocess.run(["mount", "-o", "remount,size=64k", str(small_disk)], check=True)
    assert main(argv) == 0
    answers = [json.loads(line) for line in out.read_text().splitlines()]
    assert [a["instruction"] for a in answers] == [r["instruction"] for r in rows[:80]]
    assert [json.loads(line) for line in kept] == answers[: len(kept)]


HOLD_OUTPUT = """
import fcntl, json, os, socket, sys, time
fd = os.open(sys.argv[1], os.O_RDWR | os.O_CREAT, 0o644)
fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
info = {"pid": os.getpid(), "host": socket.gethostname(), "command": "snug generate first"}
os.write(fd, json.dumps({**info, "since": "2025-01-01T00:00:00"}).encode())
print("held", flush=True)
time.sleep(300)
"""


def test_a_second_generate_on_the_same_output_is_refused_naming_the_first(tmp_path, capsys):
    """Two `snug generate` on one --output would both go on with the same OUT.partial and
    append into each other: the first holds OUT.partial.lock (an OS lock), the second is
    refused in one line naming its process, before the model loads, and changes nothing."""
    import os
    import re
    import socket
    import subprocess
    import sys

    source = write_jsonl(tmp_path / "prompts.jsonl", [{"prompt": "one"}, {"prompt": "two"}])
    out = tmp_path / "out.jsonl"
    lock = tmp_path / "out.jsonl.partial.lock"
    env = {
        **os.environ,
        "PYTHONPATH": os.pathsep.join([str(ROOT), os.environ.get("PYTHONPATH", "")]),
    }
    first = subprocess.Popen(
        [sys.executable, "-c", HOLD_OUTPUT, str(lock)], stdout=subprocess.PIPE, text=True, env=env
    )
    try:
        assert first.stdout.readline().strip() == "held"
        before = {p.name: p.read_bytes() for p in tmp_path.iterdir()}
        capsys.readouterr()
        argv = ["generate", "--model", str(BASE), "--input", str(source), "--output", str(out)]
        assert main(argv) == 2
        said = capsys.readouterr()
        (line,) = said.err.strip().splitlines()
        assert re.fullmatch(
            rf"error: --output {re.escape(str(out))} is being written by another snug generate "
            rf"\(pid {first.pid} on {re.escape(socket.gethostname())}: snug generate first, "
            r"since [\d:T-]+\); wait for it to end, or name another output\.",
            line,
        ), line
        assert "loading" not in said.out
        assert {p.name: p.read_bytes() for p in tmp_path.iterdir()} == before
    finally:
        first.kill()
        first.wait()
    from snug.runtime import lockfile

    lockfile.release(lock, lockfile.take(lock))  # free once its holder is gone


def test_a_partial_output_removed_while_it_runs_is_one_line(tmp_path, capsys, monkeypatch):
    """OUT.partial removed by hand between two batches: one line saying so, not an
    unexpected FileNotFoundError; the same command again starts over."""
    from snug.deploy import partial as partial_mod

    source = write_jsonl(tmp_path / "prompts.jsonl", [{"prompt": "one"}, {"prompt": "two"}])
    out = tmp_path / "out.jsonl"
    argv = ["generate", "--model", str(BASE), "--input", str(source), "--output", str(out)]
    argv += ["--batch-size", "1", "--max-new-tokens", "2"]
    real = partial_mod.Partial.append

    def append(self, text, total):
        if self.done == 1:
            self.path.unlink()
        return real(self, text, total)

    capsys.readouterr()
    with monkeypatch.context() as m:
        m.setattr(partial_mod.Partial, "append", append)
        assert main(argv) == 1
    (line,) = capsys.readouterr().err.strip().splitlines()
    assert line == (
        f"error: --output {out}: {out}.partial was removed while this ran, and its 1 of 2 "
        "answers with it; run the same command again to start over."
    )
    assert main(argv) == 0
    assert len(read_rows(out)) == 2
    # removed after the last batch, before it becomes OUT (os.link's FileNotFoundError was
    # taken for a filesystem without hard links, then os.rename failed "unexpected")
    out.unlink()
    real_finish = partial_mod.Partial.finish

    def finish(self, total):
        self.path.unlink()
        return real_finish(self, total)

    with monkeypatch.context() as m:
        m.setattr(partial_mod.Partial, "finish", finish)
        assert main(argv) == 1
    (line,) = capsys.readouterr().err.strip().splitlines()
    assert line == (
        f"error: --output {out}: {out}.partial was removed while this ran, and its 2 of 2 "
        "answers with it; run the same command again to start over."
    )
    assert not out.exists()


def test_a_named_pipe_or_an_overlong_line_as_input_is_one_line(tmp_path, capsys, monkeypatch):
    """`generate --input` and `eval --data` given a named pipe (FIFO): one line saying what it
    is, before the model loads and without opening it (which would wait for a writer); a
    JSON Lines line over the limit (data/locate.py MAX_LINE_BYTES, made small here) is named
    by its line before any of it is parsed, as for training data."""
    import os

    from test_bombs import deadline

    from snug.data import locate

    pipe = tmp_path / "pipe.jsonl"
    os.mkfifo(pipe)
    out = tmp_path / "out.jsonl"
    for argv in (
        ["generate", "--model", str(BASE), "--input", str(pipe), "--output", str(out)],
        ["eval", "--model", str(BASE), "--data", str(pipe)],
    ):
        capsys.readouterr()
        with deadline(60):
            assert main(argv) == 2
        said = capsys.readouterr()
        (line,) = said.err.strip().splitlines()
        flag = argv[3]
        assert line.startswith(
            f"error: {flag} {pipe} is a named pipe (FIFO), not a regular file: snug reads"
        ), line
        assert "loading" not in said.out
    monkeypatch.setattr(locate, "MAX_LINE_BYTES", 64)
    long = tmp_path / "long.jsonl"
    long.write_text('{"prompt": "one"}\n{"prompt": "' + "x" * 100 + '"}\n')
    capsys.readouterr()
    assert main(["generate", "--model", str(BASE), "--input", str(long), "--output", str(out)]) == 2
    (line,) = capsys.readouterr().err.strip().splitlines()
    assert line == (
        f"error: {long} line 2: longer than 64 bytes, more than one record may hold; is it one "
        "JSON record per line?"
    )
    assert not out.exists()


def test_the_batch_size_help_says_a_batch_is_consecutive_rows(capsys):
    """Batches are consecutive rows (each written as it comes, for an exact resume), no longer
    rows grouped by length: `snug generate --help` says so where --batch-size is."""
    with pytest.raises(SystemExit) as done:
        main(["generate", "--help"])
    assert done.value.code == 0
    said = " ".join(capsys.readouterr().out.split())
    batch = said.rsplit("--batch-size BATCH_SIZE", 1)[1].split("--max-new-tokens", 1)[0]
    assert "consecutive rows, in the input's order (not grouped by length)" in batch


def test_a_rows_own_output_and_adapter_are_kept_as_the_expected_answer():
    """An alpaca row's "output" (or an earlier generate's answer) is the expected answer: kept
    as "expected" (and its "adapter" as "expected_adapter") beside the new "output"."""
    row = {"instruction": "Say hi.", "output": "hi", "adapter": "theirs"}
    written = generate_mod.output_row(row, "hello", "mine")
    assert written == {
        "instruction": "Say hi.",
        "expected": "hi",
        "expected_adapter": "theirs",
        "output": "hello",
        "adapter": "mine",
    }
    assert generate_mod.output_row({"prompt": "x"}, "y", "m") == {
        "prompt": "x",
        "output": "y",
        "adapter": "m",
    }


def test_a_session_error_is_a_user_error_of_its_own_not_a_merge_error(tmp_path, capsys):
    """Adapters that cannot be loaded together are refused as a SessionError: a UserError
    (exit 2, one line), not a kind of MergeError (nothing is merged)."""
    from snug.deploy.merge import MergeError
    from snug.errors import UserError

    with pytest.raises(SessionError) as refused:
        parse_adapters([f"base={tmp_path}"])
    assert isinstance(refused.value, UserError) and not isinstance(refused.value, MergeError)
    source = write_jsonl(tmp_path / "prompts.jsonl", [{"prompt": "hi"}])
    out = tmp_path / "out.jsonl"
    argv = ["generate", "--adapter", f"base={tmp_path}", "--input", str(source), "--output"]
    assert main([*argv, str(out)]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert err == [
        f"error: --adapter base={tmp_path}: the name 'base' means the model without one."
    ]
    assert not out.exists()
