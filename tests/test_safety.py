"""Safe loading: no unpickling, no shell, safetensors only, remote code only when asked."""

from __future__ import annotations

import ast
import json
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file

import snug
from snug.config import ModelConfig, load_config
from snug.deploy.merge import MergeError, find_source, merge
from snug.models.load import ModelLoadError, load_model, load_tokenizer, warn_remote_code

from conftest import TINY_BASE, make_tiny_model

SNUG = Path(snug.__file__).resolve().parent
UNPICKLERS = ("pickle", "cPickle", "dill", "cloudpickle", "joblib")
# Referenced at all (called or passed around), these unpickle or run a shell.
FORBIDDEN = {f"{m}.{f}" for m in UNPICKLERS for f in ("load", "loads", "Unpickler")} | {
    "os.system",
    "os.popen",
}


def _dotted(node: ast.AST) -> str:
    if isinstance(node, ast.Attribute):
        return f"{_dotted(node.value)}.{node.attr}"
    return node.id if isinstance(node, ast.Name) else ""


def _is(node: ast.AST | None, value: bool) -> bool:
    return isinstance(node, ast.Constant) and node.value is value


def unsafe_uses(source: str) -> list[str]:
    """'line N: what' for each unsafe pattern in Python `source`: torch.load without
    weights_only=True, pickle loading, os.system/os.popen, shell=True (any value but a literal
    False), and a literal trust_remote_code=True or allow_pickle=True. Read from the syntax tree,
    so that calls over several lines count and comments or docstrings do not."""
    found: list[str] = []
    tree = ast.parse(source)
    safe_torch_load = {
        id(node.func)
        for node in ast.walk(tree)
        if isinstance(node, ast.Call)
        and _dotted(node.func) == "torch.load"
        and any(k.arg == "weights_only" and _is(k.value, True) for k in node.keywords)
    }
    for node in ast.walk(tree):
        line = getattr(node, "lineno", 0)
        if isinstance(node, ast.Attribute):
            name = _dotted(node)
            if name == "torch.load" and id(node) not in safe_torch_load:
                found.append(f"line {line}: torch.load without weights_only=True")
            elif name in FORBIDDEN:
                found.append(f"line {line}: {name}")
        elif isinstance(node, ast.Import):
            found += [f"line {line}: import {a.name}" for a in node.names if a.name in UNPICKLERS]
        elif isinstance(node, ast.ImportFrom):
            names = {a.name for a in node.names}
            if node.module in UNPICKLERS or names & {
                "torch": {"load"},
                "os": {"system", "popen"},
            }.get(node.module, set()):
                found.append(f"line {line}: from {node.module} import {', '.join(sorted(names))}")
        elif isinstance(node, ast.Call):
            for k in node.keywords:
                if k.arg == "shell" and not _is(k.value, False):
                    found.append(f"line {line}: shell={ast.unparse(k.value)}")
                if k.arg in ("trust_remote_code", "allow_pickle") and _is(k.value, True):
                    found.append(f"line {line}: {k.arg}=True")
    return sorted(found, key=lambda f: int(f.split(":")[0].removeprefix("line ")))  # walk is BFS


def test_snug_source_never_unpickles_runs_a_shell_or_trusts_remote_code():
    files = sorted(SNUG.rglob("*.py"))
    assert len(files) > 20  # the whole package is scanned
    found = [
        f"{path.relative_to(SNUG.parent)} {use}"
        for path in files
        for use in unsafe_uses(path.read_text())
    ]
    assert found == []


