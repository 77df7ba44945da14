"""pt: language modelling (continued pre-training) on plain text records ({"text": ...}), split
into data.cutoff_len pieces; loss on every token. Held out: the loss."""

from __future__ import annotations

from snug.core.registry import register_stage
from snug.stages.base import BaseStage


class PT(BaseStage):
    name = "pt"
    help = "language modelling on text"
    formats = ("text",)
    needs = "plain text records, {'text': ...}"

    def check(self, cfg, source):
        if cfg.data.format not in ("auto", "text"):
            from snug.errors import ConfigError

            raise ConfigError(f"{source}: train.stage=pt reads plain text; set data.format=text.")


register_stage(PT())
