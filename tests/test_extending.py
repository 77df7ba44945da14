"""Proof of extension (issue 17): a method and a stage registered from modules outside snug/,
through the public registration API and $SNUG_PLUGINS, with no snug file changed, work in config
validation (with keys of their own), the generated config reference, `snug train`, `snug plan
--search` and `snug merge` (the method refused, the stage accepted, as each declares)."""

from __future__ import annotations

import ast
import json
from pathlib import Path

import pytest
import torch
import yaml

from snug.cli import main
from snug.config import ConfigError, load_config
from snug.config.docs import config_markdown
from snug.core import registry

PLUGIN = Path(__file__).resolve().parent / "plugins" / "head_only.py"
STAGE_PLUGIN = Path(__file__).resolve().parent / "plugins" / "completion.py"
LOSS_PLUGIN = Path(__file__).resolve().parent / "plugins" / "robust_dpo.py"


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
    # its keys belong to it: another method refuses them, naming the key and its owner
    with pytest.raises(ConfigError, match=r"method.with_norm is a key of method.name=head_only,"):
        load_config(None, ["method.name=lora", "method.with_norm=true"])
    with pytest.raises(
        ConfigError, match=r"method.name is 'head_onyl', .*did you mean 'head_only'"
    ):
        load_config(None, ["method.name=head_onyl"])
    reference = config_markdown()
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


def test_a_plugin_method_trains_plans_and_refuses_to_merge(
    head_only, tmp_path, capsys, toy_sft, monkeypatch
):
    from safetensors.torch import load_file

    import snug.train.run

    from conftest import ROOT

    built = []  # the run's optimizer, built by the method's own param_groups hook
    real = snug.train.run.build_optimizer
    monkeypatch.setattr(
        snug.train.run, "build_optimizer", lambda *a, **k: built.append(real(*a, **k)) or built[-1]
    )
    out = tmp_path / "run"
    cfg = tmp_path / "head.yaml"
    raw = {
        "model": {"name_or_path": str(ROOT / "models/tiny")},
        "method": {"name": "head_only", "with_norm": True, "head_lr_scale": 4.0},
        "data": {"train": str(toy_sft), "cutoff_len": 32},
        "train": {
            "max_steps": 2,
            "micro_batch": 2,
            "grad_accum": 1,
            "eval_generate": 0,
            "scheduler": "constant",
            "warmup": 0,
        },
        "output": {"dir": str(out), "plot_loss": False},
    }
    cfg.write_text(yaml.safe_dump(raw))
    assert main(["train", str(cfg)]) == 0
    summary = json.loads((out / "summary.json").read_text())
    assert summary["steps"] == 2 and (out / "model").is_dir()
    # its groups reached the optimizer: the norm at train.lr, the head 4 times faster
    (norm, head), lr = built[0].param_groups, 1e-4  # train.lr's default
    assert [g["lr"] for g in (norm, head)] == [lr, pytest.approx(4 * lr)]  # constant schedule
    assert len(norm["params"]) == 1 and norm["params"][0].ndim == 1
    before = load_file(ROOT / "models/tiny/model.safetensors")
    after = load_file(next((out / "model").glob("*.safetensors")))
    trained = {k for k in after if not torch.equal(after[k], before[k])}
    # the head is tied to the embedding in the tiny model, and saved as it
    assert trained == {"model.norm.weight", "model.embed_tokens.weight"}, trained
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


@pytest.fixture
def completion(monkeypatch):
    """The stage plug-in, loaded as a user would, then forgotten."""
    monkeypatch.setenv("SNUG_PLUGINS", str(STAGE_PLUGIN))
    yield
    registry.STAGES.pop("completion", None)
    registry._loaded.discard(str(STAGE_PLUGIN))


def test_a_plugin_stage_is_checked_with_its_own_keys(completion):
    cfg = load_config(None, ["train.stage=completion", "completion.separator=' => '"])
    own = registry.get_stage("completion").own(cfg)
    assert cfg.train.stage == "completion" and own.separator == " => "
    assert cfg.to_dict()["completion"]["separator"] == " => "  # its own section, as written
    with pytest.raises(ConfigError, match=r"completion.min_completion_tokens is 0, but must be at"):
        load_config(None, ["train.stage=completion", "completion.min_completion_tokens=0"])
    # its keys belong to it: another stage refuses them, naming the key and its owner
    with pytest.raises(
        ConfigError, match=r"completion.separator is a key of train.stage=completion, not of"
    ):
        load_config(None, ["train.stage=sft", "completion.separator=x"])
    with pytest.raises(ConfigError, match=r"unknown key 'train.separator'; did you mean 'comp"):
        load_config(None, ["train.stage=completion", "train.separator=x"])
    with pytest.raises(ConfigError, match=r"train.stage is 'completon', .*did you mean"):
        load_config(None, ["train.stage=completon"])
    reference = config_markdown()
    assert "| sft \\| pt \\| cls \\| dpo \\| orpo \\| simpo \\| kto \\| completion |" in reference
    assert "| `completion` | raw prompt -> completion pairs, loss on the completion |" in reference
    assert "#### `completion` keys of train.stage=`completion`" in reference
    assert "| `separator` | str |" in reference
    assert (
        "#### `cls` keys of train.stage=`cls`" in reference
    )  # snug's own stages declare theirs alike


