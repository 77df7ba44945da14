"""Load the base model and tokenizer: local directory or hub id, dtype, attention, quantization."""

from __future__ import annotations

import copy
import importlib.util
import logging
import sys
from pathlib import Path

import torch
from transformers import (
    AutoConfig,
    AutoModelForCausalLM,
    AutoTokenizer,
    PretrainedConfig,
    PreTrainedTokenizerBase,
)

from snug.config import Config, ModelConfig
from snug.config.preflight import ModelLoadError, check_model_dir
from snug.core.registry import get_stage, methods
from snug.errors import first_line

log = logging.getLogger("snug")

DTYPES = {"float32": torch.float32, "bfloat16": torch.bfloat16, "float16": torch.float16}


def resolve_device(cfg: Config) -> torch.device:
    if cfg.train.device == "cuda" and not torch.cuda.is_available():
        raise ModelLoadError("train.device=cuda, but no CUDA GPU is visible; use train.device=cpu.")
    if cfg.train.device == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    return torch.device(cfg.train.device)


def resolve_precision(cfg: Config, device: torch.device) -> str:
    """train.precision=auto -> the best the device does well (fp32 on CPU: bf16 is slow there)."""
    if cfg.train.precision != "auto":
        return cfg.train.precision
    if device.type != "cuda":
        return "fp32"
    return "bf16-mixed" if torch.cuda.is_bf16_supported() else "fp16-mixed"


def compute_dtype(precision: str) -> torch.dtype:
    """The dtype matmuls run in under `precision`."""
    return {
        "bf16-mixed": torch.bfloat16,
        "bf16-true": torch.bfloat16,
        "fp16-mixed": torch.float16,
    }.get(precision, torch.float32)


def resolve_dtype(cfg: Config, device: torch.device, precision: str) -> torch.dtype:
    """Storage dtype of the base weights (trainable ones are upcast to fp32 after the method)."""
    if cfg.model.dtype != "auto":
        return DTYPES[cfg.model.dtype]
    if precision == "bf16-true":
        return torch.bfloat16
    whole = methods()[cfg.method.name].output == "model"  # every weight trains
    if device.type != "cuda" or whole or precision == "fp32":
        return torch.float32
    # Adapters on a GPU: frozen weights in the half type the precision computes in.
    return torch.float16 if precision.startswith("fp16") else torch.bfloat16


def resolve_attn(mcfg: ModelConfig, device: torch.device) -> str:
    if mcfg.attn != "auto":
        if mcfg.attn == "flash_attention_2" and importlib.util.find_spec("flash_attn") is None:
            raise ModelLoadError(
                "model.attn=flash_attention_2 needs the flash-attn package (pip install "
                "flash-attn) and a CUDA GPU; use model.attn=sdpa."
            )
        return mcfg.attn
    if device.type == "cuda" and importlib.util.find_spec("flash_attn") is not None:
        return "flash_attention_2"
    return "sdpa"


def quant_storage(cfg: Config, compute: torch.dtype) -> torch.dtype:
    """The dtype bitsandbytes packs 4-bit weights into: uint8 on one device; under FSDP the
    compute dtype, which is every other parameter's (or FSDP's mixed-precision param dtype), so
    the packed weights shard and all-gather with the rest and are never cast. Same bytes."""
    return compute if cfg.dist.strategy == "fsdp" else torch.uint8


def _quant_config(mcfg: ModelConfig, compute: torch.dtype, storage: torch.dtype):
    if mcfg.quant == "none":
        return None
    from transformers import BitsAndBytesConfig

    if mcfg.quant == "8bit":
        return BitsAndBytesConfig(load_in_8bit=True)
    return BitsAndBytesConfig(
        load_in_4bit=True,
        bnb_4bit_quant_type="nf4",
        bnb_4bit_use_double_quant=True,
        bnb_4bit_compute_dtype=compute,
        bnb_4bit_quant_storage=storage,
    )


def _where(mcfg: ModelConfig) -> str:
    local = Path(mcfg.name_or_path)
    return f"model.name_or_path={mcfg.name_or_path}" + ("" if local.exists() else " (hub id)")


def warn_remote_code(mcfg: ModelConfig, what: str) -> None:
    """With model.trust_remote_code (off unless the command line or the config given to this
    command sets it), say whose code runs, at which revision, on stderr."""
    if mcfg.trust_remote_code:
        print(
            f"trust_remote_code is on: running the {what} code shipped with "
            f"{mcfg.name_or_path} (revision {mcfg.revision or 'default'})",
            file=sys.stderr,
        )


def load_tokenizer(mcfg: ModelConfig) -> PreTrainedTokenizerBase:
    check_model_dir(mcfg.name_or_path)
    warn_remote_code(mcfg, "tokenizer")
    try:
        tok = AutoTokenizer.from_pretrained(
            mcfg.name_or_path, trust_remote_code=mcfg.trust_remote_code, revision=mcfg.revision
        )
    except Exception as e:  # noqa: BLE001 (missing, damaged or foreign files: all bad input)
        raise ModelLoadError(
            f"{_where(mcfg)}: cannot load the tokenizer ({first_line(e)})."
        ) from None
    if tok.pad_token is None:
        # Padding positions are masked out of attention and loss, so any token will do; the
        # eos token is the usual choice and keeps the vocabulary (and embeddings) unchanged.
        tok.pad_token = tok.eos_token if tok.eos_token is not None else tok.unk_token
        if tok.pad_token is None:
            raise ModelLoadError(f"{_where(mcfg)}: the tokenizer has no pad, eos or unk token.")
    return tok


