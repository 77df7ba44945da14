"""`snug ui`: its command-line options, and the refusals that come before gradio and the
planner load (no gradio or torch import here: `snug --help` builds its parser from this
module)."""

from __future__ import annotations

import argparse
import importlib.util
import os
from pathlib import Path

from snug.deploy.serve import listen, loopback
from snug.ui.safety import UiError, read_token


def add_ui_parser(sub: argparse._SubParsersAction) -> None:
    parser = sub.add_parser(
        "ui",
        help="plan (train, watch, chat, export: coming) in the browser; loopback unless a token",
        description="A web page over snug's commands: Plan shows every candidate the planner "
        "searches with its memory breakdown against the card, and writes the chosen one's "
        "config. It listens on 127.0.0.1 unless --host says otherwise, and then only behind "
        "the token of --token-file; it reads and writes files only under --root, and needs no "
        "network.",
    )
    parser.add_argument(
        "--host", default="127.0.0.1", help="address to listen on (default 127.0.0.1)"
    )
    parser.add_argument(
        "--port", type=int, default=7860, help="port (default 7860; 0: any free one)"
    )
    parser.add_argument(
        "--root",
        default=".",
        help="the folder the UI reads and writes in (models, configs/; default: here)",
    )
    parser.add_argument(
        "--token-file",
        help="file whose first line is the password the page asks for (any user name); "
        "required for a --host other than loopback",
    )
    parser.set_defaults(func=cmd_ui)


def cmd_ui(args: argparse.Namespace) -> int:
    token = read_token(args.token_file, args.host, loopback(args.host))
    root = Path(args.root)
    if not root.is_dir():
        raise UiError(f"--root {root}: no such folder.")
    if importlib.util.find_spec("gradio") is None:
        raise UiError("snug ui needs its extra: pip install 'snug[ui]'")
    sock = listen(args.host, args.port)  # a port in use is one line, before the imports
    from snug.runtime.hub import offline_said_on_stderr

    offline_said_on_stderr()  # as `snug plan` asks, before the planner's imports ask the hub
    from snug.ui.app import serve

    root = root.resolve()
    # the root is the UI's working directory, as the shell's is the command line's: the
    # defaults a written config resolves (data/train.jsonl, runs/...) land under it
    os.chdir(root)
    return serve(root, args.host, sock, token)