def test_a_plugin_stage_without_a_section_is_one_error_naming_it(completion, monkeypatch):
    from snug.stages.base import BaseStage

    class Nameless(BaseStage):
        name, settings = "nameless", registry.get_stage("completion").settings

    registry.load_plugins()
    monkeypatch.setitem(registry.STAGES, "nameless", Nameless())
    with pytest.raises(registry.PluginError, match=r"stage 'nameless' of .* has keys of its own"):
        load_config(None, [])
    monkeypatch.setattr(Nameless, "section", "train")
    with pytest.raises(registry.PluginError, match=r"section names 'train', one of snug's own"):
        load_config(None, [])


def test_eval_data_is_tokenized_with_the_stages_own_keys(completion, tmp_path, tokenizer):
    """Held-out data reads the stage's settings as the training data does (it was tokenized
    with their defaults: the train section's name was reused for the training set)."""
    from snug.data.dataset import build_datasets

    from conftest import write_jsonl

    rows = [{"prompt": f"p{i}", "completion": f"c{i}"} for i in range(4)]
    train = write_jsonl(tmp_path / "train.jsonl", rows)
    held = write_jsonl(tmp_path / "eval.jsonl", rows)
    cfg = load_config(
        None,
        [f"data.train={train}", f"data.eval={held}", "train.stage=completion",
         "completion.separator=' => '"],
    )  # fmt: skip
    own = registry.get_stage("completion").own(cfg)
    train_ds, eval_ds, _ = build_datasets(cfg.data, tokenizer, "completion", 0, "tiny", own=own)
    assert eval_ds["input_ids"] == train_ds["input_ids"]
    assert "=>" in tokenizer.decode(eval_ds[0]["input_ids"])


def test_a_plugin_stage_trains_plans_and_merges(completion, tmp_path, capsys):
    from conftest import ROOT

    pairs = [
        {"prompt": f"count from {i}", "completion": " ".join(str(i + k) for k in range(1, 4))}
        for i in range(40)
    ]
    data = tmp_path / "pairs.jsonl"
    data.write_text("".join(json.dumps(p) + "\n" for p in pairs))
    out = tmp_path / "run"
    cfg = tmp_path / "completion.yaml"
    raw = {
        "model": {"name_or_path": str(ROOT / "models/tiny")},
        "method": {"name": "lora", "r": 4},
        "data": {"train": str(data), "val_size": 8, "cutoff_len": 48},
        "completion": {"separator": " -> "},
        "train": {
            "stage": "completion",
            "max_steps": 4,
            "micro_batch": 4,
            "grad_accum": 1,
            "log_every": 1,
            "lr": 1e-3,
        },
        "output": {"dir": str(out), "plot_loss": False},
    }
    cfg.write_text(yaml.safe_dump(raw))
    assert main(["train", str(cfg)]) == 0
    summary = json.loads((out / "summary.json").read_text())
    assert summary["steps"] == 4 and summary["eval"]["metric"] == "loss"
    assert summary["data"]["kept"] == 40
    # the stage's own metric reaches metrics.jsonl (and TensorBoard) by its name
    rows = [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines()]
    shares = [r["token_accuracy"] for r in rows if "token_accuracy" in r]
    assert len(shares) == 4 and all(0 <= v <= 1 for v in shares)
    capsys.readouterr()

    args = ["plan", str(cfg), "--search", "--method", "lora", "--device", "cpu"]
    assert main([*args, "--seq-len", "32", "--max-micro-batch", "1", "--json"]) == 0
    plan = json.loads(capsys.readouterr().out)
    assert plan["candidates"][plan["best"]]["fits"]
    # the replay ran the stage's own loss: a plain head over every position, where sft's
    # chunked loss runs the head again in backward (more FLOPs at this length)
    flops = {}
    del raw["completion"]  # sft refuses the completion stage's keys
    for stage in ("completion", "sft"):
        raw["train"] = {"stage": stage, "micro_batch": 4, "grad_accum": 1}
        cfg.write_text(yaml.safe_dump(raw))
        assert main(["plan", str(cfg), "--device", "cpu", "--seq-len", "32", "--json"]) == 0
        flops[stage] = json.loads(capsys.readouterr().out)["candidates"][0]["flops_per_step"]
    assert flops["completion"] < flops["sft"]

    # a stage that makes a causal LM declares nothing against merging: merge takes it
    assert main(["merge", "--adapter", str(out), "--out", str(tmp_path / "merged")]) == 0
    assert (tmp_path / "merged" / "config.json").is_file()