def upcast_norms(model: torch.nn.Module) -> None:
    """Norm weights to fp32, for stable statistics on a quantized base (the planner's 4-bit
    replay calls this too, so both hold the same tensors)."""
    for name, p in model.named_parameters():
        if "norm" in name and p.dtype != torch.float32:
            p.data = p.data.float()


def _prepare_kbit(model: torch.nn.Module, precision: str) -> None:
    """What QLoRA users expect of a quantized base: norm weights upcast to fp32 (embeddings and
    head stay as loaded, unlike peft's prepare_model_for_kbit_training, which upcasts every
    non-quantized weight and so doubles a large vocabulary's memory). Not under bf16-true:
    with no autocast, an fp32 norm would hand fp32 activations to the bf16 head and adapters;
    everything stays bf16 there, as in torchtune's QLoRA recipes."""
    if precision != "bf16-true":
        upcast_norms(model)
    from bitsandbytes.nn import Linear4bit

    for module in model.modules():
        if isinstance(module, Linear4bit):
            # On CPUs with AVX512-BF16, bitsandbytes repacks 4-bit weights for inference on the
            # first eval-mode forward and keeps that layout; its packed kernel has no backward,
            # so training after an evaluation would silently lose gradients through the layer
            # (tests/test_methods.py). snug trains, so it keeps the trainable layout.
            module.support_avx512bf16_for_cpu = False


def base_config(mcfg: ModelConfig) -> PretrainedConfig | None:
    """The base's config.json (local, or a hub id in the cache or reachable); None where it
    cannot be read (loading the model says why)."""
    try:
        return AutoConfig.from_pretrained(
            mcfg.name_or_path, trust_remote_code=mcfg.trust_remote_code, revision=mcfg.revision
        )
    except Exception:  # noqa: BLE001 (missing, damaged or foreign: load_model names it)
        return None


def meta_model(
    cfg: Config, config: PretrainedConfig, dtype: torch.dtype | None = None, attn: str = "sdpa"
) -> torch.nn.Module:
    """The model `cfg` trains, built from `config` on the meta device (names and shapes, no
    weights, no memory) as its stage loads it: a classifier gets its head, over two classes
    standing in for the data's (the head is tiny)."""
    stage = get_stage(cfg.train.stage)
    auto, labels = AutoModelForCausalLM, None
    if stage.classifier:
        labels = ["0", "1"]
        auto, head = stage.model_class(labels, config.pad_token_id or 0)
        config = copy.deepcopy(config)
        for key, value in head.items():
            setattr(config, key, value)
    with torch.device("meta"):
        model = auto.from_config(config, dtype=dtype, attn_implementation=attn)
        stage.after_load(model, cfg, labels, "meta")
    return model


def load_model(
    cfg: Config,
    device: torch.device,
    precision: str,
    labels: list[str] | None = None,
    pad_token_id: int | None = None,
) -> torch.nn.Module:
    """The base model on `device`, frozen weights in the resolved storage dtype, as the stage
    loads it: a causal LM, or (train.stage=cls) a sequence classifier with a new head over
    `labels`. With memory.offload_weights it is loaded into host memory (for `device`: its
    dtype and attention), and snug/train/streaming.py moves what stays resident."""
    check_model_dir(cfg.model.name_or_path)
    warn_remote_code(cfg.model, "model")
    host = torch.device("cpu") if cfg.memory.offload_weights else None
    return load_weights(cfg, device, precision, labels, pad_token_id, host)


def load_weights(
    cfg: Config,
    device: torch.device,
    precision: str,
    labels: list[str] | None = None,
    pad_token_id: int | None = None,
    load_on: torch.device | None = None,
) -> torch.nn.Module:
    """`load_model` without its checks of the directory (a tokenizer beside the weights, the
    remote-code warning): for weights snug itself has just saved, as `snug calibrate` saves its
    random-weight bases."""
    mcfg = cfg.model
    dtype = resolve_dtype(cfg, device, precision)
    compute = compute_dtype(precision)
    quant = _quant_config(mcfg, compute, quant_storage(cfg, compute))
    stage = get_stage(cfg.train.stage)
    auto_class, head = stage.model_class(labels, pad_token_id)
    try:
        model = auto_class.from_pretrained(
            mcfg.name_or_path,
            dtype=dtype,
            attn_implementation=resolve_attn(mcfg, device),
            quantization_config=quant,
            trust_remote_code=mcfg.trust_remote_code,
            revision=mcfg.revision,
            device_map={"": load_on or device} if quant is not None else None,
            use_safetensors=True,  # never unpickle weights, local or from the hub
            **head,
        )
    except Exception as e:  # noqa: BLE001 (missing, damaged or foreign files: all bad input)
        raise ModelLoadError(f"{_where(mcfg)}: cannot load the model ({first_line(e)}).") from None
    if quant is None:
        model.to(load_on or device)
    else:
        _prepare_kbit(model, precision)
    model.config.use_cache = False  # training never reuses the KV cache
    stage.after_load(model, cfg, labels, device)
    return model
