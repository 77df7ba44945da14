"""docs/extending.md says what the code has: its stage table names every member of the Stage
protocol (snug/core/stage.py), and its method example declares the keys of the plug-in it
stands for (tests/plugins/head_only.py)."""

from __future__ import annotations

import ast
import re

from conftest import ROOT

DOC = (ROOT / "docs" / "extending.md").read_text(encoding="utf-8")


def _class_members(source: str, name: str) -> list[str]:
    (cls,) = [
        n for n in ast.walk(ast.parse(source)) if isinstance(n, ast.ClassDef) and n.name == name
    ]
    found = []
    for node in cls.body:
        if isinstance(node, ast.AnnAssign):
            found.append(node.target.id)
        elif isinstance(node, ast.FunctionDef):
            found.append(node.name)
    return [m for m in found if not m.startswith("_")]


def test_the_stage_table_names_every_member_of_the_stage_protocol():
    table = DOC[DOC.index("| member | meaning | default |") :].split("\n\n")[0]
    named = set(re.findall(r"`(\w+)", table))
    members = _class_members((ROOT / "snug/core/stage.py").read_text(), "Stage")
    assert {"with_reference", "frozen_models", "loss"} <= set(members)
    # own (the settings row: `self.own(cfg.train)`) and loss_fn (the step's handle on `loss`)
    # are BaseStage's, nothing a stage overrides
    missing = [m for m in members if m not in named and m not in {"own", "loss_fn"}]
    assert missing == [], "members of Stage missing from docs/extending.md's stage table"


def test_the_method_example_declares_the_plugins_keys():
    (example,) = [b for b in re.findall(r"```python\n(.*?)```", DOC, re.S) if "HeadOnly" in b]
    plugin = (ROOT / "tests/plugins/head_only.py").read_text()
    doc_keys = _class_members(example, "HeadOnlySettings")
    assert doc_keys == _class_members(plugin, "HeadOnlySettings") == ["with_norm", "head_lr_scale"]


def _blocks() -> list[str]:
    return re.findall(r"```python\n(.*?)```", DOC, re.S)


def _code(source: str) -> str:
    """The module's code as ast sees it, without its docstring and `from __future__` line."""
    tree = ast.parse(source)
    body = [
        n
        for n in tree.body
        if not (isinstance(n, ast.Expr) and isinstance(n.value, ast.Constant))
        and not (isinstance(n, ast.ImportFrom) and n.module == "__future__")
    ]
    return ast.dump(ast.Module(body=body, type_ignores=[]))


def test_the_docs_examples_are_the_plugins_the_tests_run():
    """Issue 34: docs/extending.md's method and loss examples are, statement for statement,
    tests/plugins/head_only.py and robust_dpo.py, which tests/test_extending.py loads through
    $SNUG_PLUGINS, trains (its optimizer groups asserted) and chooses by name."""
    blocks = _blocks()
    for name, marker in (("head_only.py", "register(METHOD)"), ("robust_dpo.py", "RobustDPO")):
        (example,) = [b for b in blocks if marker in b]
        assert _code(example) == _code((ROOT / "tests/plugins" / name).read_text()), name


def test_the_docs_sink_example_runs(tmp_path, toy_sft, capsys):
    """The sink example of docs/extending.md, run as written on a tiny config: it prints the
    phases from the first (validating), each step, and the end."""
    from snug.config import config_from_dict

    (example,) = [b for b in _blocks() if "run_training(cfg, sinks=" in b]
    cfg = config_from_dict(
        {
            "model": {"name_or_path": str(ROOT / "models/tiny")},
            "method": {"name": "lora", "r": 4},
            "data": {"train": str(toy_sft), "cutoff_len": 32, "max_samples": 8},
            "train": {"max_steps": 2, "micro_batch": 2, "grad_accum": 1, "eval_generate": 0},
            "output": {"dir": str(tmp_path / "run"), "plot_loss": False},
        }
    )
    exec(compile(example, "docs/extending.md", "exec"), {"cfg": cfg})
    lines = capsys.readouterr().out.splitlines()
    assert lines[0].startswith("validating") and lines[-1] == "run completed", lines
    assert any(line.startswith("tokenizing") for line in lines), lines
    # the example's step lines: "STEP LOSS {metrics}" (snug's own console lines, which may wrap
    # with the width of the terminal and the length of the paths, never end with a dict)
    steps = [line.split()[0] for line in lines if re.fullmatch(r"\d+ \S+ \{.*\}", line)]
    assert steps == ["1", "2"], lines
