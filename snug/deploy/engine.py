"""The batcher behind `snug serve`: requests wait in a bounded queue, a worker thread gathers
them into batches (requests for different LoRA adapters in one batch, through peft's
`adapter_names`) and runs transformers' `generate` on each, handing every request its tokens
as they come.

transformers and peft generate; what snug adds is the per-request part of a shared batch,
which neither library has: each row stops at its own `max_tokens`, stop strings, deadline or
cancellation (`_Rows`, a stopping criterion), and samples at its own temperature and top-p from
its own seeded generator (`_Rows` as a logits processor, which leaves greedy rows to
`generate`'s argmax), so that an answer does not depend on what else is in its batch.

A batch runs until its last row ends; requests that come meanwhile wait for the next one
(static batching: simpler than joining rows mid-flight, and enough for the load this serves).
"""

from __future__ import annotations

import collections
import contextlib
import logging
import secrets
import threading
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import TYPE_CHECKING

if TYPE_CHECKING:
    import torch

    from snug.deploy.session import Session

log = logging.getLogger("snug.serve")

BASE_ROW = "__base__"  # peft's name for a row of a mixed batch that uses no adapter
# Temperatures below this are greedy, as vLLM takes them: scores divided by a much smaller one
# overflow float32, and the NaN from one request failed every request of its batch.
GREEDY_BELOW = 1e-5


class QueueFull(Exception):
    """More requests wait than the queue holds (the server answers 429)."""


@dataclass(eq=False)  # a job is itself: found in the queue by identity, not by its fields
class Job:
    """One request's answer: what to generate, and where its text goes as it comes."""

    model: str  # the session's name for it: "base" or an adapter's name
    prompt: list[int]  # token ids
    max_tokens: int
    emit: Callable[
        [str], None
    ]  # each new piece of the answer's text (may be called from the worker)
    finish: Callable[[Job], None]  # called once, at the end (finish_reason / error set)
    temperature: float = 0.0
    top_p: float = 1.0
    seed: int | None = None
    stop: tuple[str, ...] = ()
    marker: str = ""  # the template's end-of-turn text: the answer ends before it
    deadline: float = float("inf")  # time.monotonic() by which it must be done
    tokens: list[int] = field(default_factory=list)
    text: str = ""  # the answer emitted so far
    finish_reason: str | None = None  # "stop", "length", "timeout", "cancelled"; or None: running
    error: str | None = None
    cancelled: threading.Event = field(default_factory=threading.Event)

    @property
    def done(self) -> bool:
        return self.finish_reason is not None


