"""snug tried as a careless user and as an attacker would: every bad input of issue 14 gets
one line that names the file, key or line (exit 2), and nothing of the user's changes.

A world (a tiny base model, data, a config with relative paths, a finished LoRA run with two
checkpoints and a finished full run) is built once and copied back to the same place before
each case, so absolute paths recorded by the runs stay true. Each case changes something in
it, runs the `snug` command line in this process, and the test checks the exit status, that
stderr is one line matching the case's message, and that every file of the world is
byte-identical afterwards (`changes` lists the ones the case may write), but for the status
a `snug train` that failed while starting leaves beside the earlier run's (train/status.py),
which must say failed with that same line."""

from __future__ import annotations

import hashlib
import io
import json
import os
import pickle
import re
import shutil
import subprocess
import sys
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

import pytest
import yaml

from snug.cli import main

from conftest import ROOT, make_tiny_model, method_keys, write_jsonl

WORDS = "red blue green cat dog sun moon tree".split()
CONFIG = {
    "model": {"name_or_path": "model"},
    "method": {"name": "lora", "r": 2},
    "data": {"train": "data/train.jsonl", "cutoff_len": 64},
    "train": {
        "max_steps": 2,
        "micro_batch": 4,
        "grad_accum": 1,
        "eval_generate": 0,
        "log_every": 1,
    },
    "memory": {"grad_checkpointing": False},
    "output": {"dir": "run", "save_every": 1},
}


@dataclass
class World:
    root: Path

    @property
    def cfg(self) -> Path:
        return self.root / "cfg.yaml"

    @property
    def run(self) -> Path:
        return self.root / "run"

    def config(self, **changes) -> dict:
        raw = json.loads(json.dumps(CONFIG))
        for key, value in changes.items():
            section, name = key.split("__")
            raw[section][name] = value
        # a case that switches the method keeps the keys the new method has (r for lora)
        name = raw["method"]["name"]
        raw["method"] = {"name": name, **method_keys(name, **raw["method"])}
        return raw

    def write_config(self, name: str = "cfg.yaml", text: str | None = None, **changes) -> Path:
        path = self.root / name
        path.write_text(text if text is not None else yaml.safe_dump(self.config(**changes)))
        return path


def snapshot(root: Path) -> dict[str, str]:
    """sha256 of every file under `root` (the datasets cache lives elsewhere)."""
    return {
        str(p.relative_to(root)): hashlib.sha256(p.read_bytes()).hexdigest()
        for p in sorted(root.rglob("*"))
        if p.is_file()
    }


def failed_start_status(root: Path, new: set[str], lines: list[str]) -> set[str]:
    """Of the `new` files, the status files a run that failed while starting left (a new
    status.json, or status.starting.json beside an earlier run's), each checked to say failed
    with the one line on stderr."""
    from snug.train.status import NAME, STARTING

    found = {k for k in new if Path(k).name in (NAME, STARTING)}
    for k in found:
        status = json.loads((root / k).read_text())
        assert status["state"] == "failed" and status["taken_over"] is False, status
        assert lines == [f"error: {status['error'].split(': ', 1)[1]}"], (status, lines)
    return found


def run_cli(argv: list[str], capsys, cwd: Path | None = None, stdin: str | None = None):
    """`snug ARGV` in this process: (exit status, stdout, stderr)."""
    capsys.readouterr()  # what the case's set-up printed
    old = Path.cwd()
    old_stdin = sys.stdin
    os.environ["COLUMNS"] = "400"  # rich wraps long lines of a non-terminal at 80 columns
    try:
        if cwd is not None:
            os.chdir(cwd)
        if stdin is not None:
            sys.stdin = io.StringIO(stdin)
        code = main(argv)
    finally:
        os.chdir(old)
        sys.stdin = old_stdin
        del os.environ["COLUMNS"]
    out, err = capsys.readouterr()
    return code, out, err


@pytest.fixture(scope="module")
def pristine(tmp_path_factory, tokenizer) -> Path:
    base = tmp_path_factory.mktemp("hostile")
    live = base / "live"
    make_tiny_model("llama", live / "model", tokenizer)
    rows = [
        {"instruction": "Give the first word.", "input": f"{a} {b}", "output": a}
        for a in WORDS
        for b in WORDS[:2]
    ]
    (live / "data").mkdir(parents=True)
    write_jsonl(live / "data/train.jsonl", rows)
    write_jsonl(live / "prompts.jsonl", [{"prompt": "Give the first word.\n\nred cat"}])
    world = World(live)
    world.write_config()
    assert main(["train", str(world.cfg)]) == 0
    full = world.write_config(
        "full.yaml", method__name="full", output__dir="run_full", output__save_every=None
    )
    assert main(["train", str(full)]) == 0
    shutil.copytree(live, base / "pristine")
    return base


@pytest.fixture
def world(pristine) -> World:
    live = pristine / "live"
    shutil.rmtree(live)
    shutil.copytree(pristine / "pristine", live)
    return World(live)


@dataclass
class Case:
    argv: list[str]
    message: str | None  # regex the one line on stderr matches; None: the command succeeds
    code: int = 2
    cwd: Path | None = None
    stdin: str | None = None
    changes: tuple[str, ...] = ()  # files (relative to the world) the command may write
    check: Callable[[World, str, str], None] | None = None  # more to assert afterwards
    code_must_not_run: bool = False  # checked first: no planted payload or model code ran


