import dataclasses
from pathlib import Path

import pytest
import yaml

from snug.config import Config, ConfigError, config_from_dict, load_config
from snug.config.docs import config_markdown
from snug.core.registry import get_method

ROOT = Path(__file__).resolve().parent.parent


def test_defaults_match_design():
    cfg = Config()
    assert (cfg.method.name, cfg.method.r, cfg.method.alpha) == ("lora", 8, 16)
    assert (cfg.train.micro_batch, cfg.train.grad_accum, cfg.train.scheduler) == (1, 8, "cosine")
    assert cfg.memory.grad_checkpointing and cfg.memory.chunked_loss


def test_unknown_key_names_nearest(tmp_path):
    p = tmp_path / "c.yaml"
    p.write_text("train:\n  learning_rate: 1e-4\n")
    with pytest.raises(ConfigError, match=r"c.yaml: unknown key 'train.learning_rate'.*valid|mean"):
        load_config(p)
    p.write_text("train:\n  micro_bach: 2\n")
    with pytest.raises(ConfigError, match=r"did you mean 'micro_batch'"):
        load_config(p)


def test_unknown_section_and_wrong_types():
    with pytest.raises(ConfigError, match=r"unknown section 'trian'.*'train'"):
        config_from_dict({"trian": {}})
    with pytest.raises(ConfigError, match=r"train.micro_batch must be a whole number"):
        config_from_dict({"train": {"micro_batch": "two"}})
    with pytest.raises(ConfigError, match=r"method.name is 'lorra'.*did you mean 'lora'"):
        config_from_dict({"method": {"name": "lorra"}})
    with pytest.raises(ConfigError, match=r"memory.grad_checkpointing must be true or false"):
        config_from_dict({"memory": {"grad_checkpointing": "yes"}})


def test_impossible_combinations():
    with pytest.raises(ConfigError, match=r"model.quant=4bit needs an adapter method"):
        config_from_dict({"model": {"quant": "4bit"}, "method": {"name": "full"}})
    with pytest.raises(ConfigError, match=r"method.name=prefix needs memory.grad_checkpointing"):
        config_from_dict({"method": {"name": "prefix"}})  # checkpointing is on by default
    config_from_dict({"method": {"name": "prefix"}, "memory": {"grad_checkpointing": False}})
    with pytest.raises(ConfigError, match=r"train.micro_batch is 0, but must be at least 1"):
        config_from_dict({"train": {"micro_batch": 0}})
    with pytest.raises(ConfigError, match=r"method.dropout is 1.5, but must be in \[0, 1\)"):
        config_from_dict({"method": {"dropout": 1.5}})
    with pytest.raises(ConfigError, match=r"data.val_size .* data.eval is given too"):
        config_from_dict({"data": {"val_size": 0.1, "eval": "e.jsonl"}})
    with pytest.raises(ConfigError, match=r"data.format=text is for train.stage=pt"):
        config_from_dict({"data": {"format": "text"}})
    with pytest.raises(ConfigError, match=r"packing=true does not work with method.name=prefix"):
        config_from_dict({"data": {"packing": True}, "method": {"name": "prefix"}})
    with pytest.raises(ConfigError, match=r"packing=true does not work with train.stage=cls"):
        config_from_dict({"data": {"packing": True}, "train": {"stage": "cls"}})


@pytest.mark.parametrize(
    "section, message",
    [
        (
            {"dist": {"strategy": "fsdp", "nproc": 2}, "model": {"quant": "8bit"}},
            "dist.strategy=fsdp with model.quant=8bit is not supported",
        ),
        ({"dist": {"nproc": 2}}, "dist.nproc > 1 needs dist.strategy"),
        (
            {"dist": {"strategy": "fsdp", "cpu_offload": True}, "train": {"device": "cpu"}},
            "training on the CPU keeps them there already",
        ),
        ({"dist": {"strategy": "ddp"}, "method": {"name": "prefix"}}, "runs on one device"),
        (
            {"dist": {"strategy": "fsdp"}, "memory": {"auto_fit": True}},
            "memory.auto_fit plans one device",
        ),
    ],
)
def test_features_not_built_yet_are_refused(section, message):
    with pytest.raises(ConfigError, match=message):
        config_from_dict(section)


