"""Replay snug's own training step on fake tensors: the peak memory and FLOPs of a fine-tune,
without weights, data or a GPU.

The model is built from its config on the `meta` device, the method and memory settings are
applied exactly as `snug train` applies them, the weights become fake tensors
(`FakeTensorMode`: shapes, dtypes and devices, no storage), and `train/step.py` runs two
optimizer steps (so optimizer state exists) under snug's tensor tracker and torch's FLOP
counter. The peak is what the tracker saw; nothing here is a formula.

Deep models are simulated at two small depths and extended by the layer count: every decoder
layer adds the same tensors (weights, their gradients and optimizer state, one checkpointed
input or one layer's activations), so FLOPs and the peak of each phase of the step (each
micro-batch's forward, its backward, the update) are linear in the depth past the first
layers. Which phase holds the step's peak can change with depth, so each is extended on its
own. `tests/test_plan.py` checks that the extension equals a direct simulation.
"""

from __future__ import annotations

import contextlib
import copy
import dataclasses
from dataclasses import dataclass
from unittest import mock

import torch
from torch._subclasses.fake_tensor import FakeTensorMode
from transformers import PretrainedConfig, masking_utils

from snug.config import Config
from snug.core.registry import get_method
from snug.errors import UserError
from snug.methods import count_params
from snug.models.load import compute_dtype, meta_model, quant_storage, resolve_dtype
from snug.plan.allocator import run_reserved
from snug.plan.distributed import fake_group, shard
from snug.plan.standins import (
    FourBitStandIn,
    Int8StandIn,
    _optimizer,
    _stand_in_quantized,
    _state_tensors,
)
from snug.plan.trace import LayerTags, deepen, survivors
from snug.plan.tracker import CATEGORIES, ModuleNames, PhaseTracker
from snug.train.dist import Dist, wrap_reference
from snug.train.memory import local, model_tensors
from snug.train.prepare import prepare_for_training, step_options
from snug.train.step import train_step
from snug.train.streaming import stream_weights
from snug.train.wrapped import causal_lm

# The CUDA caching allocator hands out blocks in multiples of 512 bytes.
CUDA_ROUNDING = 512
SHORT_DEPTHS = (2, 3)  # depths simulated when extending to a deep model
# The decoder layer whose storage events stand for every added layer in the allocator replay
# (plan/trace.py): the second, which has a layer before and after it at either short depth.
MIDDLE_LAYER = 1


class PlanError(UserError):
    """The configuration cannot be simulated (user input; shown as one line)."""


@dataclass
class Simulation:
    peak_bytes: int  # tracked peak of live tensor storage during two optimizer steps
    weights_bytes: int  # the model's tensors before the first step (weights and buffers)
    flops_per_step: int  # forward + backward (+ recomputation) of one optimizer step
    ops_per_step: int  # ops dispatched in one optimizer step (each a kernel launch or more)
    optimizer_bytes: int  # optimizer state after the steps
    trainable_params: int
    total_params: int
    layers_simulated: tuple[int, ...]
    breakdown: dict[str, int]  # the peak by category (tracker.CATEGORIES); sums to peak_bytes
    # peak and breakdown of each phase of the step (PhaseTracker), which the extension grows
    phases: list[tuple[int, dict[str, int]]] = dataclasses.field(default_factory=list)
    # On CUDA: what the caching allocator reserves at most over loading and training
    # (`max_memory_reserved`), replayed from the storages made and freed (plan/allocator.py)
    reserved_bytes: int | None = None
    largest_at_peak: list[dict] = dataclasses.field(default_factory=list)  # with explain=True
    # bytes read and written in one optimizer step by ops without FLOPs (elementwise, norms,
    # softmax, copies, the optimizer's update): the step's memory-bound work
    traffic_per_step: int = 0
    # matmuls with a 4-bit weight in one optimizer step (tracker.py: quant_calls)
    quant_calls_per_step: int = 0
    # memory.offload_weights (train/streaming.py): the host memory (pinned on CUDA) the
    # streamed weights take, outside the peak, and the bytes copied to the device per step
    host_bytes: int = 0
    streamed_bytes_per_step: int = 0


def with_depth(config: PretrainedConfig, layers: int) -> PretrainedConfig:
    config = copy.deepcopy(config)
    config.num_hidden_layers = layers
    for key in ("layer_types", "mlp_only_layers"):  # per-layer lists follow the depth
        value = getattr(config, key, None)
        if isinstance(value, list) and value:
            setattr(config, key, (value * layers)[:layers])
    return config


@contextlib.contextmanager
def _unpacked_rows(unpacked: bool):
    """transformers decides from the values of position_ids whether rows are packed; fake
    tensors have no values, so it would assume packing and build a full mask that a real
    unpacked run never builds. Unpacked configs tell it the answer the real run gets."""
    if not unpacked:
        yield
        return
    with mock.patch.object(
        masking_utils, "find_packed_sequence_indices", lambda position_ids: None
    ):
        yield


