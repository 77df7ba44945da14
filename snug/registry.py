"""What snug knows about each fine-tuning method and training stage, in one place: the `Method`
record a method module registers (`register(Method(...))`, one line), the method config
section, and the stages (`register_stage(...)`: snug/stages/).

`METHODS` is the one source of method facts: config validation (the method.name choices,
packing, dist), the planner (which methods a search tries and their quality order), merge
(peft's name for it, mergeable or why not), `snug chat` (which adapters can share one peft
model) and the tests read it; no list of method names is kept elsewhere. snug's own methods
register when `snug.methods` is imported (snug.config imports it to check a config); a method
of your own registers when your module is imported (docs/extending.md).

Light on purpose: no torch, nothing of snug's but the field helpers and errors, so that
snug.config and the method modules can import it without a cycle.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any, Literal

from snug.errors import UserError
from snug.fields import setting as _f

if TYPE_CHECKING:
    from torch import nn


def save_pretrained(model: nn.Module, path: Path) -> None:
    """peft adapters (adapter_config.json + adapter_model.safetensors) or a whole HF model."""
    model.save_pretrained(str(path))


def load_peft(base: nn.Module, path: Path) -> nn.Module:
    """base + a saved peft adapter: the one place a peft adapter is loaded (safetensors only)."""
    from peft import PeftModel

    if not (Path(path) / "adapter_model.safetensors").is_file():
        # peft would fall back to adapter_model.bin, a pickle: snug loads safetensors only
        raise ValueError(f"{path}: no adapter_model.safetensors (snug loads safetensors only).")
    return PeftModel.from_pretrained(base, str(path))


def peft_task(model: nn.Module) -> str:
    """peft's task type for the model: classifiers get their head trained and saved too."""
    return "SEQ_CLS" if type(model).__name__.endswith("ForSequenceClassification") else "CAUSAL_LM"


@dataclass(frozen=True)
class Method:
    name: str
    apply: Callable[[nn.Module, Any], nn.Module]  # (base model, MethodConfig) -> model to train
    output: Literal["adapter", "model"]  # written to output.dir/adapter/ or output.dir/model/
    mergeable: bool
    save: Callable[[nn.Module, Path], None] = save_pretrained
    load: Callable[[nn.Module, Path], nn.Module] = load_peft  # base + saved adapter -> model
    # Called by the loop before optimizer step `step` (0-based), for methods whose trainable
    # set changes during training (freeze with progressive unfreezing).
    before_step: Callable[[nn.Module, Any, int], None] | None = None
    # Why `snug merge` cannot fold this method into the base (shown to the user); "" if it can.
    unmergeable_because: str = ""
    # The peft_type its adapter_config.json names (None: not saved by peft), and the key of
    # that file that tells it from another method of the same peft_type (dora: use_dora).
    peft_type: str | None = None
    peft_flag: str | None = None
    # peft's tuner: adapters of the same tuner can share one PeftModel in `snug chat`.
    tuner: str | None = None
    # Adds virtual tokens or prefixes (one set per row): it cannot pack samples.
    virtual_tokens: bool = False
    # Trained and tested under dist.strategy ddp and fsdp.
    shardable: bool = False
    # Why it cannot train under gradient checkpointing ("" if it can).
    no_checkpointing_because: str = ""
    # Why it cannot train a classifier stage such as train.stage=cls ("" if it can).
    no_classifier_because: str = ""
    # The planner: its rank when the search recommends among fitting candidates (lower is
    # better; from benchmarks/results/methods-2026-11-25.md), whether a search without
    # --method tries it, and the quantized bases it is also tried on: (search label,
    # model.quant, rank).
    quality: int = 100
    searched: bool = True
    quantized: tuple[tuple[str, str, int], ...] = ()
    # Keys of its own in the `method:` section: a dataclass whose fields are declared with
    # snug.fields.setting (default, doc, check); validated and documented with the others,
    # read in `apply` as `cfg.own` (None: no keys of its own).
    settings: type | None = None
    # Checks across sections for this method (e.g. freeze's head-only needs a classifier
    # stage): (config, its source for the error) -> raises snug.errors.ConfigError.
    check: Callable[[Any, str], None] | None = None
    # Checks a saved adapter before anything is allocated from it (snug/methods/saved.py):
    # (adapter directory, the base's config.json as a dict, {} when unknown) -> raises
    # snug.errors.UserError naming the file and key where the config's numbers disagree with
    # its weights' shapes (read from the header) or with the base.
    check_saved: Callable[[Path, dict], None] | None = None

    def own(self, cfg: MethodConfig) -> Any:
        """This method's own settings in `cfg` (their defaults when the config has none)."""
        return cfg.own if cfg.own is not None else self.settings()


METHODS: dict[str, Method] = {}


def register(method: Method) -> None:
    METHODS[method.name] = method


_loaded: set[str] = set()


class PluginError(UserError):
    """A plug-in named by $SNUG_PLUGINS or an entry point cannot be imported (names it)."""


