"""A base model with any number of named adapters, ready to generate: what `snug chat`,
`snug generate` and `snug eval` load.

peft holds the adapters (PeftModel.from_pretrained, load_adapter, set_adapter,
disable_adapter); snug finds what each run trained, loads the base as it was trained (the same
quantization), and checks that the adapters can share one base before loading anything.
"""

from __future__ import annotations

import contextlib
import dataclasses
from dataclasses import dataclass, field
from pathlib import Path

import torch
from torch import nn
from transformers import PreTrainedTokenizerBase

from snug.config import Config, load_config
from snug.core.method import load_peft
from snug.core.registry import get_method, get_stage
from snug.data.render import render_chat
from snug.data.templates import resolve_template
from snug.deploy.merge import Source, attach, check_base, find_source
from snug.errors import UserError
from snug.models.load import load_model, load_tokenizer

BASE = "base"  # the name that selects the base model without any adapter


class SessionError(UserError):
    """The model or adapters named on the command line cannot be loaded together (user input;
    one line, exit 2). Not a MergeError: nothing is merged."""


@dataclass
class Session:
    """The loaded model; `use(name)` picks which adapter generates (BASE: none)."""

    model: nn.Module
    tok: PreTrainedTokenizerBase
    template: str  # Jinja chat template the prompts are rendered with
    device: torch.device
    adapters: dict[str, Path] = field(default_factory=dict)  # name -> adapter directory
    active: str = BASE
    cfg: Config | None = None  # the config the base was loaded with (the first adapter's run's)
    base_label: str = BASE  # what output calls the base: a full/freeze run's directory name

    @property
    def label(self) -> str:
        """The active model's name in output rows and tables: the adapter's, or `base_label`."""
        return self.base_label if self.active == BASE else self.active

    @property
    def base_reachable(self) -> bool:
        """False when snug's own adapter format (method adapter), built into the layers, is
        loaded: there is no base without it in this session."""
        from peft import PeftModel

        return not self.adapters or isinstance(self.model, PeftModel)

    def use(self, name: str) -> None:
        if name != BASE and name not in self.adapters:
            known = ", ".join([BASE, *self.adapters])
            raise SessionError(f"no adapter named {name!r}; loaded: {known}.")
        if name == BASE and not self.base_reachable:
            raise SessionError(
                "this adapter (method adapter) cannot be switched off; open the base alone "
                "(no --adapter) to use it."
            )
        if name != BASE and self.base_reachable:
            self.model.set_adapter(name)
        self.active = name

    def scope(self) -> contextlib.AbstractContextManager:
        """Context under which the model is the active choice: the base disables the adapters."""
        if self.active == BASE and self.adapters:
            return self.model.disable_adapter()
        return contextlib.nullcontext()

    def context(self) -> int | None:
        """Tokens a prompt and its answer may take: the model's positions, less the virtual
        tokens a prompt-learning adapter prepends (the same for every adapter a session holds:
        one peft kind); None for models without a position limit."""
        from peft import PeftModel

        # Configs without a position limit (e.g. state-space models) have no such attribute.
        limit = getattr(self.model.config, "max_position_embeddings", None)
        configs = self.model.peft_config.values() if isinstance(self.model, PeftModel) else []
        virtual = max((c.num_virtual_tokens for c in configs if c.is_prompt_learning), default=0)
        return None if limit is None else limit - virtual

    def prompt_ids(self, messages: list[dict], tools: list[dict] | None = None) -> list[int]:
        """Token ids of a conversation rendered with the chat template (and `tools`, OpenAI's
        function specs, where given), ready for the answer."""
        text = render_chat(self.tok, self.template, messages, True, tools=tools)
        return self.tok(text, add_special_tokens=False)["input_ids"]