def test_overrides_and_yaml_numbers(tmp_path):
    p = tmp_path / "c.yaml"
    p.write_text("train:\n  lr: 1e-4\nmodel:\n  revision: 3e51827\n")
    cfg = load_config(p)
    assert cfg.train.lr == pytest.approx(1e-4) and cfg.model.revision == "3e51827"
    cfg = load_config(
        p, ["train.micro_batch=4", "method.targets=[q_proj, v_proj]", "train.lr=3e-4"]
    )
    assert cfg.train.micro_batch == 4 and cfg.method.targets == ["q_proj", "v_proj"]
    assert cfg.train.lr == pytest.approx(3e-4)
    with pytest.raises(ConfigError, match="section.key=value"):
        load_config(p, ["lr=3"])


def test_bad_yaml_names_line(tmp_path):
    p = tmp_path / "bad.yaml"
    p.write_text("train:\n  lr: [1,\n")
    with pytest.raises(ConfigError, match=r"bad.yaml line \d+: not valid YAML"):
        load_config(p)


@pytest.mark.parametrize("path", sorted((ROOT / "examples").glob("*.yaml")), ids=lambda p: p.name)
def test_every_example_loads_and_validates(path):
    cfg = load_config(path)
    get_method(cfg.method.name)  # registered


def test_readme_config_reference_is_current():
    readme = (ROOT / "README.md").read_text()
    assert config_markdown() in readme, (
        "README config reference is stale: run python -m snug.config.docs"
    )


def test_each_method_takes_only_its_own_keys():
    """Each method declares its keys in its own module: another method's key is refused naming
    the methods it belongs to; the same name may mean different things to two methods."""
    with pytest.raises(ConfigError, match=r"method.r is a key of method.name=lora, dora, not of "):
        config_from_dict({"method": {"name": "full", "r": 16}})
    with pytest.raises(ConfigError, match=r"lora_plus_ratio is a key of method.name=lora, dora"):
        config_from_dict({"method": {"name": "ia3", "lora_plus_ratio": 16}})
    with pytest.raises(ConfigError, match=r"method.rr'; did you mean 'r'"):
        config_from_dict({"method": {"name": "lora", "rr": 16}})
    # bottleneck: the adapter's width and P-tuning's encoder width, each documented by its owner
    adapter = config_from_dict({"method": {"name": "adapter", "bottleneck": 16}})
    ptuning = config_from_dict({"method": {"name": "ptuning", "bottleneck": 32}})
    assert (adapter.method.bottleneck, ptuning.method.bottleneck) == (16, 32)
    assert adapter.to_dict()["method"] == {"name": "adapter", "bottleneck": 16}
    doc = config_markdown()
    assert "`method` keys of `ptuning`" in doc and "Width of the prompt encoder" in doc
    # cross-key rules live with the method that has the keys (snug/methods/freeze.py)
    with pytest.raises(ConfigError, match=r"trainable_layers=0 \(head only\) needs a classifier"):
        config_from_dict({"method": {"name": "freeze", "trainable_layers": 0}})
    with pytest.raises(ConfigError, match=r"unfreeze_every unfreezes by layers"):
        config_from_dict(
            {"method": {"name": "freeze", "unfreeze_every": 2, "trainable_modules": ["x"]}}
        )
    with pytest.raises(ConfigError, match=r"llama_adapter cannot classify: peft supports"):
        config_from_dict({"method": {"name": "llama_adapter"}, "train": {"stage": "cls"}})
    with pytest.raises(ConfigError, match=r"method.trainable_layers is 0, but must be at least"):
        config_from_dict({"method": {"name": "llama_adapter", "trainable_layers": 0}})


def test_switching_methods_keeps_shared_keys_and_a_runs_config_is_read_like_any(tmp_path):
    """A search moving a config to another method keeps the keys both declare; a run's
    config.yaml is read like any config (snug 0.1.0 is unreleased: no earlier snug wrote every
    method's keys), so one holding another method's key is refused there too."""
    from snug.config.overrides import with_overrides
    from snug.train.resume import config_drift

    cfg = config_from_dict({"method": {"name": "lora", "r": 32, "alpha": 64}})
    dora = with_overrides(cfg, method={"name": "dora"})
    assert (dora.method.name, dora.method.r, dora.method.alpha) == ("dora", 32, 64)
    full = with_overrides(cfg, method={"name": "full"})
    assert full.to_dict()["method"] == {"name": "full"}
    (tmp_path / "config.yaml").write_text(yaml.safe_dump({"method": {"name": "full", "r": 8}}))
    with pytest.raises(ConfigError, match=r"method.r is a key of method.name=lora, dora"):
        load_config(tmp_path / "config.yaml")
    with pytest.raises(TypeError):  # the keyword a run's config used to be read with is gone
        load_config(tmp_path / "config.yaml", run_config=True)
    changed = config_from_dict({"method": {"name": "lora", "r": 16}}).to_dict()
    saved = {**changed, "method": {**changed["method"], "r": 8}}
    assert config_drift(saved, changed) == ["method.r: 8 -> 16"]


