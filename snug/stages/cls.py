"""cls: sequence classification. Records name a text and a class label (cls.text_column,
cls.label_column); the base loads as a sequence classifier with a new head over the classes of
data.train. Loss: cross-entropy per sample; the step also reports the share of its samples
classified right (metric `accuracy`). Held out: the loss and the accuracy."""

from __future__ import annotations

from dataclasses import dataclass
from typing import Literal

from snug.core.registry import register_stage
from snug.core.settings import setting
from snug.stages.base import BaseStage


@dataclass
class ClsSettings:
    """Settings of train.stage=cls."""

    text_column: str = setting("text", "The column holding the text to classify.")
    label_column: str = setting("label", "The column holding the class label.")
    head: Literal["linear", "mlp"] = setting(
        "linear",
        "The new classification head: linear, or mlp (a new fully connected layer and GELU "
        "before it).",
    )


class Classify(BaseStage):
    name = "cls"
    help = "sequence classification (labels from cls.label_column)"
    settings = ClsSettings
    section = "cls"
    classifier = True
    no_packing_because = "a classifier reads one pooled position per row"
    not_a_chat_model_because = "a classifier does not generate text"

    def check(self, cfg, source):
        from snug.core.registry import get_method
        from snug.errors import ConfigError

        why = get_method(cfg.method.name).no_classifier_because
        if why:
            raise ConfigError(f"{source}: method.name={cfg.method.name} cannot classify: {why}.")

    def labels(self, data, own):
        from snug.data.classify import class_labels

        return class_labels(data, own.label_column)

    def tokenize(self, source):
        from snug.data.classify import tokenize_classes_of

        return tokenize_classes_of(source, source.own.text_column, source.own.label_column)

    def model_class(self, labels, pad_id):
        from transformers import AutoModelForSequenceClassification

        return AutoModelForSequenceClassification, {
            "num_labels": len(labels),
            "id2label": dict(enumerate(labels)),
            "label2id": {name: i for i, name in enumerate(labels)},
            "pad_token_id": pad_id,
        }

    def after_load(self, model, cfg, labels, device):
        if self.own(cfg).head == "mlp":
            from torch import nn

            # Head plus a new fully connected layer; keeps the name `score` so peft trains it too.
            h, n = model.config.hidden_size, len(labels)
            model.score = nn.Sequential(nn.Linear(h, h), nn.GELU(), nn.Linear(h, n, bias=False)).to(
                device
            )

    def count(self, batch):
        from snug.train.loss import count_samples

        return count_samples(batch["labels"])

    def loss(self, model, batch, reference, chunked=True):
        import torch.nn.functional as F

        from snug.data.tokenize import IGNORE

        logits = model(
            input_ids=batch["input_ids"], attention_mask=batch.get("attention_mask")
        ).logits  # (B, n)
        labels = batch["labels"]
        total = F.cross_entropy(logits.float(), labels, ignore_index=IGNORE, reduction="sum")
        hits = (logits.detach().argmax(-1) == labels).sum().float()
        return total, None, {"accuracy": hits}

    def fake_batch(self, rows, seq_len, targets):
        import torch

        ids = torch.zeros((rows, seq_len), dtype=torch.long)
        return {"input_ids": ids, "labels": torch.zeros(rows, dtype=torch.long)}

    def evaluate(self, model, data, job, phase):
        from snug.train.evaluate import accuracy

        result = super().evaluate(model, data, job, phase)
        with phase("accuracy", len(data), "samples") as p:
            result["accuracy"] = accuracy(
                model, data, job.micro_batch, job.pad_id, job.device, p.advance
            )
        result["metric"] = "accuracy"
        return result


register_stage(Classify())
