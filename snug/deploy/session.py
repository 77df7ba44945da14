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
from snug.data.templates import resolve_template
from snug.deploy.merge import MergeError, Source, find_source
from snug.methods import get_method, load_peft
from snug.models.load import load_model, load_tokenizer

BASE = "base"  # the name that selects the base model without any adapter


class SessionError(MergeError):
    """The model or adapters named on the command line cannot be loaded together (user input)."""


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

    def use(self, name: str) -> None:
        if name != BASE and name not in self.adapters:
            known = ", ".join([BASE, *self.adapters])
            raise SessionError(f"no adapter named {name!r}; loaded: {known}.")
        if self.adapters and not hasattr(self.model, "disable_adapter"):
            if name == BASE:  # snug's own adapter format is built into the layers
                raise SessionError(
                    "this adapter (method adapter) cannot be switched off; open the base alone "
                    "(no --adapter) to use it."
                )
        elif name != BASE:
            self.model.set_adapter(name)
        self.active = name

    def scope(self) -> contextlib.AbstractContextManager:
        """Context under which the model is the active choice: the base disables the adapters."""
        if self.active == BASE and self.adapters and hasattr(self.model, "disable_adapter"):
            return self.model.disable_adapter()
        return contextlib.nullcontext()

    def prompt_ids(self, messages: list[dict]) -> list[int]:
        """Token ids of a conversation rendered with the chat template, ready for the answer."""
        text = self.tok.apply_chat_template(
            messages, chat_template=self.template, tokenize=False, add_generation_prompt=True
        )
        return self.tok(text, add_special_tokens=False)["input_ids"]


def parse_adapters(specs: list[str]) -> list[tuple[str, Path]]:
    """`NAME=DIR` or `DIR` (named after the directory, or its run for .../adapter) -> pairs."""
    pairs: list[tuple[str, Path]] = []
    for spec in specs:
        name, sep, path = spec.partition("=")
        if not sep:
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


def _sources(pairs: list[tuple[str, Path]], model: str | None) -> list[Source]:
    sources = [find_source(path, model) for _, path in pairs]
    for (name, _), src in zip(pairs, sources, strict=True):
        if get_method(src.method).output != "adapter":
            raise SessionError(
                f"--adapter {name}: {src.adapter_dir} holds a whole model (method {src.method}); "
                "pass it as --model instead."
            )
        if src.cfg.train.stage == "cls":
            raise SessionError(f"--adapter {name}: a classifier (train.stage=cls) does not chat.")
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
    return {"lora": "lora", "dora": "lora", "ia3": "ia3"}.get(method)


def _config(model: str | None, sources: list[Source], device: str, dtype: str) -> Config:
    if sources:
        cfg = sources[0].cfg
    elif model:
        cfg = load_config(None, [f"model.name_or_path={model}"])
    else:
        raise SessionError("name a model: --model BASE_OR_RUN and/or --adapter RUN_OR_DIR.")
    if model and not sources:
        run = Path(model)
        if (run / "config.yaml").is_file() and (run / "model").is_dir():  # a full/freeze run
            cfg = load_config(run / "config.yaml")
            cfg.model.name_or_path = str(run / "model")
            cfg.model.quant = "none"
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
) -> Session:
    """Load the base (as the first adapter's run trained it, unless `model` names another) and
    each adapter under its name; the first adapter is active, or the base when there is none."""
    from snug.models.load import resolve_device, resolve_precision

    pairs = parse_adapters(adapters or [])
    sources = _sources(pairs, model)
    cfg = _config(model, sources, device, dtype)
    dev = resolve_device(cfg)
    precision = resolve_precision(cfg, dev)
    tok = load_tokenizer(cfg.model)
    chosen = template or cfg.data.template
    chat = resolve_template(tok, chosen, cfg.model.name_or_path)
    net = load_model(cfg, dev, precision)
    for i, ((name, _), src) in enumerate(zip(pairs, sources, strict=True)):
        if i == 0:
            net = _load_first(net, src, name)
        else:
            net.load_adapter(str(src.adapter_dir), adapter_name=name)
    net.eval()
    session = Session(
        net,
        tok,
        chat,
        dev,
        {n: s.adapter_dir for (n, _), s in zip(pairs, sources, strict=True)},
        cfg=dataclasses.replace(cfg, data=dataclasses.replace(cfg.data, template=chosen)),
    )
    if pairs:
        session.use(pairs[0][0])
    return session


def _load_first(base: nn.Module, src: Source, name: str) -> nn.Module:
    method = get_method(src.method)
    if method.load is not load_peft:  # snug's own format (method adapter): alone, not switchable
        return method.load(base, src.adapter_dir)
    from peft import PeftModel

    return PeftModel.from_pretrained(base, str(src.adapter_dir), adapter_name=name)
