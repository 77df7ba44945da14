"""The HTTP side of `snug serve`: OpenAI's routes on Starlette, each request checked
(snug/deploy/wire.py), queued to the batcher (snug/deploy/engine.py) and answered whole or as
server-sent events. The app answers from its first second: 503 while the model loads."""

from __future__ import annotations

import asyncio
import contextlib
import hmac
import json
import logging
import time
from collections.abc import AsyncIterator
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any

from snug.deploy.reply import Reply
from snug.deploy.wire import (
    ApiError,
    Limits,
    Sampling,
    chat_messages,
    completion_prompts,
    new_id,
    sampling,
)
from snug.errors import UserError, first_line

if TYPE_CHECKING:
    from starlette.requests import Request

    from snug.deploy.engine import Engine, Job
    from snug.deploy.session import Session
    from snug.deploy.toolcalls import ToolFormat

log = logging.getLogger("snug.serve")


@dataclass
class Served:
    """What the app serves: filled in by the loader (`ready`), or the reason it failed."""

    limits: Limits
    api_key: str | None = None
    log_prompts: bool = False
    session: Session | None = None
    engine: Engine | None = None
    tools: ToolFormat | None = None
    marker: str = ""  # the chat template's end-of-turn text
    failed: str | None = None
    created: int = field(default_factory=lambda: int(time.time()))

    def ready(self, session: Session, engine: Engine) -> None:
        from snug.deploy.toolcalls import tool_format
        from snug.train.evaluate import end_of_turn

        self.marker = end_of_turn(session.tok, session.template)
        self.tools = tool_format(
            session.cfg.data.template if session.cfg else None, session.template
        )
        self.session, self.engine = session, engine

    def names(self) -> list[str]:
        from snug.deploy.session import BASE

        session = self.session
        return ([BASE] if session.base_reachable else []) + list(session.adapters)


def build_app(served: Served, on_startup=(), on_shutdown=()):
    """The Starlette app; `on_startup` callables run as it starts (the loader's thread)."""
    from starlette.applications import Starlette
    from starlette.exceptions import HTTPException
    from starlette.responses import JSONResponse
    from starlette.routing import Route

    @contextlib.asynccontextmanager
    async def lifespan(app):
        for call in on_startup:
            call()
        yield
        for call in on_shutdown:
            call()

    def refused(e: ApiError) -> JSONResponse:
        return JSONResponse(e.body(), status_code=e.status)

    async def on_api_error(request, e: ApiError):
        return refused(e)

    async def on_http(request, e: HTTPException):
        return refused(ApiError(e.status_code, f"{request.method} {request.url.path}: {e.detail}"))

    async def on_error(request, e: Exception):  # never a traceback: one line, as the CLI says it
        if isinstance(e, UserError):
            return refused(ApiError(400, " ".join(str(e).split())))
        log.exception("%s %s failed", request.method, request.url.path)
        return refused(ApiError(500, f"{e.__class__.__name__}: {first_line(e)} (unexpected)"))

    async def health(request: Request):
        if served.failed:
            return JSONResponse({"status": "failed", "error": served.failed}, status_code=503)
        if served.engine is None:
            return JSONResponse({"status": "loading"}, status_code=503)
        return JSONResponse({"status": "ok", **served.engine.status()})

    async def models(request: Request):
        check(served, request)
        data = [
            {"id": n, "object": "model", "created": served.created, "owned_by": "snug"}
            for n in served.names()
        ]
        return JSONResponse({"object": "list", "data": data})

    async def one_model(request: Request):
        check(served, request)
        name = pick(served, request.path_params["model"])
        return JSONResponse(
            {"id": name, "object": "model", "created": served.created, "owned_by": "snug"}
        )

    async def chat(request: Request):
        check(served, request)
        body = await read_json(request, served.limits)
        asked = sampling(body, served.limits)
        messages, tools = chat_messages(body, served.limits)
        model = pick(served, asked.model)
        ids = await asyncio.to_thread(prompt_ids, served, messages, tools)
        return await answer(request, served, asked, model, [ids], "chat", tools is not None)

    async def completions(request: Request):
        check(served, request)
        body = await read_json(request, served.limits)
        asked = sampling(body, served.limits)
        prompts = completion_prompts(body, served.limits)
        model = pick(served, asked.model)
        tok = served.session.tok
        ids = await asyncio.to_thread(lambda: [tok(p)["input_ids"] for p in prompts])
        return await answer(request, served, asked, model, ids, "text", False)

    return Starlette(
        routes=[
            Route("/health", health),
            Route("/v1/models", models),
            Route("/v1/models/{model:path}", one_model),
            Route("/v1/chat/completions", chat, methods=["POST"]),
            Route("/v1/completions", completions, methods=["POST"]),
        ],
        exception_handlers={ApiError: on_api_error, HTTPException: on_http, Exception: on_error},
        lifespan=lifespan,
    )


