"""Write a file or a directory aside, then rename it into place: a reader (or a crash) sees the
old content or the new one, never a half-written file under the final name."""

from __future__ import annotations

import os
import shutil
from pathlib import Path


def fsync(path: Path) -> None:
    fd = os.open(path, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def write_text_atomic(path: Path, text: str) -> None:
    """`text` into `path`: written to a hidden file beside it, flushed, then renamed over it."""
    write_bytes_atomic(path, text.encode("utf-8"))


def write_bytes_atomic(path: Path, data: bytes) -> None:
    path = Path(path)
    tmp = path.with_name(f".{path.name}.tmp-{os.getpid()}")
    try:
        with open(tmp, "wb") as f:
            f.write(data)
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, path)
    finally:
        tmp.unlink(missing_ok=True)


def aside(path: Path) -> Path:
    """A fresh hidden path beside `path` to build a replacement in (removed first if a killed
    run left one)."""
    path = Path(path)
    tmp = path.with_name(f".{path.name}.tmp-{os.getpid()}")
    if tmp.is_dir():
        shutil.rmtree(tmp)
    elif tmp.exists():
        tmp.unlink()
    return tmp


def replace_dir(tmp: Path, final: Path) -> None:
    """Put the complete directory `tmp` in place of `final`: the old one is moved aside by a
    rename first and deleted only once the new one is in place."""
    old = final.with_name(f".{final.name}.old-{os.getpid()}")
    if final.exists():
        os.replace(final, old)
    os.replace(tmp, final)
    if old.is_dir():
        shutil.rmtree(old)
    elif old.exists():
        old.unlink()