DUPLICATE = """
from snug.core.method import Method
from snug.core.registry import register


def apply_mine(model, cfg):
    return model


register(Method("lora", apply_mine, output="adapter", mergeable=False){replace})
"""


@pytest.fixture
def lora_kept(monkeypatch):
    """snug's own lora, put back after a test whose plug-in replaces it."""
    load_config(None, [])  # the door opened: snug's own registered
    own = registry.METHODS["lora"]
    yield
    registry.METHODS["lora"] = own
    registry._OWNERS[("method", "lora")] = "snug.methods.lora"
    registry.REPLACED.clear()
    for said in [s for s in registry._loaded if "mine_" in s]:
        registry._loaded.discard(said)


def test_a_name_taken_is_refused_naming_both_modules(lora_kept, monkeypatch, tmp_path, capsys):
    """Issue 34: a plug-in named `lora` silently replaced LoRA (and `method.r=4` was then
    refused as "a key of dora"); now it is refused, in one line naming both modules, by the
    door snug's own methods come through too."""
    plugin = tmp_path / "mine_dup.py"
    plugin.write_text(DUPLICATE.format(replace=""))
    monkeypatch.setenv("SNUG_PLUGINS", str(plugin))
    with pytest.raises(registry.PluginError) as refused:
        load_config(None, ["method.r=4"])
    assert str(refused.value) == (
        f"method name 'lora' is taken: {plugin} registers it and snug.methods.lora "
        "already did; rename it, or register it with replace=True to replace "
        "snug.methods.lora's."
    )
    assert registry.METHODS["lora"].apply.__module__ == "snug.methods.lora"
    capsys.readouterr()
    config = tmp_path / "c.yaml"
    config.write_text("method:\n  r: 4\n")
    assert main(["train", str(config)]) == 2  # refused again while the plug-in is named
    err = capsys.readouterr().err.strip()
    assert err.count("\n") == 0 and "method name 'lora' is taken" in err, err
    monkeypatch.delenv("SNUG_PLUGINS")
    assert load_config(None, ["method.r=4"]).method.r == 4  # snug's LoRA, whole


def test_a_plugin_that_asks_to_replace_is_said_at_start(lora_kept, monkeypatch, tmp_path, capsys):
    plugin = tmp_path / "mine_replace.py"
    plugin.write_text(DUPLICATE.format(replace=", replace=True"))
    monkeypatch.setenv("SNUG_PLUGINS", str(plugin))
    load_config(None, [])
    assert registry.METHODS["lora"].apply.__module__ == "snug_plugin_mine_replace"
    assert capsys.readouterr().err == (
        f"snug: method 'lora' of snug.methods.lora replaced by {plugin} "
        "(it asked to: replace=True)\n"
    )
    assert list(registry.METHODS)[:3] == ["full", "freeze", "lora"]  # in its place


def test_snug_s_own_come_in_through_the_entry_point_door():
    """Built-ins and plug-ins share one door: snug's own package declares snug.builtin under
    the entry-point group the registry reads, and nothing in snug/ imports a method or stage
    module but that one (so a name taken is refused the same way for both)."""
    from importlib.metadata import entry_points

    ours = [ep for ep in entry_points(group="snug.plugins") if ep.dist.name == "snug"]
    assert [ep.value for ep in ours] == ["snug.builtin"]
    from test_layering import import_graph

    snug = Path(__file__).resolve().parent.parent / "snug"
    graph = import_graph(snug)
    registering = set()
    for path in snug.rglob("*.py"):
        for node in ast.parse(path.read_text(encoding="utf-8")).body:
            call = node.value if isinstance(node, ast.Expr) else None
            if isinstance(call, ast.Call) and getattr(call.func, "id", "") in (
                "register",
                "register_stage",
            ):
                parts = path.relative_to(snug.parent).with_suffix("").parts
                registering.add(".".join(parts))
    assert len(registering) == 14, sorted(registering)  # 7 method modules, 7 stage modules
    importers = {a for a, targets in graph.items() for b in targets if b in registering}
    assert importers == {"snug.builtin"}, sorted(importers)


