"""`snug merge`: fold a trained adapter into its base and write a plain transformers model.

peft does the arithmetic (merge_and_unload) and transformers the dequantization of a QLoRA base
(PreTrainedModel.dequantize); snug finds what was trained, refuses what cannot be merged, checks
the merged logits against base plus adapter before anything is written, and writes atomically.
"""

from __future__ import annotations

import dataclasses
import json
import shutil
from dataclasses import dataclass
from pathlib import Path

import torch
from torch import nn

from snug.config import Config, load_config, paths
from snug.config.preflight import check_model_dir
from snug.core.registry import get_method, get_stage, methods
from snug.errors import UserError, first_line, read_utf8
from snug.methods.saved import read_config
from snug.models.load import DTYPES, load_model, load_tokenizer
from snug.runtime.progress import Phase, quiet

# The few prompts whose logits `--verify` compares.
VERIFY_PROMPTS = (
    "Hello! How are you today?",
    "What is 12 times 7?",
    "Write one sentence about the sea.",
    "Translate 'good morning' into French.",
)
# Largest allowed |merged - unmerged| logit, relative to the largest unmerged logit (>= 1):
# fp32 is exact to rounding; half precisions round the merged weights themselves.
TOLERANCE = {torch.float32: 1e-5, torch.bfloat16: 3e-2, torch.float16: 5e-3}


# peft_type (adapter_config.json) -> snug method, for adapter directories outside a run.
class MergeError(UserError):
    """The adapter cannot be merged as asked (user input; shown as one line)."""


@dataclass
class Source:
    """What was trained: the method, where its adapter lies, and the run's config (base, quant)."""

    method: str
    adapter_dir: Path
    cfg: Config


def read_adapter_config(adapter_dir: Path) -> dict:
    """adapter_config.json of a peft adapter directory, read as every adapter config is
    (saved.read_config: at most MAX_CONFIG_BYTES, one line naming the file when it is not a
    JSON object)."""
    return read_config(adapter_dir / "adapter_config.json")


def _method_of_peft_dir(adapter_dir: Path, config: dict) -> str:
    """The registered method that saves this peft_type; of two (lora, dora), the one whose
    flag (use_dora) the config sets."""
    peft_type = config.get("peft_type", "")
    found = [
        m
        for m in methods().values()
        if m.peft_type == peft_type and (not m.peft_flag or config.get(m.peft_flag))
    ]
    if not found:
        raise MergeError(
            f"{adapter_dir / 'adapter_config.json'}: peft_type {peft_type!r} is not one snug knows."
        )
    return max(found, key=lambda m: bool(m.peft_flag)).name


def _base_of_peft_dir(adapter_dir: Path, config: dict) -> str | None:
    """The base an adapter_config.json names: a relative path means the adapter's folder (where
    the file is), never the current directory; else a hub id."""
    base = config.get("base_model_name_or_path")
    if base is None:
        return None
    if not isinstance(base, str) or not base.strip():
        raise MergeError(
            f"{adapter_dir / 'adapter_config.json'}: base_model_name_or_path is {base!r}, not a "
            "path or hub id; pass --model BASE."
        )
    try:
        return paths.resolve(base, adapter_dir.resolve(), "model")
    except paths.Ambiguous as e:
        raise MergeError(
            f"{adapter_dir / 'adapter_config.json'}: base_model_name_or_path {e}; or pass "
            "--model BASE."
        ) from None


def find_source(
    path: str | Path, model: str | None = None, trust_remote_code: bool = False
) -> Source:
    """A run directory (config.yaml beside adapter/ or model/), its adapter/ directory, or any
    peft adapter directory (adapter_config.json). `model` overrides the base the run names.
    Remote code runs only if `trust_remote_code` (the command line) says so: a run directory's
    config.yaml, which anyone can have written, never switches it on."""
    path = Path(path)
    if not path.is_dir():
        raise MergeError(f"--adapter {path}: no such directory.")
    run = path if (path / "config.yaml").is_file() else path.parent
    if (run / "config.yaml").is_file() and (path == run or path.name == "adapter"):
        cfg = load_config(run / "config.yaml")
        method = cfg.method.name
        adapter_dir = run / get_method(method).output
        if (adapter_dir / "adapter_config.json").is_file():
            read_adapter_config(adapter_dir)  # peft reads it unchecked
    elif (path / "adapter_config.json").is_file():
        config = read_adapter_config(path)
        adapter_dir, method = path, _method_of_peft_dir(path, config)
        base = _base_of_peft_dir(path, config)
        if not (model or base):
            raise MergeError(f"{path}/adapter_config.json names no base model; pass --model BASE.")
        # no training here: checkpointing, which some methods cannot train with, is off
        cfg = load_config(None, [f"method.name={method}", "memory.grad_checkpointing=false"])
        cfg.model.name_or_path = base
    elif (path / "snug_adapter.json").is_file():
        adapter_dir, method, cfg = path, "adapter", load_config(None, ["method.name=adapter"])
    else:
        raise MergeError(
            f"--adapter {path}: neither a snug run directory (config.yaml with adapter/) nor an "
            "adapter directory (adapter_config.json)."
        )
    if model:
        cfg.model.name_or_path = (
            paths.absolute(model, Path.cwd()) if Path(model).exists() else model
        )
    cfg.model.trust_remote_code = trust_remote_code
    check_model_dir(cfg.model.name_or_path)
    check = get_method(method).check_saved
    if check is not None:  # before anything is allocated from the adapter's numbers
        check(adapter_dir, base_config(cfg))
    return Source(method, adapter_dir, cfg)


