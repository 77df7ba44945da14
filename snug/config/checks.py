"""Rules that span config sections: the one place where sections meet (a method's rules across
sections live with the method, `Method.check`; a stage's with the stage, `Stage.check`). Run by
snug.config when a config is read, after the method and stage registries are filled, so that
every config error comes before any model is loaded."""

from __future__ import annotations

from typing import Any

from snug.core.registry import methods, stages
from snug.errors import ConfigError

Config = Any  # snug.config.Config (that module imports this one)


def check_combinations(cfg: Config, source: str) -> None:
    """Rules that involve more than one key. The one place where sections meet."""
    m, t, d = cfg.model, cfg.train, cfg.data
    if m.quant != "none" and methods()[cfg.method.name].output == "model":
        raise ConfigError(
            f"{source}: model.quant={m.quant} needs an adapter method (method.name=lora, dora, "
            f"...), since quantized weights cannot be trained by method.name={cfg.method.name}."
        )
    if d.val_size > 0 and d.eval is not None:
        raise ConfigError(
            f"{source}: data.val_size holds out part of train as eval data, but data.eval is "
            "given too; set one of them."
        )
    check_mix(d, source)
    _check_keep_best(cfg, source)
    stage = stages()[t.stage]
    if t.micro_batch < stage.min_rows:
        raise ConfigError(
            f"{source}: train.stage={t.stage} needs train.micro_batch of at least "
            f"{stage.min_rows}: {stage.min_rows_because}."
        )
    stage.check(cfg, source)
    method = methods()[cfg.method.name]
    if method.check is not None:
        method.check(cfg, source)
    virtual = method.virtual_tokens
    if d.packing and (stage.no_packing_because or virtual):
        what = (
            f"train.stage={t.stage}"
            if stage.no_packing_because
            else f"method.name={cfg.method.name}"
        )
        raise ConfigError(
            f"{source}: data.packing=true does not work with {what}: "
            + (
                stage.no_packing_because
                or "its virtual tokens would be shared by every sample of a packed row"
            )
            + "; set data.packing=false."
        )
    _check_dist(cfg, source)
    _check_offload_weights(cfg, source)
    why = methods()[cfg.method.name].no_checkpointing_because
    if why and cfg.memory.grad_checkpointing:
        raise ConfigError(
            f"{source}: method.name={cfg.method.name} needs memory.grad_checkpointing=false: {why}."
        )


def _check_offload_weights(cfg: Config, source: str) -> None:
    """memory.offload_weights streams frozen decoder-layer weights (snug/train/streaming.py)."""
    if not cfg.memory.offload_weights:
        return
    where = f"{source}: memory.offload_weights=true"
    method = methods()[cfg.method.name]
    if method.output == "model" and cfg.method.name != "freeze":
        raise ConfigError(
            f"{where} streams frozen weights, but method.name={cfg.method.name} trains every "
            "weight, whose gradients and optimizer state must stay on the device; use an "
            "adapter method (method.name=lora, or qlora with model.quant=4bit) or "
            "method.name=freeze (its frozen layers stream), or dist.strategy=fsdp with "
            "dist.cpu_offload=true on several cards."
        )
    if not cfg.memory.grad_checkpointing and cfg.model.quant != "none":
        raise ConfigError(
            f"{where} with model.quant={cfg.model.quant} needs memory.grad_checkpointing=true: "
            "without it bitsandbytes' layers keep their weights for backward outside "
            "autograd's saved tensors, which streaming cannot hand back."
        )
    if cfg.dist.strategy != "none":
        raise ConfigError(
            f"{where} streams to one device; with dist.strategy={cfg.dist.strategy} use "
            "dist.cpu_offload=true (fsdp) instead."
        )
    if cfg.model.quant == "8bit":
        raise ConfigError(
            f"{where} with model.quant=8bit is not supported: bitsandbytes' LLM.int8 layers "
            "keep their int8 weights and scales in a state object beside the parameter; use "
            "model.quant=4bit (or none)."
        )
    stage = stages()[cfg.train.stage]
    reference = getattr(stage.own(cfg), "reference", None)
    if getattr(stage, "uses_reference", False) and reference is not None:
        switches = method.output == "adapter" and method.peft_type is not None
        if reference == "copy" or (reference == "auto" and not switches):
            raise ConfigError(
                f"{where}: the reference would be a copy of the whole model (pref.reference="
                f"{reference} with method.name={cfg.method.name}), resident on the device; "
                "use pref.reference=precompute" + (" or adapter_off." if switches else ".")
            )


def _check_keep_best(cfg: Config, source: str) -> None:
    """output.keep_best chooses among the held-out losses measured every train.eval_every."""
    if not cfg.output.keep_best:
        return
    missing = []
    if cfg.data.eval is None and not cfg.data.val_size > 0:
        missing.append("eval data (data.eval or data.val_size)")
    if not cfg.train.eval_every:
        missing.append("train.eval_every")
    if missing:
        raise ConfigError(
            f"{source}: output.keep_best keeps the weights of the lowest held-out loss, which "
            f"needs {' and '.join(missing)}; set them or output.keep_best=false."
        )


def _check_dist(cfg: Config, source: str) -> None:
    """What ddp/fsdp support today; anything else is refused before any process starts."""
    d = cfg.dist
    if d.strategy == "none":
        if d.nproc > 1:
            raise ConfigError(f"{source}: dist.nproc > 1 needs dist.strategy: ddp or fsdp.")
        return
    if not methods()[cfg.method.name].shardable:
        shardable = ", ".join(m.name for m in methods().values() if m.shardable)
        raise ConfigError(
            f"{source}: dist.strategy={d.strategy} trains {shardable}; method.name="
            f"{cfg.method.name} runs on one device (dist.strategy=none)."
        )
    if cfg.model.quant == "8bit":
        raise ConfigError(
            f"{source}: dist.strategy={d.strategy} with model.quant=8bit is not supported: "
            "bitsandbytes' LLM.int8 weights keep their scales on the parameter object, which "
            "DDP/FSDP wrapping does not carry; use model.quant=4bit (QLoRA shards) or none."
        )
    if cfg.memory.auto_fit:
        raise ConfigError(
            f"{source}: memory.auto_fit plans one device; with dist.strategy set micro_batch, "
            "grad_checkpointing and optimizer yourself."
        )
    if d.cpu_offload and d.strategy != "fsdp":
        raise ConfigError(f"{source}: dist.cpu_offload needs dist.strategy=fsdp.")
    if d.cpu_offload and cfg.train.device == "cpu":
        raise ConfigError(
            f"{source}: dist.cpu_offload moves FSDP's shards from the GPU to the host; training "
            "on the CPU keeps them there already, so leave it off there."
        )


def check_mix(d: Any, source: str) -> None:
    """data.mix_probs: one chance per train source, summing to 1, and only to interleave."""
    if d.mix_probs is None:
        return
    count = 1 if isinstance(d.train, str) else len(d.train)
    if d.mix == "concat":
        raise ConfigError(
            f"{source}: data.mix_probs weighs sources that are interleaved, but data.mix is "
            "concat (all of each); set data.mix: interleave or remove data.mix_probs."
        )
    if len(d.mix_probs) != count or any(p < 0 for p in d.mix_probs):
        raise ConfigError(
            f"{source}: data.mix_probs gives {len(d.mix_probs)} chance(s) for {count} train "
            "source(s); give one chance (>= 0) per entry of data.train, in order."
        )
    if abs(sum(d.mix_probs) - 1) > 1e-6:
        raise ConfigError(
            f"{source}: data.mix_probs sums to {sum(d.mix_probs):g}; the chances must sum to 1."
        )
