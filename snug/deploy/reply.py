"""One `snug serve` request's answer in OpenAI's shapes: a whole chat or text completion, or
its server-sent events as the engine hands the text over, tool calls read back where asked."""

from __future__ import annotations

import asyncio
import json
import time
from collections.abc import AsyncIterator
from typing import Any

from snug.deploy.wire import ApiError, chunk, usage


class Reply:
    """One request's answer, whole or as chunks, with tool calls read back where asked."""

    def __init__(self, served, asked, model, rid, kind, jobs, tools):
        self.served, self.asked, self.model, self.rid = served, asked, model, rid
        self.kind, self.jobs, self.tools = kind, jobs, tools
        self.ended: set[int] = set()

    def _choice(self, i: int, job) -> dict[str, Any]:
        reason = "length" if job.finish_reason == "length" else "stop"
        if self.kind == "text":
            return {"index": i, "text": job.text, "finish_reason": reason, "logprobs": None}
        content, calls = self.tools.parse(job.text) if self.tools else (job.text, [])
        message: dict[str, Any] = {
            "role": "assistant",
            "content": content or (None if calls else ""),
        }
        if calls:
            message["tool_calls"] = calls
            reason = "tool_calls"
        return {"index": i, "message": message, "finish_reason": reason, "logprobs": None}

    def whole(self) -> dict[str, Any]:
        kind = "chat.completion" if self.kind == "chat" else "text_completion"
        choices = [self._choice(i, j) for i, j in enumerate(self.jobs)]
        tokens = usage(sum(len(j.prompt) for j in self.jobs), sum(len(j.tokens) for j in self.jobs))
        return chunk(self.rid, kind, self.model, choices, usage=tokens)

    def _event(self, choices: list[dict], **extra) -> str:
        kind = "chat.completion.chunk" if self.kind == "chat" else "text_completion"
        return f"data: {json.dumps(chunk(self.rid, kind, self.model, choices, **extra))}\n\n"

    def _delta(self, i: int, text: str) -> dict[str, Any]:
        if self.kind == "text":
            return {"index": i, "text": text, "finish_reason": None, "logprobs": None}
        return {"index": i, "delta": {"content": text}, "finish_reason": None, "logprobs": None}

    async def stream(self, events: asyncio.Queue) -> AsyncIterator[str]:
        if self.kind == "chat":
            for i in range(len(self.jobs)):
                first = {
                    "index": i,
                    "delta": {"role": "assistant", "content": ""},
                    "finish_reason": None,
                }
                yield self._event([first])
        raw = [""] * len(self.jobs)  # each answer's text as it came
        texts = [""] * len(self.jobs)  # what of it has been streamed (a tool call is held back)
        while len(self.ended) < len(self.jobs):
            try:
                index, piece = await asyncio.wait_for(events.get(), 0.5)
            except asyncio.TimeoutError:
                if time.monotonic() > self.jobs[0].deadline:  # waiting, or in a step, too long
                    yield f"data: {json.dumps(ApiError(504, 'the answer timed out.').body())}\n\n"
                    return  # (_guarded ends its jobs)
                continue
            job = self.jobs[index]
            if piece is not None:
                raw[index] += piece
                upto = self.tools.held(raw[index]) if self.tools else len(raw[index])
                if upto > len(texts[index]):
                    yield self._event([self._delta(index, raw[index][len(texts[index]) : upto])])
                    texts[index] = raw[index][:upto]
                continue
            self.ended.add(index)
            if job.finish_reason in ("error", "timeout"):
                why = "timed out" if job.finish_reason == "timeout" else job.error
                error = ApiError(
                    504 if job.finish_reason == "timeout" else 500, f"the answer {why}."
                )
                yield f"data: {json.dumps(error.body())}\n\n"
                return
            final = self._choice(index, job)
            if self.kind == "chat":
                calls = final["message"].get("tool_calls")
                rest = final["message"]["content"] or ""
                delta: dict[str, Any] = {}
                if len(rest) > len(texts[index]):
                    delta["content"] = rest[len(texts[index]) :]
                if calls:
                    delta["tool_calls"] = [{"index": k, **c} for k, c in enumerate(calls)]
                final = {"index": index, "delta": delta, "finish_reason": final["finish_reason"]}
            elif len(job.text) > len(texts[index]):
                final["text"] = job.text[len(texts[index]) :]
            else:
                final["text"] = ""
            yield self._event([final])
        if self.asked.include_usage:
            tokens = usage(
                sum(len(j.prompt) for j in self.jobs), sum(len(j.tokens) for j in self.jobs)
            )
            yield self._event([], usage=tokens)
        yield "data: [DONE]\n\n"