def load_plugins() -> None:
    """Import the plug-ins, once each: the modules $SNUG_PLUGINS names (comma-separated module
    names, or paths of .py files), then those installed packages declare under the entry-point
    group `snug.plugins`. Importing one runs its `register(...)` lines (docs/extending.md)."""
    import importlib
    import importlib.util
    import os
    import sys
    from importlib.metadata import entry_points

    wanted = [p.strip() for p in os.environ.get("SNUG_PLUGINS", "").split(",") if p.strip()]
    wanted += [f"entry point {ep.name}={ep.value}" for ep in entry_points(group="snug.plugins")]
    for plugin in wanted:
        if plugin in _loaded:
            continue
        _loaded.add(plugin)
        try:
            if plugin.startswith("entry point "):
                name = plugin.split("=", 1)[1]
                importlib.import_module(name.split(":")[0])
            elif plugin.endswith(".py"):
                path = Path(plugin).expanduser().resolve()
                spec = importlib.util.spec_from_file_location(f"snug_plugin_{path.stem}", path)
                if spec is None or not path.is_file():
                    raise FileNotFoundError(f"no file {path}")
                module = importlib.util.module_from_spec(spec)
                sys.modules[spec.name] = module
                spec.loader.exec_module(module)
            else:
                importlib.import_module(plugin)
        except Exception as e:  # anything a plug-in raises on import: say which one
            _loaded.discard(plugin)
            raise PluginError(
                f"snug plug-in {plugin!r} (from $SNUG_PLUGINS or an installed entry point) "
                f"failed to import: {type(e).__name__}: {str(e).strip().splitlines()[0] if str(e).strip() else ''}"
            ) from None


STAGES: dict[str, Any] = {}  # name -> snug.stages.base.Stage


def register_stage(stage: Any) -> None:
    """Make a stage (an instance of a snug.stages.base.Stage subclass) known by its name."""
    if not stage.name:
        raise ValueError(f"{type(stage).__name__}: a stage needs a name.")
    STAGES[stage.name] = stage


def get_stage(name: str) -> Any:
    """The registered stage of that name. snug's own (snug/stages/) are imported here on first
    use, by name, like a plug-in: they import this module to register, so this light module
    names them only as a string (snug.config imports them the plain way)."""
    if name not in STAGES:
        import importlib

        importlib.import_module("snug.stages")
        load_plugins()
    if name not in STAGES:
        raise ValueError(f"train.stage={name} is not available; choose one of {', '.join(STAGES)}.")
    return STAGES[name]


def get_method(name: str) -> Method:
    if name not in METHODS:
        raise ValueError(
            f"method.name={name} is not available yet; choose one of {', '.join(sorted(METHODS))}."
        )
    return METHODS[name]


@dataclass(init=False)
class MethodConfig:
    """The fine-tuning method; each method's own keys follow."""

    # Each method declares its own keys (`Method.settings`), which sit flat beside `name` in
    # the `method:` section and are read as attributes of this section (`cfg.method.r`) or as
    # `cfg.method.own`; a key of another method is refused, naming the methods it belongs to.
    # In code: `MethodConfig(name="lora", r=4)` (the method's other keys take their defaults).

    name: str = _f(
        "lora",
        "Fine-tuning method (each one a module of snug/methods/).",
        choices=lambda: tuple(METHODS),
    )
    # The chosen method's own keys (Method.settings), set when a config is built.
    own: Any = field(default=None, repr=False, metadata={"internal": True})

    def __init__(self, name: str = "lora", own: Any = None, **keys: Any) -> None:
        self.name, self.own = name, own
        settings = _method_or_none(name)
        if own is None and settings is not None:
            self.own = settings(**keys)  # TypeError names a key the method does not declare
        elif keys:
            raise TypeError(f"method {name!r} declares no keys {sorted(keys)} (or give own=)")

    def __getattr__(self, key: str) -> Any:
        # only reached for names that are not fields: the chosen method's own keys
        own = self.__dict__.get("own")
        if key.startswith("__") or own is None or not hasattr(own, key):
            raise AttributeError(
                f"method.{key}: not a key of method.name={self.__dict__.get('name')!r}"
            )
        return getattr(own, key)


def _method_or_none(name: str) -> type | None:
    if name not in METHODS:  # snug's own register as snug.methods is imported
        import importlib

        importlib.import_module("snug.methods")
    return METHODS[name].settings if name in METHODS else None


def with_method(section: MethodConfig, name: str) -> MethodConfig:
    """The method section switched to method `name` (a search trying another method): the own
    keys the two methods share keep their values (a LoRA rank for DoRA), the rest are the new
    method's defaults."""
    settings = _method_or_none(name)
    get_method(name)  # an unknown name: the error that lists the methods
    names = {f.name for f in dataclasses.fields(settings)} if settings else set()
    old = dataclasses.asdict(section.own) if section.own is not None else {}
    return MethodConfig(name=name, **{k: v for k, v in old.items() if k in names})