def check(served: Served, request: Request) -> None:
    """401 without the key (when the server has one), 503 while loading."""
    if served.api_key is not None:
        given = request.headers.get("authorization", "")
        scheme, _, token = given.partition(" ")
        ok = scheme.lower() == "bearer" and hmac.compare_digest(
            token.strip().encode(), served.api_key.encode()
        )
        if not ok:
            raise ApiError(401, "a valid API key is needed: send 'Authorization: Bearer KEY'.")
    if served.failed:
        raise ApiError(503, f"the model failed to load: {served.failed}")
    if served.engine is None:
        raise ApiError(
            503, "the model is still loading; try again shortly (GET /health says when)."
        )


async def read_json(request: Request, limits: Limits) -> dict[str, Any]:
    """The body as a JSON object: 413 past the size limit (read no further), 400 if not JSON."""
    declared = request.headers.get("content-length")
    too_big = ApiError(
        413,
        f"the request is larger than {limits.max_request_bytes:,} bytes "
        "(snug serve --max-request-bytes).",
    )
    if declared and declared.isdigit() and int(declared) > limits.max_request_bytes:
        raise too_big
    data = bytearray()
    async for piece in request.stream():
        data += piece
        if len(data) > limits.max_request_bytes:
            raise too_big
    try:
        body = json.loads(data)
    except (ValueError, RecursionError) as e:  # (too deep, or an integer of 4,300+ digits)
        raise ApiError(400, f"the request body is not JSON ({e}).") from None
    if not isinstance(body, dict):
        raise ApiError(400, "the request body must be a JSON object.")
    return body


def pick(served: Served, model: str) -> str:
    names = served.names()
    if model not in names:
        raise ApiError(
            404,
            f"The model '{model}' does not exist; this server serves: {', '.join(names)}.",
            "model",
            "model_not_found",
        )
    return model


def prompt_ids(served: Served, messages: list[dict], tools: list[dict] | None) -> list[int]:
    """The conversation rendered by the session's template, with the tools, which must show."""
    from snug.data.render import origin_of

    session = served.session
    ids = session.prompt_ids(messages, tools)
    if tools and ids == session.prompt_ids(messages):
        raise ApiError(
            400,
            f"the chat template ({origin_of(session.template)}) does not write tools; "
            "serve with a template that does (--template qwen, llama3 or mistral).",
            "tools",
        )
    return ids