def _simulate_once(
    cfg: Config,
    config: PretrainedConfig,
    seq_len: int,
    device_type: str,
    precision: str,
    targets: int | None,
    explain: bool = False,
    reserved_depth: int | None = None,
    padded: bool = False,
) -> Simulation:
    """One replay at `config`'s depth. With `reserved_depth` (on CUDA), also what the caching
    allocator reserves for loading and training that model deepened to so many layers.
    `padded`: micro-batches of several rows carry an attention mask (see `simulate`)."""
    device = torch.device(device_type)
    dtype = resolve_dtype(cfg, device, precision)
    attn = "sdpa" if cfg.model.attn == "auto" else cfg.model.attn
    model = meta_model(cfg, config, dtype, attn)  # a classifier: two classes stand in
    model.config.use_cache = False
    if cfg.model.quant != "none":
        storage = quant_storage(cfg, compute_dtype(precision))
        _stand_in_quantized(model, cfg.model.quant, device_type, storage, precision)
    model = prepare_for_training(model, cfg, precision)
    trainable, total = count_params(model)
    world = cfg.dist.processes
    opts = dataclasses.replace(step_options(cfg, device, precision), world=world)
    if device_type == "cuda":
        # The fake tensors live on the CPU device (to_empty below), and CUDA autocast casts only
        # CUDA tensors: with a GPU in this machine it would cast nothing (a LoRA step's fp32
        # adapters would then run their matmuls in fp32: 9% more at the peak in
        # tests/test_plan.py's case), without one torch turns it off. CPU autocast casts the
        # same matmuls to the same half type, which is what the fake step needs to allocate
        # like a GPU run, wherever the plan is made.
        opts = dataclasses.replace(opts, device_type="cpu")
    b, t = cfg.train.micro_batch, seq_len
    n_targets = b * (t - 1) if targets is None else min(targets, b * (t - 1))
    modules = ModuleNames(model)
    rounding = CUDA_ROUNDING if device_type == "cuda" else 1
    tracker = PhaseTracker(rounding, modules, model.config.get_text_config().vocab_size)
    record = device_type == "cuda" and reserved_depth is not None
    events = tracker.events = [] if record else None
    updates: list[int] = []  # where in `events` each optimizer step starts
    for m in model.modules():
        if isinstance(m, (FourBitStandIn, Int8StandIn)):
            m.tracker = tracker
    with (
        fake_group(world) as mesh,
        FakeTensorMode(allow_non_fake_inputs=True),
        _unpacked_rows(not cfg.data.packing),
    ):
        # Each module once: peft's prompt-learning models hold the base's input embedding twice
        # (in the base and as `word_embeddings`), and converting a tensor the fake mode already
        # holds again fails to swap it (model.dtype bfloat16: "Couldn't swap Embedding.weight").
        for module in model.modules():  # modules() yields a shared module once
            module.to_empty(device="cpu", recurse=False)
        model.tie_weights()  # to_empty gives each module its own tensor: tie them again
        # the stage's frozen reference, made as build_run makes it: before wrapping and the
        # module hooks, then sharded as the model is
        reference = opts.stage.reference(model, cfg)
        held_by_wrapper = shard(model, cfg, mesh, precision)  # rank 0 of dist.nproc, if any
        wrap_reference(
            opts.stage, reference, cfg, Dist(world, strategy=cfg.dist.strategy), precision, mesh
        )
        # the streamed layers' host tensors are not device memory: left out of the peak
        stream = stream_weights(model, torch.device("cpu")) if cfg.memory.offload_weights else None
        on_host = {id(t.untyped_storage()) for t in stream.host_tensors()} if stream else set()
        params = [p for p in model.parameters() if p.requires_grad]
        for p in params:
            p.register_post_accumulate_grad_hook(lambda p: tracker.mark([p.grad], "gradients"))

        def batch() -> dict:
            # What the collate step gives rows of seq_len tokens (the stage's own fake batch: a
            # causal LM's unless the stage says otherwise), with the mask of a padded batch
            tracker.inputs = True
            out = opts.stage.fake_batch(b, t, n_targets)
            ids = out["input_ids"]
            if padded and ids.shape[0] > 1 and "attention_mask" not in out:
                out["attention_mask"] = torch.ones_like(ids)
            tracker.inputs = False
            return out

        tracker.layers = LayerTags(causal_lm(model).get_decoder()) if record else None
        with modules, tracker, tracker.layers or contextlib.nullcontext():
            tracker.track(
                t for t in model_tensors(model) if id(local(t).untyped_storage()) not in on_host
            )
            if stream is not None:  # a layer's copy on the device holds weights
                stream.on_load = lambda copies: tracker.mark(copies, "weights")
                stream.tagging = tracker.layers.forcing if tracker.layers else None
            tracker.track(held_by_wrapper)
            tracker.mark(held_by_wrapper, "gradients")  # DDP's gradient buckets
            for frozen in opts.stage.frozen_models(reference):  # a copy holds weights
                tracker.track(model_tensors(frozen))
            weights = tracker.live
            loaded = len(events or ())
            optimizer = _optimizer(model, cfg, device_type)
            optimizer.register_step_post_hook(
                lambda opt, args, kwargs: tracker.mark(_state_tensors(opt), "optimizer")
            )
            optimizer.register_step_pre_hook(
                lambda opt, args, kwargs: updates.append(len(events or ()))
            )
            # Step 1 only has to leave the optimizer state behind: its forward and backward
            # run again in step 2 with that state alive, so they never set the peak. Zero
            # gradients and one update make the same state (tests/test_plan.py compares with
            # two real steps).
            for p in params:
                p.grad = torch.zeros_like(p)
                tracker.mark([p.grad], "gradients")
            optimizer.step()
            optimizer.zero_grad(set_to_none=True)
            tracker.close_phase()  # step 1 made state, step 2 is the steady state
            first_end = len(events or ())
            if record:  # the state belongs to its parameter's layer
                for p, state in optimizer.state.items():
                    for v in state.values():
                        if torch.is_tensor(v):
                            tracker.layers.tag(v, tracker.layers.of_tensor.get(id(p)))
            # Step 2, the steady state. The second micro-batch of a step is the first to add
            # into existing gradients, and every later one repeats it, so two stand for any
            # accumulation; the loop collates every micro-batch of a step before it starts, so
            # the others are held (and counted) without being run.
            accum = min(cfg.train.grad_accum, 2)
            held = [batch() for _ in range(cfg.train.grad_accum - accum)]
            tracker.counting = True
            streamed = stream.loaded_bytes if stream else 0
            train_step(
                model, optimizer, [batch() for _ in range(accum)], opts, None, None, reference
            )
            streamed = (stream.loaded_bytes if stream else 0) - streamed
            tracker.counting = False
            del held
            step_end = len(events or ())
            optimizer_bytes = sum(
                {
                    id(local(v).untyped_storage()): local(v).untyped_storage().nbytes()
                    for v in _state_tensors(optimizer)
                }.values()
            )
    return Simulation(
        peak_bytes=tracker.peak,
        weights_bytes=weights,
        # FLOPs of the micro-batches run, per micro-batch times the accumulation
        flops_per_step=tracker.flops * cfg.train.grad_accum // accum,
        ops_per_step=tracker.ops * cfg.train.grad_accum // accum,
        traffic_per_step=tracker.traffic * cfg.train.grad_accum // accum,
        quant_calls_per_step=tracker.quant_calls * cfg.train.grad_accum // accum,
        host_bytes=stream.host_bytes if stream else 0,
        streamed_bytes_per_step=streamed * cfg.train.grad_accum // accum,
        optimizer_bytes=optimizer_bytes,
        trainable_params=trainable,
        total_params=total,
        layers_simulated=(config.num_hidden_layers,),
        breakdown=tracker.breakdown(),
        phases=tracker.phases,
        reserved_bytes=None
        if events is None
        else _reserved(
            events,
            tracker.layers,
            (loaded, first_end, updates[-1], step_end),
            reserved_depth - config.num_hidden_layers,
        ),
        largest_at_peak=tracker.largest() if explain else [],
    )


