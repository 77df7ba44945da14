"""A fine-tuning method that lives outside snug/ (tests/test_extending.py loads it as a plug-in
through $SNUG_PLUGINS): only the output head trains, and with `method.with_norm` the final norm
too. It uses nothing but snug's public registration API (docs/extending.md)."""

from __future__ import annotations

from dataclasses import dataclass

from snug.core.method import Method
from snug.core.registry import register
from snug.core.settings import NON_NEGATIVE, setting


@dataclass
class HeadOnlySettings:
    """Settings of head_only: the output head trains."""

    with_norm: bool = setting(False, "Also train the final norm before the head.")
    head_lr_scale: float = setting(1.0, "Not used by training; a range-checked key.", NON_NEGATIVE)


def apply_head_only(model, cfg):
    own = METHOD.own(cfg)
    model.requires_grad_(False)
    model.get_output_embeddings().requires_grad_(True)
    if own.with_norm:
        model.get_decoder().norm.requires_grad_(True)
    return model


METHOD = Method(
    "head_only",
    apply_head_only,
    output="model",
    mergeable=False,
    unmergeable_because="head_only already writes a whole model (model/), with nothing to fold in",
    settings=HeadOnlySettings,
)
register(METHOD)