class Engine:
    """One worker thread generating for the queued jobs of a `Session`, `max_batch` at a time."""

    gather_s = 0.05  # the longest a batch waits for more requests once one has come

    def __init__(self, session: Session, max_batch: int = 16, max_queue: int = 64) -> None:
        from snug.train.evaluate import prompt_learning, stop_token_ids

        self.session = session
        self.max_batch = 1 if prompt_learning(session.model) else max_batch
        self.max_queue = max_queue
        self.mixable = _mixable(session)
        self.stops = stop_token_ids(session.model, session.tok, session.template)
        self.waiting: collections.deque[Job] = collections.deque()
        self.running: list[Job] = []
        self.in_flight = 1  # the most requests waiting or running at once since the last batch
        # requests ended each way, batches run and the rows they held (rows / batches: the
        # mean batch)
        self.counts = dict.fromkeys(("answered", "cancelled", "timed_out", "failed"), 0)
        self.counts |= {"batches": 0, "rows": 0}
        self._cond = threading.Condition()
        self._closed = False
        self._thread = threading.Thread(target=self._work, name="snug-serve-engine", daemon=True)
        self._thread.start()

    def submit(self, job: Job) -> None:
        """Queue `job`; QueueFull when `max_queue` jobs already wait."""
        with self._cond:
            self.waiting = collections.deque(j for j in self.waiting if not j.cancelled.is_set())
            if len(self.waiting) >= self.max_queue:
                raise QueueFull(f"{len(self.waiting)} requests wait already; try again shortly.")
            self.waiting.append(job)
            self.in_flight = max(self.in_flight, len(self.waiting) + len(self.running))
            self._cond.notify()

    def cancel(self, job: Job) -> None:
        """The client is gone, or its time is up: drop the job if it waits, stop its row if it
        runs."""
        job.cancelled.set()
        with self._cond:
            if job in self.waiting:
                self.waiting.remove(job)
                self._end(job, "timeout" if time.monotonic() > job.deadline else "cancelled")

    def close(self) -> None:
        with self._cond:
            self._closed = True
            self._cond.notify()
        self._thread.join(timeout=30)

    def status(self) -> dict[str, int]:
        with self._cond:
            return {"running": len(self.running), "waiting": len(self.waiting), **self.counts}

    def _take(self) -> list[Job]:
        """The next batch: the oldest job, and after it, in order, up to max_batch - 1 others
        that can share its batch (any adapter in a mixable session, else the same one). Jobs
        that waited past their deadline end here, timed out."""
        with self._cond:
            while not self._closed:
                if not self.waiting:
                    self._cond.wait()
                    continue
                # Clients answered together come back together: waiting up to gather_s for as
                # many requests as were in flight at once during the last batch keeps the next
                # one whole instead of starting it with the first to come back.
                until = time.monotonic() + self.gather_s
                enough = min(self.max_batch, self.in_flight)
                while 0 < len(self.waiting) < enough and time.monotonic() < until:
                    self._cond.wait(until - time.monotonic())
                now = time.monotonic()
                for job in [j for j in self.waiting if j.deadline < now]:
                    self.waiting.remove(job)
                    self._end(job, "timeout")
                if not self.waiting:  # cancelled or timed out meanwhile
                    continue
                first = self.waiting[0]
                batch = [j for j in self.waiting if self.mixable or j.model == first.model]
                batch = batch[: self.max_batch]
                for job in batch:
                    self.waiting.remove(job)
                self.running = batch
                self.in_flight = len(batch) + len(self.waiting)
                self.counts["rows"] += len(batch)
                return batch
            return []

    def _work(self) -> None:
        while batch := self._take():
            try:
                self._generate(batch)
            except Exception as e:  # noqa: BLE001 (a failed batch fails its requests, not the server)
                log.exception("a batch of %d failed", len(batch))
                for job in batch:
                    if not job.done:
                        job.error = (
                            f"{e.__class__.__name__}: {str(e).splitlines()[0] if str(e) else ''}"
                        )
                        self._end(job, "error")
            with self._cond:
                self.running = []
                self.counts["batches"] += 1

    def _end(self, job: Job, reason: str) -> None:
        job.finish_reason = reason
        key = {"cancelled": "cancelled", "timeout": "timed_out", "error": "failed"}.get(reason)
        with self._cond:  # (re-entrant) cancel() counts from the HTTP side's thread
            self.counts[key or "answered"] += 1
        job.finish(job)

    def _generate(self, batch: list[Job]) -> None:
        import torch

        from snug.deploy.session import BASE
        from snug.train.evaluate import prompt_learning

        session, tok = self.session, self.session.tok
        longest = max(len(j.prompt) for j in batch)
        ids = torch.full((len(batch), longest), tok.pad_token_id, dtype=torch.long)
        mask = torch.zeros_like(ids)
        for row, job in enumerate(batch):  # left padding: every row's answer starts at `longest`
            ids[row, longest - len(job.prompt) :] = torch.tensor(job.prompt)
            mask[row, longest - len(job.prompt) :] = 1
        rows = _Rows(batch, self.stops, tok, self._end)
        processors, criteria = rows.hooks()
        kwargs = {}
        if self.mixable and session.adapters:  # a PeftModel (see _mixable)
            kwargs["adapter_names"] = [BASE_ROW if j.model == BASE else j.model for j in batch]
        else:
            session.use(batch[0].model)
        alone = prompt_learning(session.model)
        scope = contextlib.nullcontext() if self.mixable else session.scope()
        with torch.no_grad(), scope:
            session.model.generate(
                input_ids=ids.to(session.device),
                attention_mask=mask.to(session.device),
                max_new_tokens=max(j.max_tokens for j in batch),
                do_sample=False,  # greedy rows take the argmax; sampled rows are drawn in _Rows
                logits_processor=processors,
                stopping_criteria=criteria,
                use_cache=not alone,
                eos_token_id=self.stops,
                pad_token_id=tok.pad_token_id,
                **kwargs,
            )
        for job in batch:  # generate stopped at the longest max_tokens; nothing is left open
            if not job.done:
                rows.close(job, "length")


def _mixable(session: Session) -> bool:
    """Whether requests for different adapters can share a batch: peft's mixed-adapter batches
    take LoRA adapters without DoRA (peft refuses the rest)."""
    from peft import PeftModel, PeftType

    model = session.model
    if not isinstance(model, PeftModel):
        return not session.adapters  # the base alone; snug's own adapter formats: one model
    return all(
        c.peft_type == PeftType.LORA and not getattr(c, "use_dora", False)
        for c in model.peft_config.values()
    )


