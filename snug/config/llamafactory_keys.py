"""What each LLaMA-Factory key becomes in a snug config (snug/config/llamafactory.py reads a
LLaMA-Factory YAML or command line through these).

Defaults are LLaMA-Factory's (its src/llamafactory/hparams/*.py) and, for the keys it passes
on, Hugging Face TrainingArguments': a key left out of a LLaMA-Factory config gets the value
LLaMA-Factory would have used, written into the snug config where snug's own default differs.
Every key is either converted, set aside with the reason (it only changes speed, logging or
housekeeping), or refused (it would change what is learnt and snug cannot do it): none is
dropped without a word.
"""

from __future__ import annotations

from typing import Any

# Template names of LLaMA-Factory with a snug built-in of the same prompt format. Other names
# pass through to data.template unchanged (snug/data/templates.py says whether it has them).
TEMPLATES = {
    "llama3": "llama3",
    "mistral": "mistral",
    "gemma": "gemma",
    "phi": "phi3",
    "alpaca": "alpaca",
    "chatml": "chatml",
    "empty": "auto",
    "default": "auto",
}

# LLaMA-Factory's `flash_attn` -> model.attn
ATTENTION = {"auto": "auto", "sdpa": "sdpa", "fa2": "flash_attention_2", "disabled": "eager"}

# Hugging Face `optim` -> memory.optimizer
OPTIMIZERS = {
    "adamw_torch": "adamw",
    "adamw_torch_fused": "adamw",
    "adamw_hf": "adamw",
    "adamw_bnb_8bit": "adamw8bit",
    "adamw_8bit": "adamw8bit",
    "paged_adamw_8bit": "paged_adamw8bit",
    "adafactor": "adafactor",
    "lion_8bit": "lion8bit",
}

# Hugging Face `lr_scheduler_type` -> train.scheduler (snug's schedules start after warmup)
SCHEDULERS = {
    "cosine": "cosine",
    "linear": "linear",
    "constant": "constant",
    "constant_with_warmup": "constant",
}

DIST_INSTEAD = (
    "snug shards with dist.strategy=fsdp and dist.nproc=N (ZeRO-3: dist.reshard_after_forward="
    "true; ZeRO-2: false; offload: dist.cpu_offload=true), or replicates with dist.strategy=ddp"
)

# Keys that ask for something snug cannot do unless they hold LLaMA-Factory's default (which
# asks for nothing): key -> (that default, what to do instead).
REFUSED_UNLESS_DEFAULT: dict[str, tuple[Any, str]] = {
    "deepspeed": (None, DIST_INSTEAD),
    "fsdp": (None, DIST_INSTEAD),
    "fsdp_config": (None, DIST_INSTEAD),
    "use_galore": (
        False,
        "GaLore is not in snug; memory.optimizer=adamw8bit saves optimizer memory",
    ),
    "use_apollo": (
        False,
        "APOLLO is not in snug; memory.optimizer=adamw8bit saves optimizer memory",
    ),
    "use_badam": (False, "BAdam is not in snug; method.name=freeze trains a few layers"),
    "use_adam_mini": (False, "Adam-mini is not in snug; memory.optimizer=adamw8bit"),
    "use_muon": (False, "Muon is not in snug"),
    "use_llama_pro": (False, "LLaMA Pro block expansion is not in snug"),
    "use_mca": (False, "Megatron training is not in snug"),
    "use_unsloth": (False, "snug has its own memory savings; remove it"),
    "use_unsloth_gc": (False, "memory.offload_activations=true keeps activations on the host"),
    "enable_liger_kernel": (False, "memory.chunked_loss=true already avoids full logits"),
    "shift_attn": (False, "shift short attention (LongLoRA) is not in snug"),
    "rope_scaling": (None, "RoPE scaling is not in snug; change the model's config.json"),
    "mixture_of_depths": (None, "mixture-of-depths is not in snug"),
    "train_from_scratch": (False, "snug fine-tunes pretrained weights"),
    "resize_vocab": (False, "snug does not resize the vocabulary"),
    "new_special_tokens": (None, "snug does not add tokens"),
    "upcast_layernorm": (False, "snug keeps norm weights as loaded"),
    "moe_aux_loss_coef": (None, "snug adds no MoE auxiliary loss"),
    "adapter_name_or_path": (None, "merge it into a base with snug merge and train on that"),
    "additional_target": (None, "method.name=lora trains adapters only"),
    "pissa_init": (False, "PiSSA initialisation is not in snug"),
    "loraplus_lr_embedding": (1e-6, "snug's LoRA+ has no separate embedding rate"),
    "create_new_adapter": (False, "snug starts one new adapter"),
    "neftune_noise_alpha": (None, "NEFTune noise is not in snug"),
    "label_smoothing_factor": (0.0, "snug's SFT loss has no label smoothing"),
    "pref_bco_weight": (0.0, "BCO is not in snug"),
    "ref_model": (None, "snug's reference is the model without its adapter, or a copy"),
    "streaming": (False, "snug reads the data before training; data.max_samples keeps a part"),
    "tokenized_path": (None, "snug caches tokenized data by itself"),
    "eval_on_each_dataset": (False, "snug evaluates the eval data as one set"),
    "ignore_pad_token_for_loss": (True, "snug never trains on padding"),
    "adam_beta1": (0.9, "snug's AdamW uses betas 0.9, 0.999"),
    "adam_beta2": (0.999, "snug's AdamW uses betas 0.9, 0.999"),
    "adam_epsilon": (1e-8, "snug's AdamW uses eps 1e-8"),
    "freeze_trainable_modules": ("all", "method.trainable_modules takes glob patterns instead"),
    "quantization_type": ("nf4", "snug's 4bit is NF4"),
    "double_quantization": (True, "snug's 4bit always quantizes its constants too"),
    "quantization_method": ("bnb", "snug quantizes with bitsandbytes only (model.quant)"),
    "do_predict": (False, "predict with snug generate after training"),
    "metric_for_best_model": (
        None,
        "snug chooses a best checkpoint only with load_best_model_at_end (output.keep_best)",
    ),
    "greater_is_better": (
        None,
        "snug chooses a best checkpoint only with load_best_model_at_end (output.keep_best)",
    ),
    "use_swanlab": (False, "snug writes metrics.jsonl and status.json"),
    "tool_format": (None, "snug renders tools with the chat template"),
    "enable_thinking": (True, "choose a template without thinking instead"),
}

