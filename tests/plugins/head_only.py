"""A fine-tuning method that lives outside snug/ (tests/test_extending.py loads it as a plug-in
through $SNUG_PLUGINS): only the output head trains, and with `method.with_norm` the final norm
too; the head learns `method.head_lr_scale` times faster (its own optimizer groups). It uses nothing but snug's public registration API (docs/extending.md)."""

from __future__ import annotations

from dataclasses import dataclass

from snug.core.method import Method
from snug.core.registry import register
from snug.core.settings import NON_NEGATIVE, setting


@dataclass
class HeadOnlySettings:
    """Settings of head_only: the output head trains."""

    with_norm: bool = setting(False, "Also train the final norm before the head.")
    head_lr_scale: float = setting(
        1.0, "The head learns this many times faster than train.lr.", NON_NEGATIVE
    )


def apply_head_only(model, cfg):  # cfg: the method section (snug.core.sections.MethodConfig)
    own = METHOD.own(cfg)  # this method's own keys (their defaults when none are given)
    model.requires_grad_(False)
    model.get_output_embeddings().requires_grad_(True)
    if own.with_norm:
        model.get_decoder().norm.requires_grad_(True)
    return model


def head_groups(model, cfg, lr, weight_decay):
    """The optimizer's groups: the norm (with_norm) at train.lr first, as the log shows the
    first group's rate; the head at lr x head_lr_scale."""
    head = list(model.get_output_embeddings().parameters())
    rest = [p for p in model.parameters() if p.requires_grad and all(p is not h for h in head)]
    return [{"params": rest}, {"params": head, "lr": lr * METHOD.own(cfg).head_lr_scale}]


METHOD = Method(
    "head_only",
    apply_head_only,
    output="model",  # "adapter": output.dir/adapter/, "model": output.dir/model/
    mergeable=False,
    unmergeable_because="head_only already writes a whole model (model/), with nothing to fold in",
    settings=HeadOnlySettings,
    param_groups=head_groups,  # a hook: the core never reads head_lr_scale itself
)
register(METHOD)
