"""Stand-ins the fake replay (plan/simulate.py) puts where bitsandbytes cannot run on fake
tensors: its 4-bit and LLM.int8 linear layers and its 8-bit optimizers, each allocating the
tensors and running the matmuls the real one does (tests/test_plan.py compares them with real
bitsandbytes steps), and the optimizer a replay builds."""

from __future__ import annotations

import bitsandbytes as bnb
import torch
from torch import nn

from snug.config import Config
from snug.models.load import upcast_norms
from snug.plan.tracker import PlanTracker
from snug.train.optim import build_optimizer


class EightBitStandIn(torch.optim.Optimizer):
    """bitsandbytes' 8-bit optimizers read device scalars and cannot run on fake tensors; this
    stands in with the same state tensors (uint8 moments with a 256-entry fp32 code book and one
    fp32 absmax per block of 256 for weights of at least 4,096 elements, fp32 moments below
    that, as bitsandbytes 0.50 allocates them; `tests/test_plan.py` compares) and updates in
    place as its fused kernel does. Paged optimizers put a moment in CUDA unified memory, outside
    what the caching allocator counts, only from 1e5 elements (`Optimizer.get_state_buffer`); the
    moments of smaller tensors and every block scale (absmax) stay ordinary device memory, so on
    CUDA those are allocated here and the paged moments are not."""

    MIN_8BIT_SIZE, BLOCK, MIN_PAGED_SIZE = 4096, 256, 100_000

    def __init__(self, params, lr: float, moments: int, paged: bool) -> None:
        super().__init__(params, {"lr": lr})
        self.moments, self.paged = moments, paged

    @torch.no_grad()
    def step(self, closure=None):
        for group in self.param_groups:
            for p in group["params"]:
                if p.grad is None:
                    continue
                state = self.state[p]
                paged = self.paged and p.numel() >= self.MIN_PAGED_SIZE
                if not state:
                    for i in range(1, self.moments + 1):
                        if p.numel() >= self.MIN_8BIT_SIZE:
                            if not paged:
                                state[f"state{i}"] = torch.zeros_like(p, dtype=torch.uint8)
                            state[f"qmap{i}"] = torch.zeros(256, dtype=torch.float32)
                            blocks = -(-p.numel() // self.BLOCK)
                            state[f"absmax{i}"] = torch.zeros(blocks, dtype=torch.float32)
                        else:
                            state[f"state{i}"] = torch.zeros_like(p, dtype=torch.float32)
                p.add_(p.grad, alpha=-group["lr"])


class _FourBitMatmul(torch.autograd.Function):
    """What bitsandbytes' MatMul4Bit allocates (0.50): forward, one fused gemm_4bit op whose
    output is all the tracker sees (on CUDA the op also dequantizes the weight into a temporary
    in the input's dtype); backward, the weight dequantized in the dtype it was quantized from,
    cast to the gradient's dtype, and the input's gradient. Nothing dequantized is saved. The
    fused op is not in torch's FLOP table, so its matmul's FLOPs are added to the tracker's."""

    @staticmethod
    def forward(ctx, x, weight, layer):
        ctx.layer = layer
        if layer.device_temporaries:  # the dequantized weight
            torch.empty((layer.in_features, layer.out_features), dtype=x.dtype)
        if layer.tracker is not None and layer.tracker.counting:
            rows = x.numel() // layer.in_features
            layer.tracker.flops += 2 * rows * layer.in_features * layer.out_features
            layer.tracker.quant_calls += 1
        return x.new_empty((*x.shape[:-1], layer.out_features))

    @staticmethod
    def backward(ctx, grad):
        layer = ctx.layer
        if not ctx.needs_input_grad[0]:
            return None, None, None
        if layer.tracker is not None and layer.tracker.counting:
            layer.tracker.quant_calls += 1
        shape = (layer.out_features, layer.in_features)
        weight = torch.empty(shape, dtype=layer.quant_dtype).to(grad.dtype)
        return torch.matmul(grad, weight), None, None


class FourBitStandIn(nn.Linear):
    """A bitsandbytes NF4 Linear4bit (double quantization) for the replay: the packed weight
    ((n + 1) // 2 bytes, one column; uint8, or under FSDP the compute dtype) and, on CUDA, the quantization state (uint8 absmax per 64 weights,
    fp32 absmax per 256 of those, the code books) that lives beside it. On CPU snug's tracker
    does not see the state (it is neither parameter nor buffer), so the replay leaves it out to
    predict what `snug train` measures there. A subclass of nn.Linear, so peft wraps it as the
    real one."""

    def __init__(
        self,
        linear: nn.Linear,
        quant_dtype: torch.dtype,
        device_type: str,
        storage: torch.dtype = torch.uint8,
    ) -> None:
        nn.Module.__init__(self)
        self.in_features, self.out_features = linear.in_features, linear.out_features
        n = self.in_features * self.out_features
        self.quant_dtype, self.device_temporaries = quant_dtype, device_type == "cuda"
        self.tracker: PlanTracker | None = None  # set by the replay, to add FLOPs to
        # The packed bytes, in bitsandbytes' quant storage dtype (models/load.py: quant_storage)
        packed = torch.empty(((n + 1) // (2 * storage.itemsize), 1), dtype=storage, device="meta")
        self.weight = nn.Parameter(packed, requires_grad=False)
        self.bias = linear.bias
        if device_type == "cuda":
            blocks = -(-n // 64)
            self.register_buffer("absmax", torch.empty(blocks, dtype=torch.uint8, device="meta"))
            nested = torch.empty(-(-blocks // 256), dtype=torch.float32, device="meta")
            self.register_buffer("absmax2", nested)
            self.register_buffer("code", torch.empty(16 + 256, dtype=torch.float32, device="meta"))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return _FourBitMatmul.apply(x, self.weight, self)


def _dequantized(layer: Int8StandIn, dtype: torch.dtype) -> torch.Tensor:
    """`state.CB.to(dtype, copy=True).mul_(state.SCB.unsqueeze(1).mul(1.0 / 127.0))`: the weight
    in `dtype` (out, in), and while it is made its row scales in fp32 (out, 1)."""
    return layer.weight.to(dtype, copy=True).mul_(layer.SCB.unsqueeze(1).mul(1.0 / 127.0))


class _Int8MatmulFp(torch.autograd.Function):
    """What bitsandbytes' MatMul8bitFp allocates (0.50, autograd/_functions.py; `bnb.matmul`
    trains with it on CPU): forward, the weight dequantized in the input's dtype
    (`_dequantized`) and `F.linear(A, CB, bias)`, whose FLOPs torch counts. The input is kept
    as `ctx.A = A`, an attribute rather than a saved tensor, so it lives as long as the graph:
    through checkpointing, and past backward until the step drops the micro-batch's loss.
    Backward: `_int8_input_grad`."""

    @staticmethod
    def forward(ctx, x, weight, bias, layer):
        ctx.layer, ctx.input = layer, x
        return nn.functional.linear(x, _dequantized(layer, x.dtype), bias)

    @staticmethod
    def backward(ctx, grad):
        return _int8_input_grad(ctx, grad)


class _Int8MatmulLt(torch.autograd.Function):
    """What bitsandbytes' MatMul8bitLt allocates on CUDA (0.50; `bnb.matmul` trains with it
    there, the kernels allocate as backends/cuda/ops.py and backends/default/ops.py say), for an
    input of `rows` x `k`, `n` outputs, threshold 6.0 and no outlier column. The input is kept
    as an attribute (`ctx.tensors = (CAt, subA, A)`), as in MatMul8bitFp. The int8 product is
    not in torch's FLOP table, so its FLOPs are added to the tracker's. Backward:
    `_int8_input_grad`. Not measured on a GPU yet (none was lent); an input width that is not a
    multiple of 4 would make `int8_linear_matmul` fall back to an fp32 product, left out here."""

    @staticmethod
    def forward(ctx, x, weight, bias, layer):
        ctx.layer, ctx.input = layer, x
        rows, k, n = x.numel() // layer.in_features, layer.in_features, layer.out_features
        # F.int8_vectorwise_quant(A.to(torch.float16), threshold): the half copy, then the
        # kernel's row_stats (SCA) and out_row (CA), which live to the end of forward, and its
        # outlier search `outliers = A.abs() >= threshold; if outliers.any(): ...`
        half = torch.empty((rows, k), dtype=torch.float16) if x.dtype != torch.float16 else x
        row_stats = torch.empty(rows, dtype=torch.float32)
        out_row = torch.empty((rows, k), dtype=torch.int8)
        magnitude = torch.empty((rows, k), dtype=torch.float16)  # A.abs()
        outliers = torch.empty((rows, k), dtype=torch.bool)
        del magnitude
        torch.empty((), dtype=torch.bool)  # outliers.any(): no column, so subA is empty
        del outliers, half
        # int8_mixed_scaled_mm -> int8_scaled_mm: the int32 product of int8_linear_matmul,
        # int8_mm_dequant's fp16 output, `out.to(dtype)` to the input's dtype
        product = torch.empty((rows, n), dtype=torch.int32)
        dequantized = torch.empty((*x.shape[:-1], n), dtype=torch.float16)
        out = dequantized.to(x.dtype)
        del product, dequantized, out_row, row_stats
        if layer.tracker is not None and layer.tracker.counting:
            layer.tracker.flops += 2 * rows * k * n
        return out

    @staticmethod
    def backward(ctx, grad):
        return _int8_input_grad(ctx, grad)


def _int8_input_grad(ctx, grad: torch.Tensor) -> tuple:
    """The backward both 8-bit matmuls share, for a frozen weight and bias (only the input's
    gradient): `grad_output.reshape(-1, n).contiguous()`, the weight dequantized anew in the
    input's dtype, `torch.matmul(grad_output.to(dtype_A), CB).view(A.shape)`."""
    if not ctx.needs_input_grad[0]:
        return None, None, None, None
    x = ctx.input
    grad = grad.reshape(-1, grad.shape[-1]).contiguous()
    weight = _dequantized(ctx.layer, x.dtype)
    return torch.matmul(grad.to(x.dtype), weight).view(x.shape), None, None, None


class Int8StandIn(bnb.nn.Linear8bitLt):
    """A bitsandbytes LLM.int8 Linear8bitLt (transformers' `load_in_8bit`: threshold 6.0, int8
    weights) for the replay: the int8 weight (out, in) and its fp32 row scales SCB (out,), here
    a buffer. On CUDA SCB is device memory; on CPU it is an attribute of the weight that snug's
    tracker first sees when the dequantization takes a view of it, in the layer's first
    forward, so by the peak it counts there too. Training, `bnb.matmul` runs MatMul8bitFp on
    CPU and MatMul8bitLt on CUDA: the stand-in runs the stand-in of its device's.

    The outlier decomposition depends on the activations' values, which a replay does not have:
    the stand-in assumes that no input column reaches the threshold, as in the random-weight
    models of the tests. In a real model, on CUDA, the few outlier columns add what the plan
    leaves out: the outlier inputs (rows x outliers, kept for backward), their weight columns
    dequantized, and for a moment a second output, as `output.addmm(subA, subB)` makes a new
    one (backends/default/ops.py). On CPU training never decomposes. A subclass of
    Linear8bitLt with the `state` and `index` peft reads, so that peft wraps it with its 8-bit
    LoRA layer as it wraps the real one."""

    def __init__(self, linear: nn.Linear, device_type: str) -> None:
        nn.Module.__init__(self)
        self.in_features, self.out_features = linear.in_features, linear.out_features
        self.state, self.index = bnb.MatmulLtState(), None
        self.state.threshold, self.state.has_fp16_weights = 6.0, False
        self.matmul = _Int8MatmulLt if device_type == "cuda" else _Int8MatmulFp
        self.tracker: PlanTracker | None = None  # set by the replay, to add FLOPs to
        weight = torch.empty((self.out_features, self.in_features), dtype=torch.int8, device="meta")
        self.weight = nn.Parameter(weight, requires_grad=False)
        self.bias = linear.bias
        self.register_buffer("SCB", torch.empty(self.out_features, device="meta"))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if self.bias is not None and self.bias.dtype != x.dtype:
            self.bias.data = self.bias.data.to(x.dtype)  # as Linear8bitLt.forward, for good
        return self.matmul.apply(x, self.weight, self.bias, self)


def _stand_in_quantized(
    model: nn.Module,
    quant: str,
    device_type: str,
    storage: torch.dtype = torch.uint8,
    precision: str = "bf16-mixed",
) -> None:
    """Swap the linears transformers would quantize (all but the output head) for stand-ins,
    and upcast norm weights to fp32 as models/load.py's k-bit preparation does."""
    head = model.get_output_embeddings()
    for module in list(model.modules()):
        for child_name, child in list(module.named_children()):
            if isinstance(child, nn.Linear) and child is not head:
                if quant == "4bit":
                    stand_in = FourBitStandIn(child, child.weight.dtype, device_type, storage)
                else:
                    stand_in = Int8StandIn(child, device_type)
                setattr(module, child_name, stand_in)
    if quant == "8bit":
        model.is_loaded_in_8bit = True  # as transformers marks it; peft reads it
    if precision != "bf16-true":  # as models/load.py: _prepare_kbit
        upcast_norms(model)


def _optimizer(model: torch.nn.Module, cfg: Config, device_type: str) -> torch.optim.Optimizer:
    name = cfg.memory.optimizer
    if name not in ("adamw8bit", "paged_adamw8bit", "lion8bit"):
        return build_optimizer(model, cfg.memory, cfg.train, cfg.method, device_type == "cuda")
    params = [p for p in model.parameters() if p.requires_grad]
    paged = name.startswith("paged") and device_type == "cuda"  # CPU bitsandbytes does not page
    return EightBitStandIn(params, cfg.train.lr, 1 if name == "lion8bit" else 2, paged)


def _state_tensors(optimizer: torch.optim.Optimizer) -> list[torch.Tensor]:
    return [v for s in optimizer.state.values() for v in s.values() if torch.is_tensor(v)]
