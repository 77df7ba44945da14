"""What an OpenAI-style request to `snug serve` says, checked field by field, and the shapes of
its answers. Every refusal is an `ApiError` with the status and one sentence naming the field;
nothing here fetches a URL or opens a file a request names (media parts are refused)."""

from __future__ import annotations

import time
import uuid
from dataclasses import dataclass
from typing import Any

from snug.errors import UserError


class ApiError(Exception):
    """A request refused: HTTP `status` and an OpenAI-style error body."""

    TYPES = {
        400: "invalid_request_error",
        401: "authentication_error",
        404: "invalid_request_error",
        413: "invalid_request_error",
        429: "rate_limit_error",
        500: "server_error",
        503: "server_error",
        504: "server_error",
    }

    def __init__(
        self, status: int, message: str, param: str | None = None, code: str | None = None
    ):
        super().__init__(message)
        self.status, self.message, self.param, self.code = status, message, param, code

    def body(self) -> dict[str, Any]:
        kind = self.TYPES.get(self.status, "invalid_request_error")
        return {
            "error": {"message": self.message, "type": kind, "param": self.param, "code": self.code}
        }


@dataclass(frozen=True)
class Limits:
    """What one request may ask (the `snug serve` flags of the same names)."""

    max_request_bytes: int = 1 << 20  # a request's body
    max_tokens: int = 2048  # a request's max_tokens
    max_messages: int = 256  # messages of a chat, prompts of a completion
    timeout_s: float = 600.0  # from arrival to the last token, waiting included
    max_queue: int = (
        64  # requests that may wait (the engine's bound; a request of more prompts is refused)
    )


@dataclass
class Sampling:
    """The fields of a request that say how to answer."""

    model: str
    max_tokens: int | None
    temperature: float
    top_p: float
    seed: int | None
    stop: tuple[str, ...]
    stream: bool
    include_usage: bool


# The longest stop string: each is looked for at the end of every new token's text, in the
# thread every request of a batch shares
MAX_STOP = 256

# Fields of OpenAI's API that snug serve does not implement: refused when set to anything but
# their neutral value, rather than silently ignored.
_NEUTRAL = {
    "n": (None, 1),
    "logprobs": (None, False),
    "top_logprobs": (None, 0),
    "echo": (None, False),
    "best_of": (None, 1),
    "frequency_penalty": (None, 0, 0.0),
    "presence_penalty": (None, 0, 0.0),
    "logit_bias": (None, {}),
    "suffix": (None, ""),
    "response_format": (None, {"type": "text"}),
}


def _number(body: dict, key: str, default: float, low: float, high: float, low_open=False) -> float:
    value = body.get(key)
    if value is None:
        return default
    if isinstance(value, bool) or not isinstance(value, (int, float)):
        raise ApiError(400, f"'{key}' must be a number.", key)
    if value > high or value < low or (low_open and value == low):
        side = "above" if low_open else "from"
        raise ApiError(400, f"'{key}' must be {side} {low:g} to {high:g}; got {value}.", key)
    return float(value)


def sampling(body: dict, limits: Limits) -> Sampling:
    """The common fields of /v1/chat/completions and /v1/completions, checked."""
    for key, neutral in _NEUTRAL.items():
        if body.get(key, None) not in neutral:
            raise ApiError(400, f"'{key}' is not supported by snug serve; leave it out.", key)
    model = body.get("model")
    if not isinstance(model, str) or not model:
        raise ApiError(
            400, "'model' must name a served model (GET /v1/models lists them).", "model"
        )
    key = "max_completion_tokens" if body.get("max_completion_tokens") is not None else "max_tokens"
    max_tokens = body.get(key)
    if max_tokens is not None and (
        isinstance(max_tokens, bool) or not isinstance(max_tokens, int) or max_tokens < 1
    ):
        raise ApiError(400, f"'{key}' must be a whole number of at least 1.", key)
    if max_tokens is not None and max_tokens > limits.max_tokens:
        raise ApiError(
            400,
            f"'{key}' is {max_tokens}; this server answers at most {limits.max_tokens} "
            "tokens (snug serve --max-tokens).",
            key,
        )
    seed = body.get("seed")
    # torch's generators take 64-bit seeds; a larger one failed its whole batch
    if seed is not None and (
        isinstance(seed, bool) or not isinstance(seed, int) or not -(2**63) <= seed < 2**64
    ):
        raise ApiError(400, "'seed' must be a whole number that fits in 64 bits.", "seed")
    stop = body.get("stop")
    stop = [stop] if isinstance(stop, str) else (stop or [])
    if (
        not isinstance(stop, list)
        or len(stop) > 4
        or not all(isinstance(s, str) and 0 < len(s) <= MAX_STOP for s in stop)
    ):
        raise ApiError(
            400,
            f"'stop' must be a string or a list of up to 4 strings of 1 to {MAX_STOP} characters.",
            "stop",
        )
    stream = body.get("stream") or False
    if not isinstance(stream, bool):
        raise ApiError(400, "'stream' must be true or false.", "stream")
    options = body.get("stream_options") or {}
    if not isinstance(options, dict):
        raise ApiError(400, "'stream_options' must be an object.", "stream_options")
    return Sampling(
        model=model,
        max_tokens=max_tokens,
        temperature=_number(body, "temperature", 1.0, 0.0, 2.0),
        top_p=_number(body, "top_p", 1.0, 0.0, 1.0, low_open=True),
        seed=seed,
        stop=tuple(stop),
        stream=stream,
        include_usage=bool(options.get("include_usage")),
    )