# -- issue 34: each stage's keys in one section of its own --------------------------------------
def test_a_stages_keys_live_in_the_section_it_names():
    """cls keeps its columns and head in `cls:`, the preference stages theirs in `pref:`; the
    chosen stage's section is read as `stage.own(cfg)` and saved after `train`."""
    from snug.core.registry import get_stage

    raw = {"train": {"stage": "cls"}, "cls": {"label_column": "y", "head": "mlp"}}
    cfg = config_from_dict(raw)
    own = get_stage("cls").own(cfg)
    assert (own.text_column, own.label_column, own.head) == ("text", "y", "mlp")
    saved = cfg.to_dict()
    assert saved["cls"] == {"text_column": "text", "label_column": "y", "head": "mlp"}
    assert list(saved).index("cls") == list(saved).index("train") + 1 and "pref" not in saved
    assert "text_column" not in saved["data"] and "cls" not in config_from_dict({}).to_dict()
    dpo = config_from_dict({"train": {"stage": "dpo"}, "pref": {"beta": 0.3}})
    assert get_stage("dpo").own(dpo).beta == 0.3 and get_stage("dpo").own(cfg).beta == 0.1
    assert config_from_dict(dpo.to_dict()).to_dict() == dpo.to_dict()  # config.yaml round trip
    assert get_stage("sft").own(cfg) is None


def test_resuming_guards_the_stages_own_section():
    from snug.train.resume import config_drift

    was = config_from_dict({"train": {"stage": "cls"}, "cls": {"head": "mlp"}}).to_dict()
    now = config_from_dict({"train": {"stage": "cls"}}).to_dict()
    assert config_drift(was, now) == ["cls.head: 'mlp' -> 'linear'"]
    was = config_from_dict({"train": {"stage": "orpo"}, "pref": {"beta": 0.5}}).to_dict()
    now = config_from_dict({"train": {"stage": "orpo", "lr": 1e-3}}).to_dict()
    assert config_drift(was, now) == ["pref.beta: 0.5 -> 0.1"]


@pytest.mark.parametrize(
    "raw, error",
    [
        (
            {"cls": {"head": "mlp"}},
            r"^config: cls.head is a key of train.stage=cls, not of train.stage=sft\.$",
        ),
        (
            {"train": {"stage": "cls"}, "pref": {"beta": 0.2}},
            r"^config: pref.beta is a key of train.stage=dpo, orpo, simpo, kto, not of "
            r"train.stage=cls\.$",
        ),
        (
            {"train": {"stage": "kto"}, "pref": {"loss": "ipo"}},
            r"^config: pref.loss is a key of train.stage=dpo, not of train.stage=kto \(whose",
        ),
        (
            {"train": {"stage": "cls"}, "data": {"text_column": "t"}},
            r"^config: unknown key 'data.text_column'; did you mean 'cls.text_column' \(a key "
            r"of train.stage=cls\)\?$",
        ),
        (
            {"train": {"stage": "cls"}, "data": {"label_column": "t"}},
            r"unknown key 'data.label_column'; did you mean 'cls.label_column' \(a key of",
        ),
        (
            {"train": {"stage": "cls", "cls_head": "mlp"}},
            r"unknown key 'train.cls_head'; did you mean 'cls.head' \(a key of train.stage=cls",
        ),
        (
            {"method": {"name": "freeze", "cls_head": "mlp"}},
            r"unknown key 'method.cls_head'; did you mean 'cls.head' \(a key of train.stage=cls",
        ),
        ({"train": {"stage": "cls"}, "cls": {"hed": "mlp"}}, r"unknown key 'cls.hed'; did you"),
        ({"prefs": {"beta": 0.1}}, r"unknown section 'prefs'; did you mean 'pref'\?"),
    ],
    ids=[
        "cls-section-under-sft",
        "pref-under-cls",
        "dpo-key-under-kto",
        "data.text_column",
        "data.label_column",
        "train.cls_head",
        "method.cls_head",
        "misspelt",
        "section-misspelt",
    ],
)
def test_another_stages_section_or_key_is_refused_naming_its_stage(raw, error):
    with pytest.raises(ConfigError, match=error):
        config_from_dict(raw)


