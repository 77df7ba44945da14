"""sft: supervised fine-tuning on conversations (alpaca, sharegpt, messages records rendered by
the chat template); loss on the answers (all tokens with data.train_on_prompt). Held out: the
loss, and exact match of answers by greedy generation (train.eval_generate)."""

from __future__ import annotations

from snug.core.registry import register_stage
from snug.stages.base import BaseStage


class SFT(BaseStage):
    name = "sft"
    help = "supervised fine-tuning on chat data"
    formats = ("alpaca", "sharegpt", "messages")
    needs = (
        "conversations (alpaca, sharegpt or messages records); for plain text use train.stage=pt"
    )

    def check(self, cfg, source):
        if cfg.data.format == "text":
            from snug.errors import ConfigError

            raise ConfigError(
                f"{source}: data.format=text is for train.stage=pt; sft needs conversations."
            )

    def evaluate(self, model, data, job, phase):
        from snug.data.templates import resolve_template
        from snug.train.evaluate import exact_match

        result = super().evaluate(model, data, job, phase)
        t = job.cfg.train
        if t.eval_generate > 0:
            template = resolve_template(job.tok, job.cfg.data.template, job.cfg.model.name_or_path)
            with phase("answers by generation", min(t.eval_generate, len(data)), "samples") as p:
                score, samples = exact_match(
                    model,
                    job.tok,
                    template,
                    data,
                    t.eval_generate,
                    t.max_new_tokens,
                    job.device,
                    p.advance,
                )
            result.update(exact_match=score, samples=samples[:5], metric="exact_match")
        return result


register_stage(SFT())
