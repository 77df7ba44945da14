"""Where a raw record came from, for messages: file and line (JSON, JSONL) or source and row.

`datasets` reads JSON Lines fast but names no line when one is broken, and keeps no line
numbers; snug reads the files itself only when it needs them: to name a record's line in a
message, or to find (and, with data.on_error=skip, leave out) the lines the loader failed on.
"""

from __future__ import annotations

import codecs
import functools
import json
import re
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from snug.data.formats import DataError

_BETWEEN_ITEMS = re.compile(r"[\s,]*")
NEWLINE = b"\n"


# The longest line of a JSON Lines file (one record) snug reads: reading a line takes about ten
# times its size in memory, and no record that trains is this long (a conversation's messages
# are cut to what data.cutoff_len keeps, a text record holds at most 10,000,000 characters).
MAX_LINE_BYTES = 64 << 20


def check_utf8(path: Path, chunk: int = 16 << 20, max_line: int | None = None) -> None:
    """DataError naming the line and column of the first byte of `path` that is not UTF-8
    (pyarrow reads such bytes into its strings unchecked, and they fail later, nameless), or
    the first line over `max_line` bytes. Read in chunks: a large file is never held whole."""
    chunk = chunk if max_line is None else min(chunk, max_line)  # only lines across chunks
    # can then be longer than max_line: each chunk is checked at its first line break
    decoder = codecs.getincrementaldecoder("utf-8")()
    line, run, run_line = 1, 0, 1  # run: bytes of line `run_line` read so far
    with open(path, "rb") as f:
        while True:
            data = f.read(chunk)
            try:
                decoder.decode(data, final=not data)
            except UnicodeDecodeError as e:
                before = data[: max(e.start, 0)]
                column = len(before) - (before.rfind(b"\n") + 1) + 1
                where = f"line {line + before.count(NEWLINE)}, column {column}"
                raise DataError(
                    f"{path} {where}: not UTF-8 text (byte 0x{data[e.start]:02x}); save the "
                    "file as UTF-8."
                ) from None
            first = data.find(NEWLINE)
            run += len(data) if first < 0 else first
            if max_line is not None and run > max_line:
                raise DataError(
                    f"{path} line {run_line}: longer than {max_line:,} bytes, more than one "
                    "record may hold; is it one JSON record per line?"
                )
            if not data:
                return
            line += data.count(b"\n")
            if first >= 0:
                run, run_line = len(data) - data.rfind(NEWLINE) - 1, line


def holds_array(path: Path) -> bool:
    """Whether a JSON file holds one array (else: JSON Lines)."""
    with open(path, "rb") as f:
        return f.read(4096).lstrip().startswith(b"[")


def check_json_file(path: Path) -> None:
    """DataError naming the line of a JSON or JSON Lines file that snug would choke on, before
    any of it is parsed: bytes that are not UTF-8, or (JSON Lines) a line over MAX_LINE_BYTES."""
    check_utf8(path, max_line=None if holds_array(path) else MAX_LINE_BYTES)


def _array_lines(text: str) -> list[int]:
    """The line each item of a valid JSON array starts on."""
    decoder, lines, line, at = json.JSONDecoder(), [], 1, 0
    i = _BETWEEN_ITEMS.match(text, text.index("[") + 1).end()
    while text[i] != "]":
        line, at = line + text.count("\n", at, i), i
        lines.append(line)
        i = _BETWEEN_ITEMS.match(text, decoder.raw_decode(text, i)[1]).end()
    return lines


def record_lines(path: Path) -> list[int]:
    """The line each record starts on in a JSON Lines file or a JSON array that `datasets`
    read without error (so a valid one; blank lines hold no record, for it too)."""
    text = path.read_text(encoding="utf-8")
    if text.lstrip().startswith("["):
        return _array_lines(text)
    return [n for n, line in enumerate(text.split("\n"), 1) if line.strip()]


def text_lines(path: Path) -> list[int]:
    """The line of each document of a .txt file, as sources.py reads it: one a line (universal
    newlines, as `datasets`' text loader splits them), blank lines left out."""
    with open(path, encoding="utf-8") as f:
        return [n for n, line in enumerate(f, 1) if line.strip()]


def read_json(path: Path) -> tuple[list[int], list[Any], list[tuple[int, str]]]:
    """(the 1-based line of each record, the records, (line, why) of each line that holds no
    record) of a JSON Lines file or of a file holding one JSON array. A syntax error in an array
    spoils the whole file, so it is raised rather than returned."""
    try:
        text = path.read_text(encoding="utf-8")
    except (OSError, UnicodeDecodeError) as e:
        raise DataError(f"{path}: cannot read the file ({e}).") from None
    if text.lstrip().startswith("["):
        try:
            items = json.loads(text)
        except json.JSONDecodeError as e:
            raise DataError(
                f"{path} line {e.lineno}: not valid JSON ({e.msg} at column {e.colno}); the file "
                "holds one JSON array, so no record can be skipped: fix that line."
            ) from None
        lines = _array_lines(text)
        bad = [(n, _not_a_record(x)) for n, x in zip(lines, items, strict=True)]
        keep = [i for i, x in enumerate(items) if isinstance(x, dict)]
        return [lines[i] for i in keep], [items[i] for i in keep], [b for b in bad if b[1]]
    lines, records, problems = [], [], []
    for n, line in enumerate(text.split("\n"), 1):  # only \n ends a JSON Lines record
        if not line.strip():
            continue  # `datasets` skips blank lines too
        try:
            value = json.loads(line)
        except json.JSONDecodeError as e:
            problems.append((n, f"not valid JSON ({e.msg} at column {e.colno})"))
            continue
        if why := _not_a_record(value):
            problems.append((n, why))
            continue
        lines.append(n)
        records.append(value)
    return lines, records, problems


def _not_a_record(value: Any) -> str:
    if isinstance(value, dict):
        return ""
    return f"holds a JSON {type(value).__name__}, not a record ({{...}})"


@dataclass
class Locator:
    """Names raw row `index` of one source: 'FILE line N' when the rows were read from JSON or
    JSON Lines files, else 'SOURCE row N'. Lines are found when first asked for."""

    spec: str
    json_files: list[Path] = field(default_factory=list)
    rows: int = 0  # rows the source loaded, to check the lines found against
    known: list[tuple[str, int]] | None = None  # (file, line) of each row, when already known
    text_file: Path | None = None  # a .txt file of one document a line (sources.py)

    @functools.cached_property
    def _origins(self) -> list[tuple[str, int]] | None:
        if self.known is not None:
            return self.known
        if self.text_file is not None:
            return [(str(self.text_file), n) for n in text_lines(self.text_file)]
        try:
            origins = [(str(p), n) for p in self.json_files for n in record_lines(p)]
        except (OSError, ValueError, IndexError):  # not as `datasets` read it: name rows
            return None
        return origins if self.json_files and len(origins) == self.rows else None

    def __call__(self, index: int) -> str:
        if self._origins is None:
            return f"{self.spec} row {index + 1}"
        path, line = self._origins[index]
        return f"{path} line {line}"
