"""Helpers for one-sentence error messages."""


def first_line(e: BaseException) -> str:
    """The first line of an exception's message (library messages run long), or its type."""
    text = str(e).strip()
    return text.splitlines()[0] if text else e.__class__.__name__
