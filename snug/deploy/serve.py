"""`snug serve`: the base and its adapters behind OpenAI's API (GET /v1/models, POST
/v1/chat/completions and /v1/completions, GET /health), on Starlette and uvicorn (the
`snug[serve]` extra).

Safe by default: it binds 127.0.0.1; any other address needs an API key; no CORS unless
--cors-origin names origins; nothing a request names is fetched or opened; requests are
bounded in size, tokens and messages; prompts are not logged unless --log-prompts.

No torch import here: `snug --help` builds its parser from this module.
"""

from __future__ import annotations

import argparse
import importlib.util
import ipaddress
import logging
import socket
import sys
import threading
from pathlib import Path

from snug.deploy.args import add_session_arguments, at_least_1
from snug.errors import UserError, exit_code, first_line

log = logging.getLogger("snug.serve")


class ServeError(UserError):
    """The server cannot start as asked (one line, exit 2)."""


def add_serve_parser(sub: argparse._SubParsersAction) -> None:
    parser = sub.add_parser(
        "serve",
        help="serve the base and its adapters over OpenAI's API (loopback unless keyed)",
        description="Loads the base and each --adapter once and answers OpenAI-style requests "
        "for any of them ('model' names the adapter, or 'base'): GET /v1/models, POST "
        "/v1/chat/completions (streamed with stream=true; tools for templates that write "
        "them), POST /v1/completions, GET /health. Concurrent requests share batches, "
        "requests for different LoRA adapters included. It listens on 127.0.0.1 unless --host "
        "says otherwise, and then only with an API key.",
    )
    add_session_arguments(parser)
    parser.add_argument(
        "--host", default="127.0.0.1", help="address to listen on (default 127.0.0.1)"
    )
    parser.add_argument(
        "--port", type=int, default=8000, help="port (default 8000; 0: any free one)"
    )
    parser.add_argument("--api-key", help="key clients must send as 'Authorization: Bearer KEY'")
    parser.add_argument(
        "--api-key-file", help="file holding the key (its first line; keeps it out of `ps`)"
    )
    parser.add_argument(
        "--cors-origin",
        action="append",
        default=[],
        metavar="ORIGIN",
        help="a web origin allowed to call the API from a browser (repeat; default: none)",
    )
    parser.add_argument(
        "--max-batch", type=at_least_1, default=16, help="requests answered together (default 16)"
    )
    parser.add_argument(
        "--max-queue",
        type=at_least_1,
        default=64,
        help="requests that may wait; more are refused with 429 (default 64)",
    )
    parser.add_argument(
        "--max-tokens", type=at_least_1, default=2048, help="largest max_tokens (default 2048)"
    )
    parser.add_argument(
        "--max-messages",
        type=at_least_1,
        default=256,
        help="messages of a chat, prompts of a completion (default 256)",
    )
    parser.add_argument(
        "--max-request-bytes",
        type=at_least_1,
        default=1 << 20,
        help="largest request body; more is refused with 413 (default 1048576)",
    )
    parser.add_argument(
        "--timeout",
        type=float,
        default=600.0,
        help="seconds a request may take, waiting included (default 600)",
    )
    parser.add_argument(
        "--log-prompts", action="store_true", help="log prompts and answers (off: only counts)"
    )
    parser.add_argument(
        "--engine",
        choices=["snug", "vllm"],
        default="snug",
        help="snug (transformers and peft, any device) or vllm (a GPU, vLLM installed)",
    )
    parser.set_defaults(func=cmd_serve)


def loopback(host: str) -> bool:
    if host == "localhost":
        return True
    try:
        return ipaddress.ip_address(host).is_loopback
    except ValueError:
        return False


def read_secret(flag: str, path: Path, error: type[UserError]) -> str:
    """The first line of a key or token file, stripped (a file keeps it out of `ps`); `error`
    naming the file when it is missing or that line is empty."""
    if not path.is_file():
        raise error(f"{flag} {path}: no such file.")
    lines = path.read_text(encoding="utf-8", errors="replace").splitlines()
    secret = lines[0].strip() if lines else ""
    if not secret:
        raise error(f"{flag} {path}: the file's first line is empty.")
    return secret


def api_key(args: argparse.Namespace) -> str | None:
    """The key from --api-key or --api-key-file; a non-loopback --host without one is refused."""
    if args.api_key and args.api_key_file:
        raise ServeError("give --api-key or --api-key-file, not both.")
    key = args.api_key
    if args.api_key_file:
        key = read_secret("--api-key-file", Path(args.api_key_file), ServeError)
    if key is not None and len(key) < 8:
        raise ServeError("the API key is shorter than 8 characters; use a longer, random one.")
    if key is None and not loopback(args.host):
        raise ServeError(
            f"--host {args.host} would let other machines in without a key; give --api-key-file "
            "(or --api-key), or listen on 127.0.0.1."
        )
    return key