def _reserved(events: list, layers: LayerTags, marks: tuple, extra: int) -> int:
    """Peak reserved bytes of the caching allocator (plan/allocator.py) over a run of the model
    with `extra` more layers: loading puts its tensors on the device (the replay's own, in
    order); the first step is the replayed step with the optimizer state made as its update
    starts (the state the replay's first step left); later steps repeat the replayed step.
    `marks`: where in `events` loading ends, the replay's first step ends, the replayed step's
    update starts and the step ends."""
    loaded, first_end, update, end = marks
    state = layers.tagged(survivors(events[loaded:first_end]))
    step = events[first_end:end]
    first = [*events[first_end:update], *state, *events[update:end]]
    return run_reserved(
        deepen(layers.tagged(events[:loaded]), MIDDLE_LAYER, extra),
        deepen(first, MIDDLE_LAYER, extra),
        deepen(step, MIDDLE_LAYER, extra),
    ).peak_reserved


def simulate(
    cfg: Config,
    config: PretrainedConfig,
    seq_len: int,
    device_type: str = "cuda",
    precision: str | None = None,
    targets: int | None = None,
    extend: bool = True,
    padded: bool | None = None,
) -> Simulation:
    """Peak bytes and FLOPs of `snug train` with `cfg` on a model of `config`, micro-batches of
    `cfg.train.micro_batch` x `seq_len` tokens, `targets` loss-carrying positions per
    micro-batch (default: all). `extend`: simulate two short depths and extend linearly, for
    a model deeper than the two together.

    `padded`: whether a micro-batch of several rows is padded to its longest row, and so
    carries an attention mask, with which attention keeps more for backward than its causal
    path without one (benchmarks/plan_padding.py). Default: unless data.packing, since rows of
    real data differ in length and the step that sets a run's peak (its longest row among
    shorter ones) is padded; False replays whole rows, as data of one length gives them (the
    tests' real steps). A preference stage's micro-batch is always several rows.
    """
    precision = precision or ("bf16-mixed" if device_type == "cuda" else "fp32")
    padded = not cfg.data.packing if padded is None else padded
    layers = config.num_hidden_layers
    depths = SHORT_DEPTHS
    streamed = cfg.memory.offload_weights
    if streamed:
        # Each layer's copies are made while the layer next to it runs (its prefetch), which
        # the allocator replay's repetition of one middle layer's events (plan/trace.py) does
        # not follow. The layers' copies are all of one layout, so each reuses the blocks the
        # one before freed: the allocator keeps what it reserves beyond the peak at a few layers
        # (tests/test_plan.py checks a deep model replayed whole), and the deep model's reserve
        # is its extended peak plus that.
        depths = (3, 4)
    trained = get_method(cfg.method.name).trained_layers(cfg.method)
    if trained is not None:
        # A method that trains or adapts the top N layers (freeze, llama_adapter): simulate
        # N+1 and N+2 layers, each added layer is a plain frozen one.
        if trained.anywhere:
            extend = False  # patterns may pick any layer: no uniform growth to rely on
        depths = (trained.top + 1, trained.top + 2)
    # Two short replays cost about as much as one of their summed depth (each op of a layer is
    # a dispatch through the fake mode, and the embedding, head, loss and update run in both),
    # so a model no deeper than that is replayed whole: as fast, and exact.
    if not extend or layers <= sum(depths):
        return _simulate_once(
            cfg, config, seq_len, device_type, precision, targets, False, layers, padded=padded
        )
    a, b = (
        _simulate_once(
            cfg,
            with_depth(config, d),
            seq_len,
            device_type,
            precision,
            targets,
            False,
            (d if streamed else layers) if d == depths[-1] else None,
            padded=padded,
        )
        for d in depths
    )
    extra = layers - depths[-1]
    step = depths[-1] - depths[0]

    def grow(x: int, y: int) -> int:
        return y + (y - x) * extra // step

    phases = [
        (grow(peak_a, peak_b), {k: grow(parts_a[k], parts_b[k]) for k in CATEGORIES})
        for (peak_a, parts_a), (peak_b, parts_b) in zip(a.phases, b.phases, strict=True)
    ]
    peak, breakdown = max(phases, key=lambda phase: phase[0])
    return Simulation(
        peak_bytes=peak,
        weights_bytes=grow(a.weights_bytes, b.weights_bytes),
        flops_per_step=grow(a.flops_per_step, b.flops_per_step),
        ops_per_step=grow(a.ops_per_step, b.ops_per_step),
        traffic_per_step=grow(a.traffic_per_step, b.traffic_per_step),
        quant_calls_per_step=grow(a.quant_calls_per_step, b.quant_calls_per_step),
        host_bytes=grow(a.host_bytes, b.host_bytes),
        streamed_bytes_per_step=grow(a.streamed_bytes_per_step, b.streamed_bytes_per_step),
        optimizer_bytes=grow(a.optimizer_bytes, b.optimizer_bytes),
        trainable_params=grow(a.trainable_params, b.trainable_params),
        total_params=grow(a.total_params, b.total_params),
        layers_simulated=depths,
        breakdown=breakdown,
        phases=phases,
        # replayed for the whole depth (plan/trace.py), or streamed: see `depths` above
        reserved_bytes=b.reserved_bytes
        if b.reserved_bytes is None or not streamed
        else peak + b.reserved_bytes - b.peak_bytes,
    )


def explain(
    cfg: Config, config: PretrainedConfig, seq_len: int, device_type: str, precision: str
) -> tuple[list[dict], int]:
    """The largest live tensors at the peak, with the op and module that made them; deep
    models are explained at 3 decoder layers (each layer repeats the same tensors)."""
    trained = get_method(cfg.method.name).trained_layers(cfg.method)  # the top N layers train
    layers = min(config.num_hidden_layers, 3 if trained is None else trained.top + 1)
    sim = _simulate_once(
        cfg, with_depth(config, layers), seq_len, device_type, precision, None, True,
        padded=not cfg.data.packing,
    )  # fmt: skip
    return sim.largest_at_peak, layers