CASES: dict[str, Callable[[World], Case]] = {}


def case(fn: Callable[[World], Case]) -> Callable[[World], Case]:
    CASES[fn.__name__.removeprefix("case_")] = fn
    return fn


PAYLOAD_MARK = "payload-ran"


def plant_pickle(path: Path, mark: Path) -> None:
    """A pickle that, if anything unpickles it, creates `mark`."""

    class Payload:
        def __reduce__(self):
            return (open, (str(mark), "w"))

    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_bytes(pickle.dumps(Payload()))


# -- 1-3: an earlier run's outputs are never lost ------------------------------------------------
@case
def case_1_typo_in_data_train_of_a_finished_run(w: World) -> Case:
    w.write_config(data__train="data/trian.jsonl")
    return Case(["train", str(w.cfg)], r"data\.train=\S*data/trian\.jsonl: no such file")


def _registry(w: World) -> None:
    """The world's data folder as LLaMA-Factory's: a dataset_info.json naming its file."""
    info = {"words": {"file_name": "train.jsonl"}}
    (w.root / "data" / "dataset_info.json").write_text(json.dumps(info))


@case
def case_35_1_llamafactory_data_folder_given_as_data_train(w: World) -> Case:
    _registry(w)
    w.write_config(data__train="data")
    return Case(["train", str(w.cfg)], r"LLaMA-Factory data folder.*data\.dataset_dir=.*words")


@case
def case_35_1_misspelt_dataset_name_of_a_finished_run(w: World) -> Case:
    _registry(w)
    w.write_config(data__dataset_dir="data", data__train="wrods")
    return Case(["train", str(w.cfg)], r"'wrods' is not a dataset of .*did you mean words")


@case
def case_2_full_fine_tune_continued_from_its_own_model(w: World) -> Case:
    cfg = w.write_config(
        "more.yaml",
        method__name="full",
        model__name_or_path="run_full/model",
        output__dir="run_full",
    )
    return Case(
        ["train", str(cfg)],
        r"model\.name_or_path=\S*run_full/model lies inside output\.dir=\S*run_full, whose model",
    )