# Keys that change nothing snug learns (speed, logging, housekeeping): key -> why it is set
# aside. Said on one line when given.
SET_ASIDE = {
    "report_to": "snug writes metrics.jsonl and status.json",
    "ddp_timeout": "snug's own timeouts apply",
    "dataloader_num_workers": "snug feeds batches from memory",
    "dataloader_pin_memory": "snug feeds batches from memory",
    "dataloader_persistent_workers": "snug feeds batches from memory",
    "preprocessing_batch_size": "speed only",
    "per_device_eval_batch_size": "speed only: eval runs one micro-batch at a time",
    "buffer_size": "used with streaming only",
    "overwrite_cache": "snug re-tokenizes whenever data, template, tokenizer or cutoff change",
    "overwrite_output_dir": (
        "snug resumes an interrupted run in output.dir and never overwrites a finished one; "
        "pass --fresh to start over"
    ),
    "save_only_model": "snug's checkpoints always hold what resuming needs",
    "logging_dir": "snug logs into output.dir",
    "run_name": "snug names a run by output.dir",
    "print_param_status": "snug reports trainable_params in summary.json",
    "low_cpu_mem_usage": "snug loads weights lazily",
    "use_reentrant_gc": "snug picks its checkpointing mode",
    "include_num_input_tokens_seen": "summary.json has tokens_per_second",
    "infer_backend": "used by chat and inference only",
    "cache_dir": "snug uses the Hugging Face cache (HF_HOME)",
    "hf_hub_token": "set HF_TOKEN in the environment",
    "do_eval": "snug evaluates whenever there is eval data (data.eval or data.val_size)",
    "disable_tqdm": "snug shows its own progress",
    "log_level": "logging only",
    "logging_first_step": "logging only",
    "save_safetensors": "snug always writes safetensors",
    "remove_unused_columns": "snug keeps the columns its format needs",
    "ddp_find_unused_parameters": "snug's ddp sets it",
}

# Data keys that map to a snug key only where snug declares it (other work adds some of them):
# LLaMA-Factory key -> (the snug key, LLaMA-Factory's default).
DATA_IF_DECLARED = {
    "dataset_dir": ("data.dataset_dir", "data"),
    "mask_history": ("data.mask_history", False),
    "default_system": ("data.default_system", None),
    "preprocessing_num_workers": ("data.num_proc", None),
    "mix_strategy": ("data.mix", "concat"),
}