async def answer(request, served, asked: Sampling, model, prompts, kind, tools: bool):
    """Queue one job per prompt, then answer whole or stream."""
    from starlette.responses import JSONResponse, Response, StreamingResponse

    from snug.deploy.engine import Job, QueueFull

    limits, context = served.limits, served.session.context()
    loop = asyncio.get_running_loop()
    events: asyncio.Queue = asyncio.Queue()
    jobs: list[Job] = []
    for index, ids in enumerate(prompts):
        room = limits.max_tokens if context is None else context - len(ids)
        wanted = asked.max_tokens or min(limits.max_tokens, room)
        if wanted > room or room < 1:
            raise ApiError(
                400,
                f"a {len(ids)}-token prompt and max_tokens {wanted} overflow the model's "
                f"{context}-token context; shorten the prompt or lower max_tokens.",
                "max_tokens",
            )
        jobs.append(
            Job(
                model=model,
                prompt=ids,
                max_tokens=wanted,
                # a whole answer is read at its end: no wake-up of the loop per token
                emit=(
                    lambda piece, i=index: loop.call_soon_threadsafe(events.put_nowait, (i, piece))
                )
                if asked.stream
                else _ignore,
                finish=lambda job, i=index: loop.call_soon_threadsafe(events.put_nowait, (i, None)),
                temperature=asked.temperature,
                top_p=asked.top_p,
                seed=asked.seed,
                stop=asked.stop,
                marker=served.marker if kind == "chat" else "",
                deadline=time.monotonic() + limits.timeout_s,
            )
        )
    try:
        for job in jobs:
            served.engine.submit(job)
    except QueueFull as e:
        for job in jobs:
            served.engine.cancel(job)
        raise ApiError(429, f"the server is busy: {e}") from None
    rid = new_id("chatcmpl" if kind == "chat" else "cmpl")
    started = time.monotonic()
    reply = Reply(served, asked, model, rid, kind, jobs, served.tools if tools else None)
    if asked.stream:
        return StreamingResponse(
            _guarded(reply.stream(events), served, jobs, started, request),
            media_type="text/event-stream",
            headers={"Cache-Control": "no-cache"},
        )
    try:
        while len(reply.ended) < len(jobs):
            try:
                index, piece = await asyncio.wait_for(events.get(), 0.5)
            except asyncio.TimeoutError:
                if await request.is_disconnected():
                    return Response(status_code=499)  # nobody reads it; _release freed the jobs
                if time.monotonic() > jobs[0].deadline:  # waiting, or in a step, past its limit
                    late = time.monotonic() - started  # (_release ends its jobs)
                    raise ApiError(504, f"the answer timed out (after {late:.0f} s).") from None
                continue
            if piece is None:
                reply.ended.add(index)
    finally:
        _release(served, jobs, started, messages_of(request))
    failed = next((j for j in jobs if j.finish_reason in ("error", "timeout")), None)
    if failed is not None:
        status, why = (
            (504, "timed out") if failed.finish_reason == "timeout" else (500, failed.error)
        )
        raise ApiError(status, f"the answer {why} (after {time.monotonic() - started:.0f} s).")
    return JSONResponse(reply.whole())


def _ignore(piece: str) -> None:
    pass


def messages_of(request) -> str:
    return f"{request.method} {request.url.path}"


def _release(served: Served, jobs: list, started: float, what: str) -> None:
    """Cancel what is still running (a client gone) and log the request: no prompts unless
    --log-prompts."""
    for job in jobs:
        if not job.done:
            served.engine.cancel(job)
    reasons = ",".join(str(j.finish_reason) for j in jobs)
    tokens = sum(len(j.tokens) for j in jobs)
    line = f"{what} model={jobs[0].model} prompt_tokens={sum(len(j.prompt) for j in jobs)} "
    line += f"completion_tokens={tokens} finish={reasons} {time.monotonic() - started:.2f}s"
    if served.log_prompts:
        tok = served.session.tok
        line += (
            f" prompts={[tok.decode(j.prompt) for j in jobs]!r} answers={[j.text for j in jobs]!r}"
        )
    log.info(line)


async def _guarded(
    events: AsyncIterator[str], served, jobs, started, request
) -> AsyncIterator[str]:
    """The stream; whatever ends it (the last event, the client gone) frees its jobs."""
    try:
        async for event in events:
            yield event
    finally:
        _release(served, jobs, started, messages_of(request))