class _Rows:
    """The per-row part of a shared `generate`: `sample` (a logits processor) draws each sampled
    row's token from that row's own generator at its temperature and top-p and leaves greedy rows
    to generate's argmax; `stopped` (a stopping criterion) hands each row its new token and ends
    the rows that are done."""

    def __init__(self, batch: list[Job], stops: list[int], tok, end: Callable[[Job, str], None]):
        import torch

        self.batch, self.stops, self.tok, self.end = batch, set(stops), tok, end
        self.generators: list[torch.Generator | None] = [None] * len(batch)
        for row, job in enumerate(batch):
            if job.temperature >= GREEDY_BELOW:
                seed = job.seed if job.seed is not None else secrets.randbits(63)
                self.generators[row] = torch.Generator().manual_seed(seed)

    def hooks(self) -> tuple[list, list]:
        """(logits processors, stopping criteria) for generate."""
        from transformers import LogitsProcessor, StoppingCriteria

        rows = self

        class Sample(LogitsProcessor):
            def __call__(self, input_ids, scores):
                return rows.sample(scores)

        class Stopped(StoppingCriteria):
            def __call__(self, input_ids, scores, **kwargs):
                return rows.stopped(input_ids)

        return [Sample()], [Stopped()]

    def sample(self, scores: torch.Tensor) -> torch.Tensor:
        """(B, V) fp32 scores -> the same, each sampled row's drawn token the only one left."""
        import torch

        for row, gen in enumerate(self.generators):
            job = self.batch[row]
            if gen is None or job.done:
                continue
            probs = torch.softmax(scores[row].float().cpu() / job.temperature, dim=-1)
            if job.top_p < 1:
                ordered, order = probs.sort(descending=True)
                keep = ordered.cumsum(0) - ordered < job.top_p  # the smallest set reaching top_p
                probs = torch.zeros_like(probs).scatter(0, order[keep], ordered[keep])
            token = int(torch.multinomial(probs, 1, generator=gen))
            scores[row] = float("-inf")
            scores[row, token] = 0.0
        return scores

    def stopped(self, input_ids: torch.Tensor) -> torch.Tensor:
        """(B, T) ids so far -> (B,) bool: the rows that are done."""
        import torch

        done = torch.zeros(len(self.batch), dtype=torch.bool, device=input_ids.device)
        now = time.monotonic()
        for row, job in enumerate(self.batch):
            if job.done:
                done[row] = True
                continue
            job.tokens.append(int(input_ids[row, -1]))
            if now > job.deadline:
                reason = "timeout"
            elif job.cancelled.is_set():
                reason = "cancelled"
            elif job.tokens[-1] in self.stops:
                reason = "stop"
            else:
                reason = self._advance(job)
                if reason is None and len(job.tokens) >= job.max_tokens:
                    reason = "length"
            if reason:
                self.close(job, reason)
                done[row] = True
        return done

    def _advance(self, job: Job) -> str | None:
        """Decode the answer so far and emit what can no longer change; "stop" when it reached
        a stop string or the end-of-turn marker written as text."""
        text, ended = answer(self.tok, job.tokens, job.marker, job.stop)
        if ended:
            return "stop"
        sure = text[: len(text) - _held(text, (*job.stop, job.marker.strip()))]
        if len(sure) > len(job.text) and sure.startswith(job.text):
            job.emit(sure[len(job.text) :])
            job.text = sure
        return None

    def close(self, job: Job, reason: str) -> None:
        """End `job`: the rest of its answer goes out, then its finish."""
        if reason in ("stop", "length"):
            text, _ = answer(self.tok, job.tokens, job.marker, job.stop)
            if text.startswith(job.text) and len(text) > len(job.text):
                job.emit(text[len(job.text) :])
            elif not text.startswith(job.text):  # a decode that changed what was sent (rare)
                log.warning("a streamed answer's text changed after it was sent")
            job.text = text
        self.end(job, reason)


def answer(tok, tokens: list[int], marker: str, stop: tuple[str, ...]) -> tuple[str, bool]:
    """(the answer's text as `snug generate` writes it, cut at the first stop string; whether
    it ended there or at the template's end-of-turn marker written as text)."""
    from snug.train.evaluate import answer_text

    text = answer_text(tok, tokens, marker)
    ended = bool(marker.strip()) and marker.strip() in tok.decode(tokens, skip_special_tokens=True)
    cut = min((text.index(s) for s in stop if s in text), default=None)
    if cut is not None:
        return text[:cut], True
    return text, ended


def _held(text: str, stops: tuple[str, ...]) -> int:
    """How many characters at the end of `text` may still change: a replacement character of
    a byte sequence not yet whole, or the start of a stop string."""
    held = len(text) - len(text.rstrip("\ufffd"))
    for s in stops:
        for n in range(min(len(s) - 1, len(text)), 0, -1):
            if text.endswith(s[:n]):
                held = max(held, n)
                break
    return held