def cmd_serve(args: argparse.Namespace) -> int:
    if args.engine == "vllm" and importlib.util.find_spec("vllm") is None:
        raise ServeError("snug serve --engine vllm needs vLLM (a CUDA GPU): pip install vllm")
    if importlib.util.find_spec("uvicorn") is None or importlib.util.find_spec("starlette") is None:
        raise ServeError("snug serve needs its extra: pip install 'snug[serve]'")
    key = api_key(args)
    if not args.timeout > 0:
        raise ServeError(f"--timeout {args.timeout}: give a number of seconds above 0.")
    from snug.deploy.session import parse_adapters

    parse_adapters(args.adapter)  # a bad spec stops before the port is taken
    if args.engine == "vllm":
        from snug.deploy.vllm import serve_with_vllm

        return serve_with_vllm(args, key)
    sock = listen(args.host, args.port)
    return serve(args, key, sock)


def listen(host: str, port: int) -> socket.socket:
    """The bound socket (uvicorn takes it): a port in use is one line, before any loading."""
    family = socket.AF_INET6 if ":" in host else socket.AF_INET
    # IPPROTO_TCP named: asyncio sets TCP_NODELAY only on connections of a socket that says
    # so, and without it every answer waits ~40 ms for the client's delayed ACK
    sock = socket.socket(family, socket.SOCK_STREAM, socket.IPPROTO_TCP)
    sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
    try:
        sock.bind((host, port))
    except OSError as e:
        sock.close()
        raise ServeError(
            f"cannot listen on {host}:{port} ({e.strerror or e}); pass another --port."
        ) from None
    sock.listen(128)
    sock.setblocking(False)
    return sock


def serve(args: argparse.Namespace, key: str | None, sock: socket.socket) -> int:
    import uvicorn

    from snug.deploy.api import Served, build_app
    from snug.deploy.wire import Limits

    limits = Limits(
        args.max_request_bytes, args.max_tokens, args.max_messages, args.timeout, args.max_queue
    )
    served = Served(limits, key, args.log_prompts)
    failure: list[BaseException] = []
    server: uvicorn.Server

    def load() -> None:
        try:
            served.ready(*open_engine(args))
            where = sock.getsockname()
            print(
                f"snug serve: ready on http://{args.host}:{where[1]} with {', '.join(served.names())}",
                flush=True,
            )
        except BaseException as e:  # noqa: BLE001 (said below, and the server stops)
            failure.append(e)
            served.failed = " ".join(str(e).split()) if isinstance(e, UserError) else first_line(e)
            server.should_exit = True

    def start() -> None:
        threading.Thread(target=load, name="snug-serve-load", daemon=True).start()

    def stop() -> None:
        if served.engine is not None:
            served.engine.close()

    app = build_app(served, [start], [stop])
    if args.cors_origin:
        allow_origins(app, args.cors_origin)
    logging.getLogger("snug.serve").setLevel(logging.INFO)
    port = sock.getsockname()[1]
    print(
        f"snug serve: listening on http://{args.host}:{port} (loading the model; /health says "
        f"when it is ready){'' if key is None else '; clients must send the API key'}",
        flush=True,
    )
    config = uvicorn.Config(app, log_level="warning", access_log=False, timeout_graceful_shutdown=5)
    server = uvicorn.Server(config)
    server.run(sockets=[sock])
    if failure:
        e = failure[0]
        if isinstance(e, UserError):
            print(f"error: {' '.join(str(e).split())}", file=sys.stderr)
        else:
            print(f"error: {e.__class__.__name__}: {first_line(e)} (unexpected)", file=sys.stderr)
        return exit_code(e) if isinstance(e, Exception) else 1
    return 0


def allow_origins(app, origins: list[str]) -> None:
    """CORS for the web pages of `origins` alone, with any request header: OpenAI's clients
    send their own from a browser (openai-node's x-stainless-*), and a preflight naming one
    that is not allowed fails (ollama fixed the same: ollama#6910, #9237). No cookies."""
    from starlette.middleware.cors import CORSMiddleware

    app.add_middleware(
        CORSMiddleware, allow_origins=origins, allow_methods=["GET", "POST"], allow_headers=["*"]
    )


def open_engine(args: argparse.Namespace):
    """(session, engine): the base and adapters loaded, and the batcher over them."""
    from snug.deploy.args import open_from_args
    from snug.deploy.engine import Engine

    session = open_from_args(args)
    return session, Engine(session, args.max_batch, args.max_queue)
