"""kto: KTO (Ethayarajh et al. 2024) on unpaired data: completions each labelled desirable or
not (a boolean `label`). A desirable answer is pushed above the reference point, an undesirable
one below it; the reference point is the KL between policy and reference, estimated (as in the
paper and TRL) from mismatched pairs in the micro-batch: each prompt with its neighbour's
completion (rows 0 and 1 swap, 2 and 3, ...; an odd last row takes the one before it; TRL rotates
the batch by one instead). So a micro-batch needs at least 2 rows. Under FSDP or DDP the KL
estimate is averaged over every rank's mismatched rows; neighbours pair within each rank's
share, so when every share is even, the ranks train as one process holding all their rows."""

from __future__ import annotations

from dataclasses import dataclass
from typing import Literal

from snug.core.registry import register_stage
from snug.core.settings import POSITIVE, setting
from snug.stages.pref_losses import KTOLoss
from snug.stages.preference import REFERENCE_HELP, PreferenceStage, sequence_logps


@dataclass
class KTOSettings:
    """Settings of train.stage=kto."""

    beta: float = setting(0.1, "Strength of the pull towards the reference.", POSITIVE)
    desirable_weight: float = setting(1.0, "Weight of the desirable answers' loss.", POSITIVE)
    undesirable_weight: float = setting(1.0, "Weight of the undesirable answers' loss.", POSITIVE)
    reference: Literal["auto", "adapter_off", "copy"] = setting("auto", REFERENCE_HELP)


class KTO(PreferenceStage):
    name = "kto"
    help = "KTO on unpaired completions labelled desirable or not"
    settings = KTOSettings
    paired = False
    needs = "labelled completions (a prompt, a completion and a boolean 'label')"
    min_rows = 2
    min_rows_because = "its KL estimate pairs each prompt with another row's completion"

    def collate(self, samples, pad_id):
        """The rows as labelled, then each prompt with its neighbour's completion (the KL
        rows); `desirable` (B,) says which answers are wanted."""
        import torch

        from snug.data.collate import collate

        if len(samples) < self.min_rows:  # the schedule and evaluation never make one
            raise ValueError(f"kto collates at least {self.min_rows} completions, not 1")
        rows = [{"input_ids": s["input_ids"], "labels": s["labels"]} for s in samples]
        for i, s in enumerate(samples):
            other = samples[_neighbour(i, len(samples))]
            p, q = s["prompt_len"], other["prompt_len"]
            answer = other["input_ids"][q:]
            rows.append({"input_ids": s["input_ids"][:p] + answer, "labels": [-100] * p + answer})
        batch = collate(rows, pad_id)
        batch["desirable"] = torch.tensor([s["desirable"] for s in samples])
        return batch

    def loss(self, model, batch, reference, chunked=True):
        import torch

        from snug.train.collectives import all_sum

        s = self._settings
        logps = sequence_logps(model, batch, chunked)
        ref = reference.logps(model, batch, chunked)
        half = logps.shape[0] // 2
        # the mean over the mismatched rows of every rank (no gradient: the paper's z_0)
        mismatched = torch.stack(
            [(logps[half:] - ref[half:]).detach().sum(), logps.new_tensor(half)]
        )
        summed, rows = all_sum(mismatched)
        kl = summed / rows
        loss = KTOLoss(s.beta, s.desirable_weight, s.undesirable_weight)
        losses, rewards = loss(logps[:half], ref[:half], kl, batch["desirable"])
        good = batch["desirable"].bool()
        # right when the implicit reward falls on the label's side of the reference point
        right = torch.where(good, rewards > s.beta * kl, rewards < s.beta * kl)
        metrics = {
            "kl": kl * half,
            "rewards": rewards.sum(),
            "pref_accuracy": right.float().sum(),
            "logps": logps[:half].detach().sum(),
        }
        return losses.sum(), torch.tensor(half, device=logps.device), metrics

    def fake_batch(self, rows, seq_len, targets):
        import torch

        batch = super().fake_batch(rows, seq_len, targets)
        batch["desirable"] = torch.ones(rows, dtype=torch.long)
        return batch


def _neighbour(i: int, n: int) -> int:
    """The row whose completion row i's prompt is paired with for the KL estimate."""
    j = i ^ 1
    return j if j < n else i - 1


register_stage(KTO())