def base_config(cfg: Config) -> dict:
    """The base's config.json (what a saved adapter is checked against), or {} when it is not
    on this machine."""
    from snug.models.fingerprint import local_dir

    folder = local_dir(cfg.model.name_or_path, cfg.model.revision)
    if folder is None or not (folder / "config.json").is_file():
        return {}
    config = json.loads(read_utf8(folder / "config.json", "the model's config", MergeError))
    if not isinstance(config, dict):
        return {}
    text = config.get("text_config")  # a model of text and images: its language model's
    return text if isinstance(text, dict) else config


def check_base(src: Source, label: str, allow_other_base: bool) -> None:
    """Refuse to put an adapter on weights other than those it was trained on (its run
    recorded their fingerprint), also when the shapes match, unless `allow_other_base`. An
    adapter from elsewhere has no record: nothing to check."""
    from snug.models.fingerprint import fingerprint, local_dir, read_base_record

    record = read_base_record(src.adapter_dir)
    folder = local_dir(src.cfg.model.name_or_path, src.cfg.model.revision)
    if record is None or folder is None or allow_other_base:
        return
    now = fingerprint(folder)
    if now != record["fingerprint"]:
        raise MergeError(
            f"{label} was trained on {record['name_or_path']} (fingerprint "
            f"{record['fingerprint']}), but {src.cfg.model.name_or_path} holds other weights "
            f"({now}), on which it would answer garbage; pass --allow-other-base to load it "
            "anyway."
        )


def attach(label: str, base_name: str, load, *args, **kwargs):
    """`load(*args, **kwargs)` (peft putting an adapter on the base), with a shape mismatch (an
    adapter of another model) or damaged adapter files said in one line instead of a library's
    report."""
    try:
        return load(*args, **kwargs)
    except UserError:
        raise
    except Exception as e:  # noqa: BLE001 (peft and safetensors raise many types for bad files)
        if "size mismatch" not in str(e):
            raise MergeError(f"{label}: cannot load the adapter ({first_line(e)}).") from None
        first = next(
            (line.strip() for line in str(e).splitlines() if "size mismatch" in line),
            first_line(e),
        )
        raise MergeError(
            f"{label} does not fit {base_name}: it was trained on a model of another shape "
            f"({first.rstrip('.')})."
        ) from None


def check_mergeable(src: Source) -> None:
    method = get_method(src.method)
    if not method.mergeable:
        where = src.adapter_dir
        hint = (
            f"use {where} as it is: transformers loads it directly"
            if method.output == "model"
            else f"load it on the base instead (peft: PeftModel.from_pretrained(base, '{where}'))"
        )
        raise MergeError(
            f"method {src.method} cannot be merged: {method.unmergeable_because}; {hint}."
        )
    why = get_stage(src.cfg.train.stage).not_a_chat_model_because
    if why:
        raise MergeError(
            f"merging a train.stage={src.cfg.train.stage} run is not supported ({why}); load "
            f"its adapter on the base with peft: PeftModel.from_pretrained(base, "
            f"'{src.adapter_dir}')."
        )
    if not (src.adapter_dir / "adapter_config.json").is_file():
        raise MergeError(f"{src.adapter_dir}: no adapter_config.json; the run did not finish?")
    if not (src.adapter_dir / "adapter_model.safetensors").is_file():
        # peft would fall back to adapter_model.bin, a pickle: snug loads safetensors only.
        pickled = (src.adapter_dir / "adapter_model.bin").is_file()
        raise MergeError(
            f"{src.adapter_dir}: no adapter_model.safetensors"
            + (" (only a pickled adapter_model.bin, which snug does not load)" if pickled else "")
            + "; save the adapter with peft's save_pretrained, which writes safetensors."
        )


def base_dtype(cfg: Config) -> torch.dtype:
    """The dtype the base checkpoint is stored in (what a merged model is written in)."""
    from transformers import AutoConfig

    config = AutoConfig.from_pretrained(
        cfg.model.name_or_path,
        trust_remote_code=cfg.model.trust_remote_code,
        revision=cfg.model.revision,
    )
    dtype = getattr(config, "dtype", None) or torch.float32
    return getattr(torch, dtype) if isinstance(dtype, str) else dtype


