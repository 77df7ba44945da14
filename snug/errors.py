"""The errors a user sees as one sentence, and helpers to word them.

Every "your input is wrong" error derives from `UserError`: the command line shows its message
alone (no traceback) and exits 2. This module imports nothing heavy, so that the command line
can tell such errors apart before torch is loaded.
"""

from __future__ import annotations

EXIT_USER_ERROR = 2  # bad input: config, data, model, checkpoint, output directory
EXIT_RUN_ERROR = 1  # a run that started and then stopped for a reason it states


class UserError(ValueError):
    """Bad input, worded as one sentence that names the file, key or line and what to do."""


class ConfigError(UserError):
    """A config problem, worded as one sentence that names the file, line and key (raised by
    snug.config, and by the stages' and methods' own checks)."""


class RunError(RuntimeError):
    """A run that started stopped for a reason it states in one sentence (exit 1): a step that
    went NaN, memory that ran out at one row, a checkpoint that could not be written."""


class AlreadySaid(Exception):
    """This process stops with `code`, and another process of the same run has printed why
    (torchrun ranks: one of them speaks)."""

    def __init__(self, code: int) -> None:
        super().__init__(f"exit {code}")
        self.code = code


def exit_code(e: BaseException) -> int:
    """The exit status a command ends with for `e`."""
    if isinstance(e, AlreadySaid):
        return e.code
    if isinstance(e, KeyboardInterrupt):
        return 130
    return EXIT_USER_ERROR if isinstance(e, UserError) else EXIT_RUN_ERROR


def first_line(e: BaseException) -> str:
    """The first line of an exception's message (library messages run long), or its type."""
    text = str(e).strip()
    return text.splitlines()[0] if text else e.__class__.__name__


def decode_error_line(data: bytes, e: UnicodeDecodeError) -> str:
    """'line N, column M' of the byte `e` failed on, for a message naming where a file is not
    UTF-8."""
    before = data[: e.start]
    line = before.count(b"\n") + 1
    column = e.start - (before.rfind(b"\n") + 1) + 1
    return f"line {line}, column {column} (byte 0x{data[e.start]:02x})"


def read_utf8(path, what: str, error: type[UserError], limit: int | None = None) -> str:
    """The text of `path`, or `error` naming the file and the line where it is not UTF-8 (or why
    it cannot be read); with a `limit`, also a file of more bytes than that (read no further,
    so neither a huge file nor an endless one, such as a pipe, is held)."""
    from pathlib import Path

    path = Path(path)
    try:
        with open(path, "rb") as f:
            data = f.read() if limit is None else f.read(limit + 1)
    except IsADirectoryError:
        raise error(f"{path}: is a directory, not {what}.") from None
    except OSError as e:
        raise error(f"{path}: cannot read {what} ({e.strerror}).") from None
    if limit is not None and len(data) > limit:
        raise error(
            f"{path}: more than {limit:,} bytes, too large for {what}; is it the right file?"
        )
    try:
        return data.decode("utf-8")
    except UnicodeDecodeError as e:
        raise error(
            f"{path} {decode_error_line(data, e)}: not UTF-8 text; save {what} as UTF-8."
        ) from None