def test_the_scan_finds_each_unsafe_pattern():
    bad = """
import pickle
from torch import load
import torch, os, subprocess
torch.load(path)
torch.load(path, weights_only=False)
torch.load(
    path,
    map_location="cpu",
)
loader = torch.load
pickle.loads(blob)
os.system("ls")
os.popen("ls")
subprocess.run("ls", shell=True)
subprocess.run("ls", shell=flag)
AutoConfig.from_pretrained(name, trust_remote_code=True)
numpy.load(path, allow_pickle=True)
"""
    found = unsafe_uses(bad)
    assert [f.split(":")[0] for f in found] == [
        f"line {n}" for n in (2, 3, 5, 6, 7, 11, 12, 13, 14, 15, 16, 17, 18)
    ], found
    good = """
import torch, subprocess
state = torch.load(path, weights_only=True, map_location="cpu")
subprocess.run(["git", "status"], check=True)
subprocess.run(["ls"], shell=False)
AutoConfig.from_pretrained(name, trust_remote_code=cfg.model.trust_remote_code)
# torch.load(path) in a comment, and in a string: "pickle.loads(x)"
"""
    assert unsafe_uses(good) == []


def _pickled_only(model_dir: Path) -> Path:
    """The directory's weights moved from model.safetensors into a pickled pytorch_model.bin,
    as older checkpoints ship them (transformers itself now always writes safetensors)."""
    torch.save(load_file(model_dir / "model.safetensors"), model_dir / "pytorch_model.bin")
    (model_dir / "model.safetensors").unlink()
    return model_dir


def test_model_directory_with_only_pickled_weights_is_refused(tmp_path, tokenizer, monkeypatch):
    from snug.errors import UserError

    path = _pickled_only(make_tiny_model("llama", tmp_path / "pickled", tokenizer))
    cfg = load_config(None, [f"model.name_or_path={path}"])
    with pytest.raises(ModelLoadError) as failure:
        load_model(cfg, torch.device("cpu"), "fp32")
    text = str(failure.value)
    assert text.startswith(f"model.name_or_path={path}: the directory holds weights only as")
    assert "snug loads safetensors only" in text and "\n" not in text
    assert isinstance(failure.value, UserError)  # the CLI prints it as one line, exit 2
    # Without snug's own check, transformers is told to load safetensors only: no fallback.
    monkeypatch.setattr("snug.models.load.check_model_dir", lambda path: None)
    with pytest.raises(ModelLoadError, match=r"no file named model.safetensors"):
        load_model(cfg, torch.device("cpu"), "fp32")


def test_merge_refuses_an_adapter_saved_only_as_a_pickle(tmp_path):
    adapter = tmp_path / "adapter"
    adapter.mkdir()
    config = {"peft_type": "LORA", "base_model_name_or_path": str(TINY_BASE)}
    (adapter / "adapter_config.json").write_text(json.dumps(config))
    torch.save({}, adapter / "adapter_model.bin")
    with pytest.raises(MergeError) as failure:
        merge(find_source(adapter), tmp_path / "out")
    assert str(failure.value).startswith(
        f"{adapter}: no adapter_model.safetensors (only a pickled adapter_model.bin, which snug "
        "does not load)"
    )
    assert not (tmp_path / "out").exists()


def test_remote_code_is_off_by_default_and_said_with_its_revision(capsys):
    assert ModelConfig().trust_remote_code is False
    warn_remote_code(ModelConfig(name_or_path="org/model"), "model")
    assert capsys.readouterr().err == ""
    mcfg = ModelConfig(name_or_path="org/model", trust_remote_code=True, revision="a1b2c3d")
    warn_remote_code(mcfg, "model")
    assert capsys.readouterr().err == (
        "trust_remote_code is on: running the model code shipped with org/model "
        "(revision a1b2c3d)\n"
    )


def test_loading_a_tokenizer_with_remote_code_on_says_so(capsys):
    load_tokenizer(ModelConfig(name_or_path=str(TINY_BASE)))
    assert "trust_remote_code" not in capsys.readouterr().err
    load_tokenizer(ModelConfig(name_or_path=str(TINY_BASE), trust_remote_code=True))
    said = capsys.readouterr().err
    assert f"running the tokenizer code shipped with {TINY_BASE} (revision default)" in said