def test_an_empty_section_of_another_stage_is_let_be():
    cfg = config_from_dict({"train": {"stage": "sft"}, "pref": None, "cls": {}})
    assert "pref" not in cfg.to_dict() and "cls" not in cfg.to_dict()


def test_the_reference_lists_each_stage_with_its_help_and_its_section():
    from snug.core.registry import stages

    reference = config_markdown()
    for name, stage in stages().items():
        place = f"`{stage.section}:`" if stage.settings else "none"
        assert f"| `{name}` | {stage.help} | {place} |" in reference
    assert "#### `cls` keys of train.stage=`cls`" in reference
    assert "#### `pref` keys of train.stage=`dpo`" in reference
    assert "sft: supervised" not in reference  # no hand-written list of the built-ins


# -- issue 33, point 9: values that were accepted and should not be ---------------------------------
@pytest.mark.parametrize("value", [-1, -0.5, 1.5])
def test_data_val_size_is_a_fraction_below_1_or_a_count_of_zero_or_more(value):
    with pytest.raises(ConfigError, match=rf"data.val_size is {value}(\.0)?, but must be"):
        config_from_dict({"data": {"val_size": value}})


@pytest.mark.parametrize("value", [0, 0.1, 5])
def test_data_val_size_takes_zero_a_fraction_or_a_count(value):
    assert config_from_dict({"data": {"val_size": value}}).data.val_size == value


@pytest.mark.parametrize("key", ["train", "eval"])
def test_an_empty_list_of_data_is_refused_naming_the_key(tmp_path, key):
    p = tmp_path / "c.yaml"
    p.write_text(f"data:\n  {key}: []\n")
    with pytest.raises(ConfigError, match=rf"c.yaml line 2: data.{key} is \[\], but must be"):
        load_config(p)
    with pytest.raises(ConfigError, match=rf"override 'data.{key}=\[\]': data.{key} is \[\], but"):
        load_config(None, [f"data.{key}=[]"])


def test_warmup_is_a_ratio_below_1_or_a_whole_number_of_steps():
    assert config_from_dict({"train": {"warmup": 0.5}}).train.warmup == 0.5
    assert config_from_dict({"train": {"warmup": 20}}).train.warmup == 20
    with pytest.raises(
        ConfigError,
        match=r"train.warmup is 2.5, but must be a ratio of the steps from 0 to below 1, or a whole",
    ):
        config_from_dict({"train": {"warmup": 2.5}})


# -- issue 33, point 10: another method or stage chosen on the command line ------------------------
QUICKSTART = ROOT / "examples/quickstart.yaml"  # method lora: r, alpha, targets


def _methods() -> list[str]:
    from snug.core.registry import methods

    return sorted(methods())


@pytest.mark.parametrize("name", _methods())
def test_another_method_on_the_command_line_sets_the_files_keys_of_its_method_aside(name):
    """quickstart.yaml sets lora's r, alpha and targets: choosing another method on the command
    line keeps those the new method has (dora: all; ia3: targets) and sets the rest aside, in
    one line naming them; the new method's other keys take their defaults."""
    from snug.core.registry import methods

    settings = methods()[name].settings
    own = {f.name for f in dataclasses.fields(settings)} if settings else set()
    cfg = load_config(QUICKSTART, [f"method.name={name}"])
    assert cfg.method.name == name
    aside = [k for k in ("r", "alpha", "targets") if k not in own]
    kept = {k: v for k, v in {"r": 16, "alpha": 32, "targets": "all-linear"}.items() if k in own}
    assert {k: cfg.to_dict()["method"][k] for k in kept} == kept
    if not aside:
        assert cfg.set_aside == []
        return
    (line,) = cfg.set_aside
    names = ", ".join(f"method.{k}" for k in aside)
    assert line.startswith(f"{QUICKSTART}: {names} set aside: not ")
    assert f"of method.name={name}, chosen on the command line" in line


def test_a_key_given_on_the_command_line_for_another_method_is_still_refused():
    with pytest.raises(
        ConfigError,
        match=r"^command-line override 'method.r=4': method.r is a key of method.name=lora, dora, "
        r"not of method.name=full",
    ):
        load_config(QUICKSTART, ["method.name=full", "method.r=4"])


def test_a_file_key_of_neither_the_files_method_nor_the_new_one_is_still_refused(tmp_path):
    p = tmp_path / "c.yaml"
    p.write_text("method:\n  name: lora\n  r: 8\n  bottleneck: 32\n")
    with pytest.raises(ConfigError, match=r"c.yaml line 4: method.bottleneck is a key of"):
        load_config(p, ["method.name=full"])
    # a key of the new method in the file is the new method's
    assert load_config(p, ["method.name=adapter"]).method.bottleneck == 32


