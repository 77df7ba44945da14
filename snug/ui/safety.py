"""What keeps `snug ui` safe: the token a non-loopback address needs, and the one check every
path the UI reads or writes goes through (inside --root, symlinks resolved).

No gradio or torch import here: `snug ui`'s refusals come before either loads."""

from __future__ import annotations

import hmac
from pathlib import Path

from snug.deploy.serve import read_secret
from snug.errors import UserError

TOKEN_MIN_CHARS = 8


class UiError(UserError):
    """The UI cannot start or cannot do what was asked (one line; at the start, exit 2)."""


class OutsideRoot(UiError):
    """A path the UI was asked to read or write resolves outside --root."""


def inside_root(root: Path, path: str | Path) -> Path:
    """`path` (relative to `root`, or absolute) resolved, symlinks and `..` included, when it
    lies inside `root`; else OutsideRoot. The one door for every path the UI touches."""
    base = Path(root).resolve()
    resolved = (base / Path(path).expanduser()).resolve()
    if resolved != base and base not in resolved.parents:
        raise OutsideRoot(
            f"{path}: outside --root {base} (resolved to {resolved}); the UI reads and writes "
            "only under its root."
        )
    return resolved


def read_token(token_file: str | None, host: str, is_loopback: bool) -> str | None:
    """The token from --token-file's first line; an address other than loopback without one
    is refused."""
    if token_file is None:
        if not is_loopback:
            raise UiError(
                f"--host {host} would let other machines in without a password; give "
                "--token-file (a file whose first line is the token), or listen on 127.0.0.1."
            )
        return None
    path = Path(token_file)
    token = read_secret("--token-file", path, UiError)
    if len(token) < TOKEN_MIN_CHARS:
        raise UiError(
            f"--token-file {path}: the token is shorter than {TOKEN_MIN_CHARS} characters; use "
            "a longer, random one."
        )
    return token


def token_check(token: str):
    """gradio's `auth`: any user name, the token as the password, compared in constant time."""
    want = token.encode("utf-8")

    def check(username: str, password: str) -> bool:
        return hmac.compare_digest(password.encode("utf-8"), want)

    return check
