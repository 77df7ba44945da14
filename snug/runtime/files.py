"""Write a file or a directory aside, then rename it into place: a reader (or a crash) sees the
old content or the new one, never a half-written file under the final name. And a full disk
said as one line naming the folder and the bytes needed."""

from __future__ import annotations

import errno
import os
import shutil
from pathlib import Path

from snug.errors import RunError


class OutOfSpace(RunError):
    """A write needs more bytes than the folder's file system has free."""


def free_bytes(path: Path) -> int:
    """Bytes this process may still write on the file system of `path` (or of the nearest
    folder above it that exists)."""
    path = Path(path)
    while not path.exists() and path != path.parent:
        path = path.parent
    return shutil.disk_usage(path).free


def disk_full(e: BaseException) -> bool:
    """Whether `e` says the disk (or the user's quota) is full: an OSError with ENOSPC or
    EDQUOT, or the same error from safetensors' writer (Rust), which raises SafetensorError."""
    if isinstance(e, OSError):
        return e.errno in (errno.ENOSPC, errno.EDQUOT)
    text = str(e)
    return any(s in text for s in ("No space left on device", "os error 28", "quota exceeded"))


def failed_write(e: BaseException, where: Path | str = "a file") -> str:
    """What a failed write says, for a message: 'FILE (why)', FILE the one an OSError names,
    else `where`."""
    name = (e.filename if isinstance(e, OSError) else None) or where
    why = (e.strerror if isinstance(e, OSError) else None) or " ".join(str(e).split())
    return f"{name} ({why})"


def out_of_space(folder: Path, needed: int, what: str, cause: BaseException | None = None) -> str:
    """'out of space: FOLDER needs N bytes for WHAT but its disk has F free' (and the error the
    write got, when it got one)."""
    said = f"out of space: {folder} needs {needed:,} bytes for {what} but its disk has "
    said += f"{free_bytes(folder):,} free"
    if cause is not None:
        said += f" ({' '.join(str(cause).split())})"
    return said


def check_space(folder: Path, needed: int, what: str, then: str) -> None:
    """OutOfSpace before a write of `needed` bytes into `folder` that cannot fit; `then` says
    what to do."""
    if free_bytes(folder) < needed:
        raise OutOfSpace(f"{out_of_space(folder, needed, what)}; {then}")


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