@pytest.fixture
def robust(monkeypatch):
    """The preference-loss plug-in, loaded as a user would, then forgotten."""
    monkeypatch.setenv("SNUG_PLUGINS", str(LOSS_PLUGIN))
    yield
    registry.PREF_LOSSES.pop("robust", None)
    registry._loaded.discard(str(LOSS_PLUGIN))


def test_a_plugin_preference_loss_is_chosen_by_name(robust):
    """A loss registered from outside snug/ is a choice of pref.loss, built with the stage's
    keys of its fields' names, and computes the step's loss."""
    import torch.nn.functional as F

    dpo = ["train.stage=dpo", "pref.beta=0.2"]
    cfg = load_config(None, [*dpo, "pref.loss=robust", "pref.label_smoothing=0.1"])
    loss = registry.get_stage("dpo").configured(cfg).pair_loss
    assert type(loss).__name__ == "RobustDPOLoss" and (loss.beta, loss.label_smoothing) == (
        0.2,
        0.1,
    )
    pc, pr, rc, rr = torch.tensor([[-3.0, -5.0], [-4.0, -2.0], [-3.5, -4.5], [-3.5, -2.5]])
    losses, chosen, rejected = loss(pc, pr, rc, rr, torch.tensor([3, 4]), torch.tensor([2, 5]))
    d = 0.2 * ((pc - rc) - (pr - rr))
    want = (-F.logsigmoid(d) * 0.9 + F.logsigmoid(-d) * 0.1) / 0.8
    torch.testing.assert_close(losses, want)
    torch.testing.assert_close(chosen - rejected, d)
    # snug's rule about label smoothing now names it among the losses that take it
    with pytest.raises(ConfigError, match=r"applies to pref.loss=sigmoid, robust, not hinge\.$"):
        load_config(None, [*dpo, "pref.loss=hinge", "pref.label_smoothing=0.1"])
    with pytest.raises(ConfigError, match=r"pref.loss is 'robst', .*did you mean 'robust'"):
        load_config(None, [*dpo, "pref.loss=robst"])
    assert "| `loss` | sigmoid \\| ipo \\| hinge \\| robust |" in config_markdown()
    # a taken name is refused, naming both modules
    taken = type("Clash", (loss.__class__,), {"name": "sigmoid"})
    with pytest.raises(registry.PluginError, match=r"'sigmoid' is taken: .* snug.stages.pref_loss"):
        registry.register_pref_loss(taken)


def test_a_dpo_run_trains_with_a_plugin_loss(robust, tmp_path, monkeypatch):
    from snug.config import config_from_dict
    from snug.train.training import run_training

    from conftest import ROOT, write_jsonl

    loss = registry.pref_losses()["robust"]
    calls = []
    real = loss.__call__
    monkeypatch.setattr(loss, "__call__", lambda *a: calls.append(1) or real(*a))
    pairs = [{"prompt": f"pick {i}", "chosen": "yes", "rejected": "no"} for i in range(8)]
    raw = {
        "model": {"name_or_path": str(ROOT / "models/tiny")},
        "method": {"name": "lora", "r": 4},
        "data": {"train": str(write_jsonl(tmp_path / "pairs.jsonl", pairs)), "cutoff_len": 32},
        "train": {"stage": "dpo", "micro_batch": 4, "grad_accum": 1, "max_steps": 2},
        "pref": {"loss": "robust", "label_smoothing": 0.1},
        "output": {"dir": str(tmp_path / "run"), "plot_loss": False},
    }
    summary = run_training(config_from_dict(raw))
    assert summary["status"] == "completed" and summary["steps"] == 2
    assert len(calls) == 2  # one micro-batch per step


def test_no_file_under_snug_names_the_plugins():
    """Issue 34's proof: the plug-ins tests/test_extending.py trains (a method with an optimizer
    hook and keys of its own, a preference loss, a stage with a section of its own) live
    outside snug/, and no file under snug/ names them, their keys or their section."""
    names = [
        "head_only",
        "head_lr_scale",
        "with_norm",
        "head_groups",
        "RobustDPO",
        '"robust"',
        "'robust'",
        # (the stage's name, "completion", is also the field of kto's unpaired records)
        "min_completion_tokens",
        "CompletionSettings",
        "token_accuracy",
    ]
    snug = Path(__file__).resolve().parent.parent / "snug"
    found = [
        f"{path.relative_to(snug)}: {name}"
        for path in sorted(snug.rglob("*"))
        if path.is_file() and path.suffix in (".py", ".json", ".yaml", ".txt", ".md")
        for name in names
        if name in path.read_text(encoding="utf-8")
    ]
    assert found == []