# Part types a request may not carry: snug serves text, and fetches nothing a request names
# (LLaMA-Factory's API fetched media URLs: CVE-2025-61784).
_MEDIA = ("image_url", "input_image", "image", "input_audio", "audio", "video_url", "video", "file")


def chat_messages(body: dict, limits: Limits) -> tuple[list[dict], list[dict] | None]:
    """(the conversation as snug's templates take it, the tools or None)."""
    from snug.data.formats import to_canonical

    messages = body.get("messages")
    if not isinstance(messages, list) or not messages:
        raise ApiError(400, "'messages' must be a non-empty list.", "messages")
    if len(messages) > limits.max_messages:
        raise ApiError(
            400,
            f"'messages' holds {len(messages)} messages; this server takes at most "
            f"{limits.max_messages} (snug serve --max-messages).",
            "messages",
        )
    for i, m in enumerate(messages):
        parts = m.get("content") if isinstance(m, dict) else None
        for part in parts if isinstance(parts, list) else []:
            if isinstance(part, dict) and part.get("type") in _MEDIA:
                raise ApiError(
                    400,
                    f"messages[{i}] holds a '{part['type']}' part; snug serves text only "
                    "and fetches nothing a request names.",
                    "messages",
                )
        if isinstance(m, dict) and m.get("role") == "developer":  # OpenAI's newer name
            messages[i] = {**m, "role": "system"}
    tools, choice = body.get("tools"), body.get("tool_choice", "auto")
    if choice not in ("auto", "none", None):
        raise ApiError(400, "'tool_choice' may be 'auto' or 'none' in snug serve.", "tool_choice")
    if tools is not None and not isinstance(tools, list):
        raise ApiError(400, "'tools' must be a list of function specs.", "tools")
    placeholder = {"role": "assistant", "content": "-"}  # the converter checks whole turns
    try:
        canon = to_canonical(
            {"messages": [*messages, placeholder], "tools": tools or None}, "messages", "request"
        )
    except UserError as e:
        raise ApiError(400, str(e).replace("field 'messages' ", "messages "), "messages") from None
    return canon["messages"][:-1], (canon.get("tools") if choice != "none" else None)


def completion_prompts(body: dict, limits: Limits) -> list[str]:
    prompt = body.get("prompt")
    prompts = [prompt] if isinstance(prompt, str) else prompt
    if not isinstance(prompts, list) or not prompts or not all(isinstance(p, str) for p in prompts):
        raise ApiError(400, "'prompt' must be a string or a list of strings.", "prompt")
    if len(prompts) > limits.max_messages:
        raise ApiError(
            400, f"'prompt' holds {len(prompts)} prompts; at most {limits.max_messages}.", "prompt"
        )
    if len(prompts) > limits.max_queue:
        raise ApiError(
            400,
            f"'prompt' holds {len(prompts)} prompts; the queue holds {limits.max_queue} "
            "(snug serve --max-queue).",
            "prompt",
        )
    return prompts


def new_id(prefix: str) -> str:
    return f"{prefix}-{uuid.uuid4().hex[:24]}"


def usage(prompt: int, completion: int) -> dict[str, int]:
    return {
        "prompt_tokens": prompt,
        "completion_tokens": completion,
        "total_tokens": prompt + completion,
    }


def chunk(rid: str, kind: str, model: str, choices: list[dict], **extra) -> dict[str, Any]:
    return {
        "id": rid,
        "object": kind,
        "created": int(time.time()),
        "model": model,
        "choices": choices,
        **extra,
    }