def parse_adapters(specs: list[str]) -> list[tuple[str, Path]]:
    """`NAME=DIR` or `DIR` (named after the directory, or its run for .../adapter) -> pairs.
    A spec is a plain DIR when it is an existing directory or its part before '=' holds a '/'
    (`runs/lr=1e-4`)."""
    pairs: list[tuple[str, Path]] = []
    for spec in specs:
        name, sep, path = spec.partition("=")
        if not sep or "/" in name or Path(spec).is_dir():
            path = spec
            p = Path(spec.rstrip("/"))
            name = p.parent.name if p.name == "adapter" else p.name
        if not name or not path:
            raise SessionError(f"--adapter {spec}: write NAME=DIR or DIR.")
        if name == BASE:
            raise SessionError(f"--adapter {spec}: the name {BASE!r} means the model without one.")
        if "." in name:  # peft names a torch module after the adapter, and those take no dot
            raise SessionError(
                f"--adapter {spec}: adapter names cannot contain '.'; name it: NAME=DIR."
            )
        if any(name == n for n, _ in pairs):
            raise SessionError(f"--adapter {spec}: two adapters are named {name!r}.")
        pairs.append((name, Path(path)))
    return pairs


def sources_of(
    pairs: list[tuple[str, Path]], model: str | None, trust_remote_code: bool
) -> list[Source]:
    """What each named adapter is (its run's config and method), checked as loadable together
    on one base; nothing is loaded."""
    sources = [find_source(path, model, trust_remote_code) for _, path in pairs]
    for (name, _), src in zip(pairs, sources, strict=True):
        if get_method(src.method).output != "adapter":
            raise SessionError(
                f"--adapter {name}: {src.adapter_dir} holds a whole model (method {src.method}); "
                "pass it as --model instead."
            )
        why = get_stage(src.cfg.train.stage).not_a_chat_model_because
        if why:
            raise SessionError(
                f"--adapter {name}: train.stage={src.cfg.train.stage} does not chat ({why})."
            )
        weights = src.adapter_dir / "adapter_model.safetensors"
        if get_method(src.method).load is load_peft and not weights.is_file():
            # every adapter, not only the first: peft falls back to adapter_model.bin, a pickle
            raise SessionError(
                f"{src.adapter_dir}: no adapter_model.safetensors (snug loads safetensors only)."
            )
    if len(sources) > 1:
        first = sources[0]
        for (name, _), src in zip(pairs[1:], sources[1:], strict=True):
            if src.cfg.model.name_or_path != first.cfg.model.name_or_path:
                raise SessionError(
                    f"--adapter {name} was trained on {src.cfg.model.name_or_path}, "
                    f"--adapter {pairs[0][0]} on {first.cfg.model.name_or_path}; adapters share "
                    "one base (pass --model to choose it)."
                )
            if src.cfg.model.quant != first.cfg.model.quant:
                raise SessionError(
                    f"--adapter {name} was trained on a model.quant={src.cfg.model.quant} base, "
                    f"--adapter {pairs[0][0]} on model.quant={first.cfg.model.quant}; load them "
                    "in separate sessions."
                )
        kinds = {_peft_kind(s.method) for s in sources}
        if len(kinds) > 1 or None in kinds:
            methods = ", ".join(sorted({s.method for s in sources}))
            raise SessionError(
                f"several adapters on one base must be of one peft kind (LoRA/DoRA, IA3, ...); "
                f"got {methods}. Load them one at a time."
            )
    return sources


def _peft_kind(method: str) -> str | None:
    """peft's tuner the method saves as (adapters of one tuner can share a PeftModel)."""
    return get_method(method).tuner


@dataclass
class Base:
    """What --model names, resolved: the model to load, and for a full/freeze run its config."""

    name_or_path: str
    run_cfg: Config | None = None  # the run's config; None for a model directory or hub id
    label: str = BASE  # what output calls it: the run directory's name for a run


