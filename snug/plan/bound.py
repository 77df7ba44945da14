"""A lower bound on what a resident candidate holds on the device, without a replay: the bytes
of the model's weights and trainable tensors as `snug train` would load them (the quantized
base's stand-ins included), counted on the `meta` device at two short depths and extended by
the layer count. The search uses it to skip replays of settings that cannot fit (the weights
alone exceed the device) and go to streaming (memory.offload_weights) at once: a 32B replay
costs about 12 s on a 2-core machine, this count under one."""

from __future__ import annotations

import torch
from transformers import PretrainedConfig

from snug.config import Config
from snug.core.registry import get_method
from snug.models.load import compute_dtype, meta_model, quant_storage, resolve_dtype
from snug.plan.simulate import with_depth
from snug.plan.standins import _stand_in_quantized
from snug.train.memory import local, model_tensors
from snug.train.prepare import prepare_for_training


def _model_bytes(cfg: Config, config: PretrainedConfig, device_type: str, precision: str) -> int:
    dtype = resolve_dtype(cfg, torch.device(device_type), precision)
    attn = "sdpa" if cfg.model.attn == "auto" else cfg.model.attn
    model = meta_model(cfg, config, dtype, attn)
    if cfg.model.quant != "none":
        storage = quant_storage(cfg, compute_dtype(precision))
        _stand_in_quantized(model, cfg.model.quant, device_type, storage, precision)
    model = prepare_for_training(model, cfg, precision)
    storages = {id(local(t).untyped_storage()): local(t) for t in model_tensors(model)}
    return sum(t.untyped_storage().nbytes() for t in storages.values())


def weights_bytes(cfg: Config, config: PretrainedConfig, device_type: str, precision: str) -> int:
    """The bytes of the model's tensors (weights, trainable ones, buffers) that a resident run
    of `cfg` loads onto the device; every setting the search varies but the method, the
    quantization and streaming holds at least these."""
    layers = config.num_hidden_layers
    depths = (2, 3)
    trained = get_method(cfg.method.name).trained_layers(cfg.method)
    if trained is not None:  # the top N layers train (freeze): each added layer is frozen
        depths = (layers, layers) if trained.anywhere else (trained.top + 1, trained.top + 2)
    if layers <= depths[1]:
        return _model_bytes(cfg, config, device_type, precision)
    a, b = (_model_bytes(cfg, with_depth(config, d), device_type, precision) for d in depths)
    return b + (b - a) * (layers - depths[1])