def _corrupt(w: World, how: str) -> Case:
    step = w.run / "checkpoints/step-2"
    if how == "truncated weights":
        data = (step / "trainable.safetensors").read_bytes()
        (step / "trainable.safetensors").write_bytes(data[: len(data) // 2])
    elif how == "garbage state":
        (step / "state.json").write_text("{not json")
    elif how == "state tensors missing":
        (step / "state.safetensors").unlink()
    return Case(
        ["train", str(w.cfg), "train.max_steps=3"],
        r"checkpoint \S*checkpoints/step-2 cannot be resumed \(.+\); nothing was changed: run "
        r"with --fresh to start over, or delete \S*step-2 to resume from step-1\.",
    )


@case
def case_3_resume_from_a_truncated_checkpoint(w: World) -> Case:
    return _corrupt(w, "truncated weights")


@case
def case_11_corrupt_checkpoint_state(w: World) -> Case:
    return _corrupt(w, "garbage state")


@case
def case_11_checkpoint_state_tensors_missing(w: World) -> Case:
    return _corrupt(w, "state tensors missing")


# -- issue 33: a run folder with links in it; a finished run of another config --------------------
@case
def case_33_1_symlinked_checkpoints_folder_with_fresh(w: World) -> Case:
    """The issue's case: checkpoints/ moved elsewhere and linked back; --fresh would have to
    remove it (rmtree refuses a link) after the earlier outputs were already deleted."""
    shutil.move(w.run / "checkpoints", w.root / "elsewhere")
    (w.run / "checkpoints").symlink_to(w.root / "elsewhere")
    return Case(
        ["train", str(w.cfg), "--fresh"],
        r"output\.dir=\S*run: checkpoints is a symbolic link \(to \S*elsewhere\); snug does not "
        r"write, move or delete through links inside a run folder",
    )


@case
def case_33_1_symlinked_metrics_file(w: World) -> Case:
    """Resuming appends to metrics.jsonl: through a link it would write into another file."""
    (w.root / "notes.txt").write_text("mine\n")
    (w.run / "metrics.jsonl").unlink()
    (w.run / "metrics.jsonl").symlink_to(w.root / "notes.txt")
    return Case(
        ["train", str(w.cfg), "train.max_steps=3"],
        r"output\.dir=\S*run: metrics\.jsonl is a symbolic link \(to \S*notes\.txt\)",
    )


@case
def case_33_1_symlinked_checkpoint(w: World) -> Case:
    """keep_last would prune checkpoints/step-1, a link to a copy kept elsewhere."""
    shutil.move(w.run / "checkpoints/step-1", w.root / "kept-step-1")
    (w.run / "checkpoints/step-1").symlink_to(w.root / "kept-step-1")
    return Case(
        ["train", str(w.cfg), "train.max_steps=3"],
        r"output\.dir=\S*run: checkpoints/step-1 is a symbolic link \(to \S*kept-step-1\)",
    )


@case
def case_33_3_finished_run_of_another_config(w: World) -> Case:
    """run_full holds a finished full fine-tune without checkpoints: a LoRA run into it would
    have replaced it silently (identity was checked only against a checkpoint)."""
    return Case(
        ["train", str(w.cfg), f"output.dir={w.root / 'run_full'}"],
        r"\S*run_full holds a finished sft run of \S*/model that differs from this one "
        r"\(method\.name: 'full' -> 'lora'.*\); use another output\.dir, or --fresh to replace it",
    )


def _trained_again(w: World, out: str, err: str) -> None:
    summary = json.loads((w.root / "run_full/summary.json").read_text())
    assert summary["status"] == "completed" and summary["steps"] == 2
    assert (w.root / "run_full/model").is_dir()
    assert not (w.root / "run_full/previous").exists()


@case
def case_33_3_same_config_on_a_finished_run_trains_again(w: World) -> Case:
    """The same config again on a finished run without checkpoints trains it again, as before."""
    return Case(
        ["train", str(w.root / "full.yaml")],
        None,
        0,
        changes=("run_full",),
        check=_trained_again,
    )


# -- 4: no type coercion in data reading -----------------------------------------------------------
MIXED = [
    {"instruction": "a", "output": "fine"},
    {"instruction": "b", "output": 6},
    {"instruction": "c", "output": "4"},
    {"instruction": "d", "output": "true"},
    {"instruction": "e", "output": "null"},
    {"instruction": "f", "output": "[1, 2]"},
]


@case
def case_4_strict_names_the_mistyped_line(w: World) -> Case:
    write_jsonl(w.root / "data/mixed.jsonl", MIXED)
    w.write_config(data__train="data/mixed.jsonl")
    return Case(
        ["train", str(w.cfg)],
        r"\S*data/mixed\.jsonl line 2: field 'output' must be a string, not int",
    )


def _kept_five(w: World, out: str, err: str) -> None:
    summary = json.loads((w.root / "skip/summary.json").read_text())
    assert summary["data"]["kept"] == 5 and summary["data"]["invalid"] == 1, summary["data"]
    assert summary["data"]["problems"] == [
        f"{w.root}/data/mixed.jsonl line 2: field 'output' must be a string, not int."
    ]


@case
def case_4_skip_drops_exactly_the_mistyped_record(w: World) -> Case:
    write_jsonl(w.root / "data/mixed.jsonl", MIXED)
    cfg = w.write_config(
        "skip.yaml",
        data__train="data/mixed.jsonl",
        data__on_error="skip",
        output__dir="skip",
        output__save_every=None,
        train__max_steps=1,
    )
    return Case(["train", str(cfg)], None, 0, changes=("skip",), check=_kept_five)


# -- 5-6: no code runs that nobody asked for --------------------------------------------------------
@case
def case_5_pickled_sharded_checkpoint_is_never_unpickled(w: World) -> Case:
    """A checkpoint in the old torch.distributed.checkpoint layout, whose .metadata and
    state.pt are pickles that would run code when read."""
    step = w.run / "checkpoints/step-3"
    plant_pickle(step / "dcp/.metadata", w.root / PAYLOAD_MARK)
    plant_pickle(step / "state.pt", w.root / PAYLOAD_MARK)
    (step / "COMPLETE").write_text("3")
    return Case(
        ["train", str(w.cfg), "train.max_steps=4"],
        r"checkpoint \S*step-3 cannot be resumed \(it was written by an older snug as a "
        r"pickle, which snug no longer reads\).*--fresh",
        code_must_not_run=True,
    )


def assert_not_run(w: World) -> None:
    assert not (w.root / PAYLOAD_MARK).exists(), "the pickle payload ran"
    assert not (w.root / "remote-code-ran").exists(), "the model's own code ran"


REMOTE_CODE = """
from pathlib import Path
Path(MARK).write_text("yes")  # transformers runs a copy of this file from its modules cache
from transformers import LlamaConfig, LlamaForCausalLM
class CustomConfig(LlamaConfig):
    model_type = "llama"
class CustomModel(LlamaForCausalLM):
    config_class = CustomConfig
"""


def _remote_code_run(w: World) -> None:
    """The run's base becomes a model that ships code (auto_map); the run's config.yaml, as an
    attacker would leave it, says trust_remote_code: true."""
    custom = w.root / "custom"
    shutil.copytree(w.root / "model", custom)
    mark = repr(str(w.root / "remote-code-ran"))
    (custom / "custom_model.py").write_text(REMOTE_CODE.replace("MARK", mark))
    config = json.loads((custom / "config.json").read_text())
    config["auto_map"] = {
        "AutoConfig": "custom_model.CustomConfig",
        "AutoModelForCausalLM": "custom_model.CustomModel",
    }
    (custom / "config.json").write_text(json.dumps(config))
    saved = yaml.safe_load((w.run / "config.yaml").read_text())
    saved["model"]["trust_remote_code"] = True
    saved["model"]["name_or_path"] = str(custom)
    (w.run / "config.yaml").write_text(yaml.safe_dump(saved))


@case
def case_6_run_config_cannot_switch_remote_code_on_for_generate(w: World) -> Case:
    _remote_code_run(w)
    argv = ["generate", "--adapter", str(w.run), "--input", str(w.root / "prompts.jsonl")]
    argv += ["--output", str(w.root / "answers.jsonl"), "--max-new-tokens", "2"]
    return Case(argv, r"holds other weights.*--allow-other-base", code_must_not_run=True)


@case
def case_6_run_config_cannot_switch_remote_code_on_for_eval(w: World) -> Case:
    _remote_code_run(w)
    argv = ["eval", "--adapter", str(w.run), "--data", str(w.root / "data/train.jsonl")]
    argv += ["--limit", "2", "--allow-other-base", "--max-new-tokens", "2"]
    return Case(argv, None, 0, code_must_not_run=True)


@case
def case_6_run_config_cannot_switch_remote_code_on_for_chat(w: World) -> Case:
    _remote_code_run(w)
    argv = ["chat", "--adapter", str(w.run), "--allow-other-base", "--max-new-tokens", "2"]
    return Case(argv, None, 0, stdin="/exit\n", code_must_not_run=True)


@case
def case_6_run_config_cannot_switch_remote_code_on_for_merge(w: World) -> Case:
    _remote_code_run(w)
    argv = ["merge", "--adapter", str(w.run), "--out", str(w.root / "merged")]
    argv += ["--allow-other-base"]
    return Case(argv, None, 0, changes=("merged",), code_must_not_run=True)


def _ran_and_said(w: World, out: str, err: str) -> None:
    assert (w.root / "remote-code-ran").exists()
    assert f"trust_remote_code is on: running the model code shipped with {w.root}/custom" in err


@case
def case_6_trust_remote_code_on_the_command_line_runs_it_and_says_so(w: World) -> Case:
    _remote_code_run(w)
    argv = ["eval", "--adapter", str(w.run), "--data", str(w.root / "data/train.jsonl")]
    argv += ["--limit", "2", "--allow-other-base", "--trust-remote-code", "--max-new-tokens", "2"]
    return Case(argv, None, 0, changes=("remote-code-ran",), check=_ran_and_said)


# -- 7-8: paths mean one thing from anywhere; an adapter goes on its own base -----------------------
def _same_base(w: World, out: str, err: str) -> None:
    summary = json.loads((w.root / "again/summary.json").read_text())
    assert summary["base"]["name_or_path"] == str(w.root / "model")
    assert summary["base"]["given"] == f'"model" in {w.root}/again.yaml'
    saved = (w.root / "again/config.yaml").read_text()
    assert f'name_or_path: {w.root}/model  # as given: "model" in {w.root}/again.yaml' in saved


@case
def case_7_relative_paths_resolve_against_the_config_folder(w: World) -> Case:
    """Run from a directory that holds another `model` and another `data`: the config's own
    folder counts, never the current directory."""
    elsewhere = w.root / "elsewhere"
    shutil.copytree(w.root / "model", elsewhere / "model")
    (elsewhere / "data").mkdir()
    write_jsonl(elsewhere / "data/train.jsonl", [{"text": "not this one"}])
    cfg = w.write_config("again.yaml", output__dir="again", output__save_every=None)
    return Case(
        ["train", str(cfg), "train.max_steps=1"],
        None,
        0,
        cwd=elsewhere,
        changes=("again",),
        check=_same_base,
    )


@case
def case_7_relative_path_found_only_in_the_current_directory(w: World) -> Case:
    (w.root / "cfgs").mkdir()
    cfg = w.write_config("cfgs/c.yaml")
    return Case(
        ["train", str(cfg)],
        r"cfgs/c\.yaml line \d+: model\.name_or_path: model is not in \S*cfgs \(relative paths in "
        r"a config are read from its own folder\), but \S*/model is",
        cwd=w.root,
    )


@case
def case_7_adapter_config_pointing_outside(w: World) -> Case:
    foreign = w.root / "foreign"
    shutil.copytree(w.run / "adapter", foreign)
    (foreign / "snug_base.json").unlink()
    config = json.loads((foreign / "adapter_config.json").read_text())
    config["base_model_name_or_path"] = "../../../../../../../../etc"
    (foreign / "adapter_config.json").write_text(json.dumps(config))
    argv = ["generate", "--adapter", str(foreign), "--input", str(w.root / "prompts.jsonl")]
    argv += ["--output", str(w.root / "answers.jsonl")]
    return Case(argv, r"model\.name_or_path=/etc: the directory holds no config\.json")


@case
def case_8_adapter_on_another_base_of_the_same_shape(w: World) -> Case:
    from transformers import AutoTokenizer

    from conftest import make_tiny_model

    make_tiny_model("llama", w.root / "other", AutoTokenizer.from_pretrained(w.root / "model"), 1)
    argv = ["generate", "--adapter", str(w.run), "--model", str(w.root / "other")]
    argv += ["--input", str(w.root / "prompts.jsonl"), "--output", str(w.root / "answers.jsonl")]
    return Case(
        argv,
        r"--adapter run was trained on \S*/model \(fingerprint sha256:\w+\), but \S*/other holds "
        r"other weights \(sha256:\w+\), on which it would answer garbage; pass --allow-other-base",
    )


@case
def case_8_adapter_on_a_base_of_another_shape(w: World) -> Case:
    from transformers import AutoConfig, AutoModelForCausalLM, AutoTokenizer

    config = AutoConfig.from_pretrained(w.root / "model")
    config.hidden_size, config.intermediate_size = 64, 128
    AutoModelForCausalLM.from_config(config).save_pretrained(w.root / "wide")
    AutoTokenizer.from_pretrained(w.root / "model").save_pretrained(w.root / "wide")
    argv = ["generate", "--adapter", str(w.run), "--model", str(w.root / "wide")]
    argv += ["--input", str(w.root / "prompts.jsonl"), "--output", str(w.root / "answers.jsonl")]
    argv += ["--allow-other-base"]
    return Case(
        argv,
        r"--adapter run does not fit \S*/wide: it was trained on a model of another shape \(size mismatch for ",
    )


# -- 9-10, 12-13: config and input errors -----------------------------------------------------------
@case
def case_9_two_train_sections(w: World) -> Case:
    text = yaml.safe_dump(CONFIG) + "train:\n  lr: 0.001\n"
    w.write_config(text=text)
    return Case(["train", str(w.cfg)], r"cfg\.yaml lines \d+ and \d+: 'train' is given twice")


@case
def case_9_a_key_given_twice(w: World) -> Case:
    w.write_config(text="train:\n  lr: 1.0e-4\n  epochs: 1\n  lr: 2.0e-4\n")
    return Case(["train", str(w.cfg)], r"cfg\.yaml lines 2 and 4: 'train\.lr' is given twice")


@case
def case_10_infinite_learning_rate(w: World) -> Case:
    w.write_config(train__lr=float("inf"))
    return Case(
        ["train", str(w.cfg)], r"cfg\.yaml line \d+: train\.lr is inf, but must be a finite number"
    )


@case
def case_10_nan_on_the_command_line(w: World) -> Case:
    return Case(
        ["train", str(w.cfg), "train.warmup=.nan"],
        r"command-line override 'train\.warmup=\.nan': train\.warmup is nan, but must be a finite",
    )


@case
def case_34_a_cls_key_in_its_old_place(w: World) -> Case:
    w.write_config(train__stage="cls", data__label_column="kind")
    return Case(
        ["train", str(w.cfg)],
        r"cfg\.yaml line \d+: unknown key 'data\.label_column'; did you mean 'cls\.label_column' "
        r"\(a key of train\.stage=cls\)\?$",
    )


@case
def case_34_another_stages_section_on_the_command_line(w: World) -> Case:
    return Case(
        ["train", str(w.cfg), "pref.beta=0.2"],
        r"^error: command-line override 'pref\.beta=0\.2': pref\.beta is a key of train\.stage=dpo, "
        r"orpo, simpo, kto, not of train\.stage=sft\.$",
    )


@case
def case_12_config_not_utf8(w: World) -> Case:
    w.cfg.write_bytes(b"train:\n  lr: 1.0e-4 # caf\xe9\n")
    return Case(["train", str(w.cfg)], r"cfg\.yaml line 2, column 19 \(byte 0xe9\): not UTF-8 text")


@case
def case_12_data_not_utf8(w: World) -> Case:
    with open(w.root / "data/train.jsonl", "ab") as f:
        f.write(b'{"instruction": "caf\xe9", "output": "x"}\n')
    return Case(["train", str(w.cfg)], r"\S*data/train\.jsonl line 17, column 21: not UTF-8 text")


@case
def case_12_output_dir_is_a_file(w: World) -> Case:
    (w.root / "afile").write_text("mine")
    return Case(
        ["train", str(w.cfg), "output.dir=" + str(w.root / "afile")],
        r"output\.dir=\S*afile is a file, not a directory",
    )


@case
def case_12_model_dir_with_config_json_only(w: World) -> Case:
    (w.root / "bare").mkdir()
    shutil.copy(w.root / "model/config.json", w.root / "bare")
    w.write_config(model__name_or_path="bare")
    return Case(
        ["train", str(w.cfg)], r"model\.name_or_path=\S*bare: the directory holds no tokenizer"
    )


@case
def case_12_missing_model_dir(w: World) -> Case:
    w.write_config(model__name_or_path="./no/such/model")
    return Case(
        ["train", str(w.cfg)],
        r"model\.name_or_path=\S*no/such/model: no such directory, and it is not a hub id",
    )


@case
def case_12_json_array_of_strings(w: World) -> Case:
    (w.root / "data/train.json").write_text('[\n"red",\n"blue"\n]\n')
    w.write_config(data__train="data/train.json")
    return Case(
        ["train", str(w.cfg)], r"\S*data/train\.json line 2: holds a JSON str, not a record"
    )


@case
def case_12_messages_with_tool_calls(w: World) -> Case:
    record = {
        "messages": [
            {"role": "user", "content": "2+2?"},
            {
                "role": "assistant",
                "content": None,
                "tool_calls": [{"id": "1", "type": "function"}],
            },  # no name
            {"role": "tool", "content": "4", "tool_call_id": "1"},
            {"role": "assistant", "content": "4"},
        ]
    }
    write_jsonl(w.root / "data/tools.jsonl", [record])
    w.write_config(data__train="data/tools.jsonl")
    return Case(
        ["train", str(w.cfg)],
        r"\S*data/tools\.jsonl line 1: field 'messages' turn 2 'tool_calls' call 1 needs a 'name'",
    )


@case
def case_12_malformed_adapter_config(w: World) -> Case:
    (w.run / "adapter/adapter_config.json").write_text('{"peft_type": "LORA",\n  oops}')
    foreign = w.run / "adapter"
    shutil.move(w.run / "config.yaml", w.root / "moved.yaml")  # a bare peft directory
    argv = ["merge", "--adapter", str(foreign), "--out", str(w.root / "merged")]
    return Case(argv, r"\S*adapter/adapter_config\.json line 2: not valid JSON")


@case
def case_12_negative_seed(w: World) -> Case:
    return Case(
        ["train", str(w.cfg), "train.seed=-1"],
        r"train\.seed is -1, but must be between 0 and 4294967295",
    )


@case
def case_13_lr_rate_suggests_lr(w: World) -> Case:
    w.write_config(text="train:\n  lr_rate: 1.0e-4\n")
    return Case(
        ["train", str(w.cfg)],
        r"cfg\.yaml line 2: unknown key 'train\.lr_rate'; did you mean 'lr'\?",
    )


@case
def case_13_override_error_is_blamed_on_the_command_line(w: World) -> Case:
    return Case(
        ["train", str(w.cfg), "train.learning_rate=1e-4"],
        r"^error: command-line override 'train\.learning_rate=1e-4': unknown key "
        r"'train\.learning_rate'; did you mean 'lr'\?$",
    )


@case
def case_14_debug_after_the_sub_command(w: World) -> Case:
    return Case(["train", str(w.cfg), "--debug", "train.seed=-1"], "__raises__")


# -- issue 33, point 9: values that were accepted, a FIFO as data, a run that never updated ----------
@case
def case_33_9_negative_val_size(w: World) -> Case:
    return Case(
        ["train", str(w.cfg), "data.val_size=-1"],
        r"^error: command-line override 'data\.val_size=-1': data\.val_size is -1\.0, but must be "
        r"a fraction from 0 to below 1, or a whole count of samples\.$",
    )


@case
def case_33_9_empty_list_of_training_data(w: World) -> Case:
    return Case(
        ["train", str(w.cfg), "data.train=[]"],
        r"^error: command-line override 'data\.train=\[\]': data\.train is \[\], but must be",
    )


@case
def case_33_9_fifo_as_data(w: World) -> Case:
    os.mkfifo(w.root / "data/pipe.jsonl")
    w.write_config(data__train="data/pipe.jsonl")
    return Case(
        ["train", str(w.cfg)],
        r"^error: data\.train=\S*/data/pipe\.jsonl is a named pipe \(FIFO\), not a regular file",
    )


@case
def case_33_9_fifo_in_a_data_directory_never_hangs(w: World) -> Case:
    (w.root / "data/dir").mkdir()
    shutil.copy(w.root / "data/train.jsonl", w.root / "data/dir/a.jsonl")
    os.mkfifo(w.root / "data/dir/b.jsonl")  # opened for reading, it would wait for a writer
    w.write_config(data__train="data/dir")
    return Case(
        ["train", str(w.cfg)],
        r"^error: data\.train=\S*/data/dir holds \S*/data/dir/b\.jsonl, a named pipe \(FIFO\), not",
    )


def _said_warmup(w: World, out: str, err: str) -> None:
    summary = json.loads((w.root / "warm/summary.json").read_text())
    assert summary["status"] == "completed"
    (warning,) = summary["warnings"]
    assert warning.startswith("train.warmup=500 is 500 steps of warmup, but the run has 2 steps")
    assert warning in " ".join(out.split())  # said as the run starts


@case
def case_33_9_warmup_longer_than_the_run_is_said(w: World) -> Case:
    argv = ["train", str(w.cfg), "train.warmup=500", f"output.dir={w.root / 'warm'}"]
    return Case(argv, None, 0, changes=("warm",), check=_said_warmup)


def _nan_base(w: World) -> Path:
    """The world's base with every weight NaN."""
    import torch
    from safetensors.torch import load_file, save_file

    nan = w.root / "nan_model"
    shutil.copytree(w.root / "model", nan)
    weights = load_file(nan / "model.safetensors")
    save_file(
        {k: torch.full_like(v, float("nan")) for k, v in weights.items()},
        nan / "model.safetensors",
        metadata={"format": "pt"},
    )
    return nan


def _failed_without_an_update(w: World, out: str, err: str) -> None:
    summary = json.loads((w.root / "nan_run/summary.json").read_text())
    assert summary["status"] == "failed" and summary["nonfinite_skipped"] == [1, 2]
    assert "no update was applied" in summary["error"]
    assert not (w.root / "nan_run/adapter").exists()


@case
def case_33_9_every_step_skipped_as_nonfinite_is_a_failed_run(w: World) -> Case:
    argv = [
        "train",
        str(w.cfg),
        f"model.name_or_path={_nan_base(w)}",
        "train.skip_nonfinite=5",
        f"output.dir={w.root / 'nan_run'}",
    ]
    return Case(
        argv,
        r"^error: no update was applied: all 2 steps had a non-finite loss or gradient norm",
        1,
        changes=("nan_run",),
        check=_failed_without_an_update,
    )


# -- issue 33, point 10: another method on the command line -----------------------------------------
def _trained_full(w: World, out: str, err: str) -> None:
    assert err.splitlines()[0] == (
        f"{w.cfg}: method.r set aside: not a key of method.name=full, chosen on the command line "
        "(the file sets it for method.name=lora)."
    )
    summary = json.loads((w.root / "as_full/summary.json").read_text())
    assert summary["status"] == "completed" and (w.root / "as_full/model").is_dir()
    saved = yaml.safe_load((w.root / "as_full/config.yaml").read_text())
    assert saved["method"] == {"name": "full"}


@case
def case_33_10_another_method_on_the_command_line_trains(w: World) -> Case:
    argv = ["train", str(w.cfg), "method.name=full", f"output.dir={w.root / 'as_full'}"]
    return Case(argv, None, 0, changes=("as_full",), check=_trained_full)


@case
def case_33_10_a_key_of_another_method_on_the_command_line_is_refused(w: World) -> Case:
    return Case(
        ["train", str(w.cfg), "method.name=full", "method.alpha=4"],
        r"^error: command-line override 'method\.alpha=4': method\.alpha is a key of "
        r"method\.name=lora, dora, not of method\.name=full\.$",
    )


# -- 15-16: what the user is told -------------------------------------------------------------------
def _told(w: World, out: str, err: str) -> None:
    flat = " ".join(out.split())
    for said in (
        f"tokenizing {w.root}/data/train.jsonl: 16 records",
        f"tokenized {w.root}/data/train.jsonl: 16 samples, 0 dropped",
        "eval before training: loss: 16 samples",
        "eval before training: answers by generation: 4 samples",
        "eval after training: answers by generation: 4 samples done in",
        f"saved {w.root}/told/adapter",
    ):
        assert said in flat, (said, out)


@case
def case_15_16_progress_and_where_it_saved(w: World) -> Case:
    cfg = w.write_config(
        "told.yaml",
        output__dir="told",
        output__save_every=None,
        train__max_steps=1,
        train__eval_generate=4,
        train__max_new_tokens=2,
        data__eval="data/train.jsonl",
    )
    return Case(["train", str(cfg)], None, 0, changes=("told",), check=_told)


@pytest.mark.parametrize("name", sorted(CASES))
def test_hostile_input(name, world, capsys):
    c = CASES[name](world)
    before = snapshot(world.root)
    if c.message == "__raises__":  # --debug: the error comes with its traceback
        with pytest.raises(Exception, match="seed"):
            run_cli(c.argv, capsys, c.cwd, c.stdin)
        return
    code, out, err = run_cli(c.argv, capsys, c.cwd, c.stdin)
    if c.code_must_not_run:
        assert_not_run(world)
    assert code == c.code, (code, out[-2000:], err[-2000:])
    lines = [line for line in err.splitlines() if line.strip()]
    if c.message is not None:
        assert len(lines) == 1 and lines[0].startswith("error: "), err
        assert re.search(c.message, lines[0]), lines[0]
        assert "--debug" not in lines[0]
    after = snapshot(world.root)
    changed = {
        k
        for k in before.keys() | after.keys()
        if before.get(k) != after.get(k) and not k.startswith(c.changes or ("\0",))
    }
    changed -= failed_start_status(world.root, changed - before.keys(), lines)
    assert not changed, sorted(changed)
    if c.check is not None:
        c.check(world, out, err)


def test_unknown_target_modules_are_refused_before_tokenizing(world, capsys, monkeypatch):
    """method.targets naming a module the model lacks: one line naming it and the near name,
    before any data is tokenized (peft refused only a list matching nothing, after tokenizing,
    and trained a list matching partly on the names it found), and nothing written."""
    import snug.train.build as build

    def tokenize(*args, **kwargs):
        raise AssertionError("tokenized before the targets were checked")

    monkeypatch.setattr(build, "build_datasets", tokenize)
    before = snapshot(world.root)
    argv = ["train", str(world.cfg), f"output.dir={world.root / 'new'}"]
    code, out, err = run_cli([*argv, "method.targets=[q_proj, vproj]"], capsys)
    lines = [line for line in err.splitlines() if line.strip()]
    assert code == 2 and len(lines) == 1, (code, out[-2000:], err[-2000:])
    assert re.search(r"method\.targets.*'vproj'.*did you mean 'v_proj'", lines[0]), lines[0]
    assert "q_proj'" not in lines[0].split("did you mean")[0], lines[0]
    after = snapshot(world.root)
    changed = {k for k in before.keys() | after.keys() if before.get(k) != after.get(k)}
    changed -= failed_start_status(world.root, changed - before.keys(), lines)
    assert not changed, sorted(changed)


class _Loaded(BaseException):  # not an Exception: `snug`'s main lets it through
    pass


def _methods() -> list[str]:
    from snug.core.registry import methods

    return sorted(methods())


@pytest.mark.parametrize("name", _methods())
def test_every_method_on_the_command_line_of_train_and_plan(name, tmp_path, monkeypatch, capsys):
    """`snug train examples/quickstart.yaml method.name=NAME` and `snug plan
    examples/quickstart.yaml --method NAME --search` read the config (quickstart sets lora's
    keys) for every method; the run and the plan themselves are stood in for."""
    import snug.plan.report as report
    import snug.train.training as training

    trained = []

    def train(cfg, **_):
        trained.append(cfg)
        return {"status": "completed"}

    monkeypatch.setattr(training, "run_training", train)
    quickstart = str(ROOT / "examples/quickstart.yaml")
    out = f"output.dir={tmp_path / 'run'}"
    code, _, err = run_cli(["train", quickstart, f"method.name={name}", out], capsys)
    assert code == 0, err
    assert trained[0].method.name == name and trained[0].output.dir == str(tmp_path / "run")
    assert ("set aside" in err) == (name not in ("lora", "dora")), err

    planned = []
    real = report.load_config

    def load(*args, **kwargs):
        planned.append(real(*args, **kwargs))
        raise _Loaded

    monkeypatch.setattr(report, "load_config", load)
    with pytest.raises(_Loaded):
        run_cli(["plan", quickstart, "--method", name, "--search", "--device", "cpu"], capsys)
    assert planned[0].method.name == name


def test_config_and_path_errors_come_before_torch_is_imported(tmp_path):
    """A missing config, a bad key, a missing model directory or data file: said without
    importing torch or transformers (which take 10-20 s to import on a cold start)."""
    cfg = tmp_path / "c.yaml"
    cfg.write_text(yaml.safe_dump({"model": {"name_or_path": "nowhere/at/all"}}))
    good_model = yaml.safe_dump(
        {"model": {"name_or_path": str(ROOT / "models/tiny")}, "data": {"train": "none.jsonl"}}
    )
    (tmp_path / "d.yaml").write_text(good_model)
    probe = (
        "import sys\nfrom snug.cli import main\n"
        "for argv in ([{!r}], [{!r}], [{!r}, 'train.lr_rate=1'], [{!r}]):\n"
        "    assert main(['train', *argv]) == 2\n"
        "heavy = sorted(m for m in ('torch', 'transformers', 'datasets', 'peft') if m in sys.modules)\n"
        "print('heavy:', heavy)\n"
    ).format(str(tmp_path / "missing.yaml"), str(cfg), str(cfg), str(tmp_path / "d.yaml"))
    done = subprocess.run(
        [sys.executable, "-c", probe], capture_output=True, text=True, timeout=120
    )
    assert done.returncode == 0, done.stderr
    assert "heavy: []" in done.stdout, done.stdout
    errors = [line for line in done.stderr.splitlines() if line.startswith("error: ")]
    assert len(errors) == 4, done.stderr
    assert "no such config file" in errors[0] and "no such directory" in errors[1]
    assert "did you mean 'lr'" in errors[2] and "data.train=" in errors[3]


# -- no pickle on any load path ---------------------------------------------------------------------
# The commands that read what a run (or anyone sharing one) left behind, and the parts of the
# world each reads: a pickle planted in any file there must never run.
READERS: dict[str, tuple[Callable[[World], list[str]], tuple[str, ...], str | None]] = {
    "resume": (
        lambda w: ["train", str(w.cfg), "train.max_steps=3"],
        ("cfg.yaml", "model", "data", "run"),
        None,
    ),
    "merge": (
        lambda w: ["merge", "--adapter", str(w.run), "--out", str(w.root / "merged")],
        ("model", "run/adapter", "run/config.yaml"),
        None,
    ),
    "chat": (
        lambda w: ["chat", "--adapter", str(w.run), "--max-new-tokens", "2"],
        ("model", "run/adapter", "run/config.yaml"),
        "hi\n/exit\n",
    ),
    "eval": (
        lambda w: [
            "eval",
            "--adapter",
            str(w.run),
            "--data",
            str(w.root / "data/train.jsonl"),
            "--limit",
            "2",
        ],
        ("model", "run/adapter", "run/config.yaml", "data"),
        None,
    ),
    "generate": (
        lambda w: [
            "generate",
            "--adapter",
            str(w.run),
            "--input",
            str(w.root / "prompts.jsonl"),
            "--output",
            str(w.root / "answers.jsonl"),
            "--max-new-tokens",
            "2",
        ],
        ("model", "run/adapter", "run/config.yaml", "prompts.jsonl"),
        None,
    ),
}
# Where loaders of other projects look for pickles: planted beside the real files.
DECOYS = (
    "model/pytorch_model.bin",
    "model/training_args.bin",
    "run/adapter/adapter_model.bin",
    "run/checkpoints/step-2/state.pt",
    "run/checkpoints/step-2/dcp/.metadata",
    "run/checkpoints/step-2/rng_state.pth",
    "run/checkpoints/step-2/optimizer.pt",
)


@pytest.mark.slow
@pytest.mark.parametrize("command", sorted(READERS))
def test_a_planted_pickle_never_runs(command, pristine, capsys):
    """Each file the command may read, one at a time, replaced by a pickle that creates a
    file when unpickled; and pickles planted where other tools would look. The payload must
    never run, and the command either works (a decoy was ignored) or stops with one line."""
    argv, parts, stdin = READERS[command]
    live = pristine / "live"
    targets = None
    planted = 0
    for i in range(10_000):
        shutil.rmtree(live)
        shutil.copytree(pristine / "pristine", live)
        w = World(live)
        if targets is None:
            files = [p for part in parts for p in sorted((live / part).rglob("*")) if p.is_file()]
            files += [live / part for part in parts if (live / part).is_file()]
            targets = [str(p.relative_to(live)) for p in files] + list(DECOYS)
        if i == len(targets):
            break
        plant_pickle(live / targets[i], live / PAYLOAD_MARK)
        code, out, err = run_cli(argv(w), capsys, stdin=stdin)
        planted += 1
        assert not (live / PAYLOAD_MARK).exists(), f"{targets[i]}: the payload ran"
        errors = [line for line in err.splitlines() if line.startswith("error: ")]
        assert code == 0 or (code == 2 and len(errors) == 1), (targets[i], code, err[-1500:])
    with capsys.disabled():
        print(f"\n{command}: a pickle planted in {planted} files, one at a time; none ran")