@torch.no_grad()
def _logits(model: nn.Module, batches: list[dict]) -> list[torch.Tensor]:
    model.eval()
    return [model(**b).logits.float().cpu() for b in batches]


def _max_difference(a: list[torch.Tensor], b: list[torch.Tensor]) -> tuple[float, float]:
    """(largest |a - b|, largest |b|) over all prompts."""
    diff = max((x - y).abs().max().item() for x, y in zip(a, b, strict=True))
    return diff, max(y.abs().max().item() for y in b)


def merge(
    src: Source,
    out: Path,
    dtype: str = "auto",
    device: str = "cpu",
    verify: bool = True,
    max_shard_size: str = "5GB",
    allow_other_base: bool = False,
    progress: Phase | None = None,
) -> dict:
    """Merge, verify, then write `out` (a new directory); returns what merge_report.json says.
    `progress` (a Phase counted in steps, snug/runtime/progress.py) hears each step: loading, putting
    the adapter on, folding, verifying, writing."""
    from peft import PeftModel

    steps = progress or quiet("merge", 5, "steps")
    check_mergeable(src)
    out = Path(out)
    if out.exists() and (not out.is_dir() or any(out.iterdir())):
        raise MergeError(f"--out {out} exists and is not empty; name a new directory.")
    work_dtype = base_dtype(src.cfg) if dtype == "auto" else DTYPES[dtype]
    precision = {torch.bfloat16: "bf16-mixed", torch.float16: "fp16-mixed"}.get(work_dtype, "fp32")
    dtype_name = next(k for k, v in DTYPES.items() if v == work_dtype)
    cfg = dataclasses.replace(src.cfg, model=dataclasses.replace(src.cfg.model, dtype=dtype_name))
    dev = torch.device(device)
    steps.step(f"loading the base {cfg.model.name_or_path}")
    tok = load_tokenizer(cfg.model)
    base = load_model(cfg, dev, precision)  # quantized as trained when model.quant is set
    batches = [tok(p, return_tensors="pt").to(dev) for p in VERIFY_PROMPTS] if verify else []

    check_base(src, f"--adapter {src.adapter_dir}", allow_other_base)
    # Unmerged: the model as trained (base, quantized if it was, plus the adapter on top).
    label, base_name = f"--adapter {src.adapter_dir}", cfg.model.name_or_path
    steps.step(f"putting the adapter {src.adapter_dir} on")
    peft_model = attach(label, base_name, PeftModel.from_pretrained, base, str(src.adapter_dir))
    unmerged = _logits(peft_model, batches)
    steps.step("folding the adapter into the weights")
    if cfg.model.quant != "none":
        # QLoRA: fold into the dequantized base, in the base's dtype (transformers dequantizes).
        base = peft_model.unload()
        base.dequantize(dtype=work_dtype)
        peft_model = PeftModel.from_pretrained(base, str(src.adapter_dir))
    merged = peft_model.merge_and_unload()
    merged.to(work_dtype)  # k-bit preparation kept norms in fp32; write one dtype
    report = {
        "base": cfg.model.name_or_path,
        "adapter": str(src.adapter_dir),
        "method": src.method,
        "quant": cfg.model.quant,
        "dtype": dtype_name,
        "verified": verify,
    }
    if verify:
        steps.step(f"verifying the merged logits on {len(batches)} prompts")
        diff, scale = _max_difference(_logits(merged, batches), unmerged)
        tolerance = TOLERANCE[work_dtype] * max(1.0, scale)
        report.update(max_logit_difference=diff, tolerance=tolerance, prompts=len(batches))
        if not diff <= tolerance:
            raise MergeError(
                f"verification failed: merged logits differ from base plus adapter by {diff:.3g} "
                f"(tolerance {tolerance:.3g} in {dtype_name}); nothing was written."
                + (
                    f" In {dtype_name} the merge rounds every weight once more; --dtype float32 "
                    "merges without that rounding."
                    if work_dtype != torch.float32
                    else ""
                )
            )

    # Write next to `out`, then rename: a half-written directory is never left under its name.
    steps.step(f"writing {out}")
    tmp = out.with_name(out.name + ".tmp-merge")
    shutil.rmtree(tmp, ignore_errors=True)
    try:
        merged.config.use_cache = True
        merged.save_pretrained(str(tmp), max_shard_size=max_shard_size)
        tok.save_pretrained(str(tmp))
        (tmp / "merge_report.json").write_text(json.dumps(report, indent=2) + "\n")
        if out.exists():
            out.rmdir()  # checked empty above
        tmp.rename(out)
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
    steps.advance(1)
    return report