def resolve_model(model: str, trust_remote_code: bool = False) -> Base:
    """--model as a model to load: a full/freeze run stands for its model/ directory; a run or
    directory that holds an adapter is refused (it is an --adapter). Remote code runs only if
    the command line says so, whatever the run's config.yaml holds."""
    path = Path(model)
    run = path.parent if path.name == "adapter" else path
    if (run / "config.yaml").is_file():
        cfg = load_config(run / "config.yaml")
        cfg.model.trust_remote_code = trust_remote_code
        output = get_method(cfg.method.name).output
        if output == "adapter":
            raise SessionError(
                f"--model {model}: a {cfg.method.name} run, which trained an adapter, not a "
                f"model; pass it as --adapter {model} (its base {cfg.model.name_or_path} loads "
                "with it)."
            )
        if not (run / "model").is_dir():
            raise SessionError(f"--model {model}: the run has no model/ directory; did it finish?")
        cfg.model.name_or_path = str((run / "model").resolve())
        cfg.model.quant = "none"  # a full/freeze run writes plain weights
        return Base(cfg.model.name_or_path, cfg, run.resolve().name)
    if (path / "adapter_config.json").is_file() or (path / "snug_adapter.json").is_file():
        raise SessionError(f"--model {model} is an adapter, not a model; pass it as --adapter.")
    return Base(str(path.resolve()) if path.exists() else model)


def _config(
    base: Base | None, sources: list[Source], device: str, dtype: str, trust_remote_code: bool
) -> Config:
    if sources:
        cfg = sources[0].cfg  # find_source has put --model's path in
    elif base and base.run_cfg:
        cfg = base.run_cfg
    elif base:
        cfg = load_config(None, [f"model.name_or_path={base.name_or_path}"])
        cfg.model.trust_remote_code = trust_remote_code
    else:
        raise SessionError("name a model: --model BASE_OR_RUN and/or --adapter RUN_OR_DIR.")
    cfg = dataclasses.replace(
        cfg,
        model=dataclasses.replace(cfg.model, dtype=dtype),
        train=dataclasses.replace(cfg.train, device=device),
    )
    return cfg


def open_session(
    model: str | None = None,
    adapters: list[str] | None = None,
    device: str = "auto",
    dtype: str = "auto",
    template: str | None = None,
    trust_remote_code: bool = False,
    allow_other_base: bool = False,
) -> Session:
    """Load the base (as the first adapter's run trained it, unless `model` names another) and
    each adapter under its name; the first adapter is active, or the base when there is none.
    Each adapter must fit the base it was trained on (its recorded fingerprint) unless
    `allow_other_base`; model code ships only with `trust_remote_code` (the command line)."""
    from snug.models.load import resolve_device, resolve_precision

    base = resolve_model(model, trust_remote_code) if model else None
    pairs = parse_adapters(adapters or [])
    sources = sources_of(pairs, base.name_or_path if base else None, trust_remote_code)
    cfg = _config(base, sources, device, dtype, trust_remote_code)
    dev = resolve_device(cfg)
    precision = resolve_precision(cfg, dev)
    tok = load_tokenizer(cfg.model)
    chosen = template or cfg.data.template
    chat = resolve_template(tok, chosen, cfg.model.name_or_path)
    net = load_model(cfg, dev, precision)
    for i, ((name, _), src) in enumerate(zip(pairs, sources, strict=True)):
        check_base(src, f"--adapter {name}", allow_other_base)
        label = f"--adapter {name}"
        if i == 0:
            net = attach(label, cfg.model.name_or_path, _load_first, net, src, name)
        else:
            attach(label, cfg.model.name_or_path, net.load_adapter, str(src.adapter_dir), name)
    net.eval()
    session = Session(
        net,
        tok,
        chat,
        dev,
        {n: s.adapter_dir for (n, _), s in zip(pairs, sources, strict=True)},
        cfg=dataclasses.replace(cfg, data=dataclasses.replace(cfg.data, template=chosen)),
    )
    if base and base.label not in session.adapters:  # else "base": one name, one model
        session.base_label = base.label
    if pairs:
        session.use(pairs[0][0])
    return session


def _load_first(base: nn.Module, src: Source, name: str) -> nn.Module:
    method = get_method(src.method)
    if method.load is not load_peft:  # snug's own format (method adapter): alone, not switchable
        return method.load(base, src.adapter_dir)
    from peft import PeftModel

    return PeftModel.from_pretrained(base, str(src.adapter_dir), adapter_name=name)
