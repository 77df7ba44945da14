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
