"""Full fine-tuning: every weight trains."""

from torch import nn

from snug.config import MethodConfig
from snug.methods import Method, register


def apply_full(model: nn.Module, cfg: MethodConfig) -> nn.Module:
    model.requires_grad_(True)
    return model


register(
    Method(
        "full",
        apply_full,
        output="model",
        mergeable=False,
        unmergeable_because="a full fine-tune already writes a whole model (model/), with "
        "nothing to fold in",
    )
)
