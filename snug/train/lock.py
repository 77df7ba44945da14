"""One run per output.dir: an OS file lock on `output.dir/.snug-lock`, held from before anything
is loaded until the run has ended.

`fcntl.flock` (BSD locks): the kernel drops the lock when the process ends, however it ends, so
a crash or `kill -9` never leaves a stale lock behind; the file's content (pid, host, command,
start) is only there to name the holder to whoever is refused. Written here because the
standard library has the lock but not its life cycle (a folder made for the lock, a lock file
removed by its holder while another process waits to open it); the `filelock` package would
bring the same few lines as a dependency. A run of several processes locks once: rank 0 holds
it (`snug train`'s torchrun launcher only checks that it is free). Linux and macOS; a network
file system may not honour flock.
"""

from __future__ import annotations

import contextlib
import datetime
import errno
import fcntl
import json
import os
import socket
import sys
import threading
from collections.abc import Iterator
from pathlib import Path

from snug.errors import UserError

LOCK_FILE = ".snug-lock"
_held: set[tuple[str, int]] = set()  # (folder, thread) this process holds: taking it again nests


class OutputDirError(UserError):
    """output.dir is not ours to write, or the run would overwrite its own inputs."""


def _unwritable(out: Path, folder: Path, e: OSError) -> OutputDirError:
    return OutputDirError(
        f"output.dir={out}: cannot write into {folder} ({e.strerror}); choose a folder you can "
        "write to."
    )


def link_refused(out: Path, link: Path) -> OutputDirError:
    return OutputDirError(
        f"output.dir={out}: {link.relative_to(out)} is a symbolic link (to {os.readlink(link)}); "
        "snug does not write, move or delete through links inside a run folder: put the folder "
        "or file itself there, or choose another output.dir (output.dir itself may be a link)."
    )


def _refused(out: Path, path: Path, e: OSError) -> OutputDirError:
    if e.errno == errno.ELOOP:  # O_NOFOLLOW met a link
        return link_refused(out, path)
    return _unwritable(out, out, e)


def _make(out: Path) -> list[Path]:
    """Make output.dir and any folder above it that is missing; the folders made, deepest
    first (removed again if the run never takes the folder over)."""
    missing = [p for p in [out, *out.parents] if not p.exists()]
    for folder in reversed(missing):
        try:
            folder.mkdir()
        except FileExistsError:
            continue  # made by another process meanwhile
        except OSError as e:
            _remove_empty([m for m in missing if m in folder.parents])  # made before it
            raise _unwritable(out, folder.parent, e) from None
    return missing


def _remove_empty(folders: list[Path]) -> None:
    for folder in folders:  # deepest first; one that holds anything now stays
        try:
            folder.rmdir()
        except OSError:
            return


def _holder(path: Path) -> str:
    try:
        info = json.loads(path.read_text())
        return f"pid {info['pid']} on {info['host']}: {info['command']}, since {info['since']}"
    except (OSError, ValueError, KeyError, TypeError):  # it has not written its name yet
        return "its name not written yet"


def _open_locked(out: Path, path: Path) -> int:
    """A descriptor of `path` that holds its lock, or OutputDirError naming the holder.

    The holder removes the file before it lets go of the lock, so the file this process locked
    may be one already removed: then it tries again with the file now under that name."""
    while True:
        try:
            # O_NOFOLLOW: a link planted under the name would have us create or lock its target
            fd = os.open(path, os.O_RDWR | os.O_CREAT | os.O_NOFOLLOW, 0o644)  # not inherited
        except FileNotFoundError:  # the folder went with another process's failed start
            _make(out)
            continue
        except OSError as e:
            raise _refused(out, path, e) from None
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            os.close(fd)
            raise OutputDirError(
                f"output.dir={out} is in use by another snug run ({_holder(path)}); wait for it "
                "to end, or choose another output.dir."
            ) from None
        try:
            same = os.fstat(fd).st_ino == os.stat(path).st_ino
        except FileNotFoundError:
            same = False
        if same:
            return fd
        os.close(fd)


@contextlib.contextmanager
def lock_output_dir(out: Path, command: str | None = None) -> Iterator[None]:
    """Hold output.dir's lock for the `with` block (made first if missing: the folders made
    for it go again at the end if nothing else was put in them). Taking it again in the same
    thread while held nests (`snug train` takes it before the heavy imports, the training
    loop again)."""
    out = Path(out)
    key = (str(out.resolve()), threading.get_ident())
    if key in _held:
        yield
        return
    made = _make(out)
    path = out / LOCK_FILE
    try:
        fd = _open_locked(out, path)
    except BaseException:
        _remove_empty(made)
        raise
    _held.add(key)
    try:
        since = datetime.datetime.now().isoformat(timespec="seconds")
        info = {"pid": os.getpid(), "host": socket.gethostname(), "since": since}
        info["command"] = command or " ".join(["snug", *sys.argv[1:]])
        with contextlib.suppress(OSError):  # only names the holder (a full disk: unnamed)
            os.ftruncate(fd, 0)
            os.write(fd, (json.dumps(info) + "\n").encode())
        yield
    finally:
        _held.discard(key)
        path.unlink(missing_ok=True)  # while still held: see _open_locked
        os.close(fd)
        _remove_empty(made)


def check_output_dir_free(out: Path) -> None:
    """OutputDirError if another process holds output.dir's lock; takes nothing (the torchrun
    launcher: its rank 0 takes the lock)."""
    out = Path(out)
    path = out / LOCK_FILE
    if not path.exists():
        return
    try:
        fd = os.open(path, os.O_RDONLY | os.O_NOFOLLOW)
    except FileNotFoundError:
        return
    except OSError as e:
        raise _refused(out, path, e) from None
    try:
        fcntl.flock(fd, fcntl.LOCK_SH | fcntl.LOCK_NB)
    except BlockingIOError:
        raise OutputDirError(
            f"output.dir={out} is in use by another snug run ({_holder(path)}); wait for it to "
            "end, or choose another output.dir."
        ) from None
    finally:
        os.close(fd)
