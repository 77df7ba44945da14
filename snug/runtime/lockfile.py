"""A lock file that names its holder: an OS lock (`fcntl.flock`) on a file whose content (pid,
host, command, start) tells whoever is refused which process holds it.

flock (BSD locks): the kernel drops the lock when the last descriptor of the open file goes,
however its process ends, so a crash or `kill -9` never leaves a stale lock behind (a file left
behind is taken by the next process); a child given the descriptor keeps the lock as long as it
runs. The holder removes the file before it lets go, so a process that opened it meanwhile may
have locked a file no longer under the name: it opens the file now there again, a bounded
number of times. Written here because the standard library has the lock but not this life
cycle, and the `filelock` package brings the lock without the holder's name. Linux and macOS;
a network file system may not honour flock. Used by output.dir (train/lock.py) and by
`snug generate`'s partial output (deploy/partial.py).
"""

from __future__ import annotations

import contextlib
import datetime
import fcntl
import json
import os
import socket
import sys
from collections.abc import Callable
from pathlib import Path

TRIES = 20  # opens of a lock file that is removed or replaced each time by other processes


class Busy(Exception):
    """Another process holds the lock; `holder` names it ('pid N on HOST: COMMAND, since T')."""

    def __init__(self, holder: str) -> None:
        super().__init__(holder)
        self.holder = holder


class Unsteady(Exception):
    """The lock file was removed or replaced each of TRIES times it was opened and locked."""


def holder(path: Path) -> str:
    """Who holds the lock of `path`, as its file says."""
    try:
        info = json.loads(Path(path).read_text())
        return f"pid {info['pid']} on {info['host']}: {info['command']}, since {info['since']}"
    except (OSError, ValueError, KeyError, TypeError):  # it has not written its name yet
        return "its name not written yet"


def holder_pid(path: Path) -> int | None:
    """The pid the lock file names while its lock is held (by any process); None when it is
    free or its file is missing or not a holder's."""
    try:
        fd = os.open(path, os.O_RDONLY | os.O_NOFOLLOW)
    except OSError:
        return None
    try:
        fcntl.flock(fd, fcntl.LOCK_SH | fcntl.LOCK_NB)
        return None  # nobody holds it
    except BlockingIOError:
        pass
    finally:
        os.close(fd)
    try:
        pid = json.loads(Path(path).read_text())["pid"]
    except (OSError, ValueError, KeyError, TypeError):
        return None
    return pid if isinstance(pid, int) else None


def _same_file(fd: int, path: Path) -> bool:
    """Whether the file `fd` locked is still the one under `path` (not removed by its holder
    as it let go)."""
    try:
        return os.fstat(fd).st_ino == os.stat(path).st_ino
    except FileNotFoundError:
        return False


def take(path: Path, missing: Callable[[], None] | None = None) -> int:
    """A descriptor of `path` (made if missing; not inherited by children unless handed on)
    that holds its lock. Busy when another process holds it; Unsteady after TRIES opens that
    each found the file removed or replaced (or, with `missing`, called to make the folder,
    its folder gone each time); OSError when it cannot be opened (ELOOP: a link under the
    name, which O_NOFOLLOW refuses: a link would have us create or lock its target)."""
    for _ in range(TRIES):
        try:
            fd = os.open(path, os.O_RDWR | os.O_CREAT | os.O_NOFOLLOW, 0o644)
        except FileNotFoundError:
            if missing is None:
                raise
            missing()
            continue
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            os.close(fd)
            raise Busy(holder(path)) from None
        if _same_file(fd, path):
            return fd
        os.close(fd)
    raise Unsteady(f"{path} was removed or replaced each of the {TRIES} times it was locked")


def name_holder(fd: int, command: str | None = None) -> None:
    """Write this process's name into the lock file it holds (`command`: as the user typed
    it; by default this process's arguments after `snug`)."""
    since = datetime.datetime.now().isoformat(timespec="seconds")
    info = {"pid": os.getpid(), "host": socket.gethostname(), "since": since}
    info["command"] = command or " ".join(["snug", *sys.argv[1:]])
    with contextlib.suppress(OSError):  # it only names the holder (a full disk: unnamed)
        os.ftruncate(fd, 0)
        os.write(fd, (json.dumps(info) + "\n").encode())


def release(path: Path, fd: int) -> None:
    """Remove the lock file, while still held (see `take`), then let go."""
    try:
        Path(path).unlink(missing_ok=True)
    finally:
        os.close(fd)
