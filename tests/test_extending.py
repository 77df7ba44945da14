"""Proof of extension (issue 17): a method registered from a module outside snug/, through the
public registration API and $SNUG_PLUGINS, with no snug file changed, works in config validation
(with keys of its own), the generated config reference, `snug train`, `snug plan --search` and
`snug merge` (refused, as it declares)."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import yaml

from snug import registry
from snug.cli import main
from snug.config import ConfigError, load_config, reference_markdown

PLUGIN = Path(__file__).resolve().parent / "plugins" / "head_only.py"


@pytest.fixture
def head_only(monkeypatch):
    """The plug-in loaded as a user would (the environment names its file), then forgotten so
    other tests see snug's own methods only."""
    monkeypatch.setenv("SNUG_PLUGINS", str(PLUGIN))
    yield
    registry.METHODS.pop("head_only", None)
    registry._loaded.discard(str(PLUGIN))


def test_a_plugin_method_is_checked_with_its_own_keys(head_only):
    cfg = load_config(None, ["method.name=head_only", "method.with_norm=true"])
    assert cfg.method.name == "head_only" and cfg.method.own.with_norm is True
    assert cfg.to_dict()["method"]["with_norm"] is True  # saved flat, as written
    defaults = registry.get_method("head_only").own(
        load_config(None, ["method.name=head_only"]).method
    )
    assert defaults.with_norm is False and defaults.head_lr_scale == 1.0
    with pytest.raises(ConfigError, match=r"method.head_lr_scale is -1.0, but must be zero or"):
        load_config(None, ["method.name=head_only", "method.head_lr_scale=-1"])
    with pytest.raises(ConfigError, match=r"method.with_norm must be true or false"):
        load_config(None, ["method.name=head_only", "method.with_norm=3"])
    # its keys belong to it: another method refuses them, naming the key
    with pytest.raises(ConfigError, match=r"unknown key 'method.with_norm'"):
        load_config(None, ["method.name=lora", "method.with_norm=true"])
    with pytest.raises(
        ConfigError, match=r"method.name is 'head_onyl', .*did you mean 'head_only'"
    ):
        load_config(None, ["method.name=head_onyl"])
    reference = reference_markdown()
    assert "| full \\| freeze \\| lora" in reference and "head_only |" in reference
    assert (
        "#### `method` keys of `head_only`" in reference and "| `with_norm` | bool |" in reference
    )


def test_a_broken_plugin_is_one_error_that_names_it(monkeypatch, tmp_path):
    bad = tmp_path / "bad_plugin.py"
    bad.write_text("raise RuntimeError('no GPU driver here')\n")
    monkeypatch.setenv("SNUG_PLUGINS", str(bad))
    with pytest.raises(registry.PluginError, match=r"bad_plugin.py.*RuntimeError: no GPU driver"):
        load_config(None, [])
    monkeypatch.setenv("SNUG_PLUGINS", str(tmp_path / "missing.py"))
    with pytest.raises(registry.PluginError, match=r"missing.py"):
        load_config(None, [])


def test_a_plugin_method_trains_plans_and_refuses_to_merge(head_only, tmp_path, capsys, toy_sft):
    from conftest import ROOT

    out = tmp_path / "run"
    cfg = tmp_path / "head.yaml"
    raw = {
        "model": {"name_or_path": str(ROOT / "models/tiny")},
        "method": {"name": "head_only", "with_norm": True},
        "data": {"train": str(toy_sft), "cutoff_len": 32},
        "train": {"max_steps": 2, "micro_batch": 2, "grad_accum": 1, "eval_generate": 0},
        "output": {"dir": str(out), "plot_loss": False},
    }
    cfg.write_text(yaml.safe_dump(raw))
    assert main(["train", str(cfg)]) == 0
    summary = json.loads((out / "summary.json").read_text())
    assert summary["steps"] == 2 and (out / "model").is_dir()
    assert yaml.safe_load((out / "config.yaml").read_text())["method"]["with_norm"] is True
    capsys.readouterr()

    args = ["plan", str(cfg), "--search", "--method", "head_only", "--device", "cpu"]
    assert main([*args, "--seq-len", "32", "--max-micro-batch", "1", "--json"]) == 0
    plan = json.loads(capsys.readouterr().out)
    assert any(c["config"]["method"]["name"] == "head_only" for c in plan["candidates"])
    assert plan["candidates"][plan["best"]]["config"]["method"]["name"] == "head_only"

    assert main(["merge", "--adapter", str(out), "--out", str(tmp_path / "merged")]) == 2
    err = capsys.readouterr().err
    assert "method head_only cannot be merged: head_only already writes a whole model" in err
    assert not (tmp_path / "merged").exists()