def test_the_same_method_again_sets_nothing_aside():
    assert load_config(QUICKSTART, ["method.name=lora"]).set_aside == []
    assert load_config(QUICKSTART).set_aside == []


def test_another_stage_on_the_command_line_sets_the_files_keys_of_its_stage_aside(tmp_path):
    from snug.core.registry import get_stage

    p = tmp_path / "c.yaml"
    p.write_text("train:\n  stage: dpo\npref:\n  beta: 0.2\n  loss: ipo\n")
    orpo = load_config(p, ["train.stage=orpo"])
    assert get_stage("orpo").own(orpo).beta == 0.2
    assert orpo.set_aside == [
        f"{p}: pref.loss set aside: not a key of train.stage=orpo, chosen on the command line "
        "(the file sets it for train.stage=dpo)."
    ]
    sft = load_config(p, ["train.stage=sft"])
    assert sft.set_aside[0].startswith(f"{p}: pref.beta, pref.loss set aside: not keys of ")
    with pytest.raises(ConfigError, match=r"override 'pref.gamma=1': pref.gamma is a key of"):
        load_config(p, ["train.stage=orpo", "pref.gamma=1"])
    p.write_text("train:\n  stage: cls\ncls:\n  head: mlp\n")
    assert load_config(p, ["train.stage=sft"]).set_aside == [
        f"{p}: cls.head set aside: not a key of train.stage=sft, chosen on the command "
        "line (the file sets it for train.stage=cls)."
    ]
    dpo = load_config(p, ["train.stage=dpo"])  # another section: the file's cls keys set aside
    assert dpo.set_aside[0].startswith(f"{p}: cls.head set aside: not a key of train.stage=dpo")
    assert get_stage("dpo").own(dpo).beta == 0.1


@pytest.mark.parametrize(
    "raw, error",
    [
        # a key at the top level, as LLaMA-Factory's YAML and flags write it
        (
            {"learning_rate": 1e-4},
            r"^config: 'learning_rate' is not a section; did you mean "
            r"'train.lr'",
        ),
        ({"lr": 1e-4}, r"^config: 'lr' is not a section; did you mean 'train.lr'"),
        ({"save_steps": 100}, r"did you mean 'output.save_every'"),
        ({"lora_rank": 8}, r"did you mean 'method.r'"),
        ({"output_dir": "out"}, r"did you mean 'output.dir'"),
        ({"cutoff_len": 512}, r"did you mean 'data.cutoff_len'"),
        # a key in the wrong section, by its own name or another tool's
        (
            {"train": {"save_steps": 100}},
            r"^config: unknown key 'train.save_steps'; did you "
            r"mean 'output.save_every'\?$",
        ),
        ({"data": {"lr": 1e-4}}, r"^config: unknown key 'data.lr'; did you mean 'train.lr'\?$"),
        ({"train": {"lora_rank": 8}}, r"unknown key 'train.lora_rank'; did you mean 'method.r'"),
        ({"method": {"learning_rate": 1e-4}}, r"'method.learning_rate'; did you mean 'train.lr'"),
        ({"model": {"cutoff_len": 9}}, r"'model.cutoff_len'; did you mean 'data.cutoff_len'"),
        # an alias of a key in its own section keeps naming the key within it
        ({"train": {"learning_rate": 1e-4}}, r"'train.learning_rate'; did you mean 'lr'\?$"),
        ({"method": {"lora_rank": 8}}, r"'method.lora_rank'; did you mean 'r'\?$"),
        # neither a key nor an alias anywhere: the nearest, as before
        ({"trian": {}}, r"unknown section 'trian'; did you mean 'train'\?"),
        ({"train": {"micro_bach": 2}}, r"'train.micro_bach'; did you mean 'micro_batch'\?"),
    ],
)
def test_a_key_in_the_wrong_place_names_its_section(raw, error):
    with pytest.raises(ConfigError, match=error):
        config_from_dict(raw)


def test_a_top_level_key_names_its_line(tmp_path):
    p = tmp_path / "lf.yaml"
    p.write_text("train:\n  epochs: 1\nlearning_rate: 1.0e-4\n")
    with pytest.raises(ConfigError, match=r"lf.yaml line 3: 'learning_rate' is not a section; "):
        load_config(p)
