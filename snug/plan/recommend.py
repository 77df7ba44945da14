"""The one candidate `snug plan --search` recommends, with its reasons: the best-quality method
that fits (each method declares its rank: Method.quality, from the methods benchmark), then
the fastest of its settings. search.py finds the candidates."""

from __future__ import annotations

from snug.core.registry import methods
from snug.plan.search import Candidate, method_label, speed_order
from snug.plan.simulate import PlanError


def quality_rank(label: str) -> int:
    """The recommendation's order among fitting candidates (each method declares its rank)."""
    for m in methods().values():
        if m.name == label:
            return m.quality
        for q_label, _, rank in m.quantized:
            if q_label == label:
                return rank
    raise PlanError(f"method {label!r} is not registered; choose one of {', '.join(methods())}.")


def recommend(cands: list[Candidate]) -> tuple[Candidate | None, str]:
    """One choice with its reasons: the best-quality method that fits (order from the methods
    benchmark), then the fastest of its settings; headroom is reported."""
    fitting = [c for c in cands if c.fits]
    if not fitting:
        return None, "nothing fits this device at this sequence length"
    choice = min(fitting, key=lambda c: (quality_rank(method_label(c.cfg)), speed_order(c)))
    reasons = [
        f"{method_label(choice.cfg)} ranks highest in quality among the methods that fit "
        "(held-out exact match, benchmarks/results/methods-2026-11-25.md)",
        f"its fastest fitting setting is micro-batch {choice.cfg.train.micro_batch} with "
        + (
            "gradient checkpointing"
            + (" and activation offload" if choice.cfg.memory.offload_activations else "")
            if choice.cfg.memory.grad_checkpointing
            else "no gradient checkpointing"
        )
        + f" and {choice.cfg.memory.optimizer}",
    ]
    if choice.cfg.memory.offload_weights:
        reasons.append(
            "its frozen weights stream from host memory (memory.offload_weights): no resident "
            "setting fits, and streaming is slower than any that would"
        )
    return choice, "; ".join(reasons)
