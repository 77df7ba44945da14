"""One run per output.dir: an OS file lock on `output.dir/.snug-lock` (snug/runtime/lockfile.py), held
from before anything is loaded until the run has ended.

The kernel drops the lock when the process ends, however it ends, so a crash or `kill -9` never
leaves a stale lock behind; the file's content (pid, host, command, start) names the holder to
whoever is refused. Here: the lock's life cycle in a run folder (the folders made for it,
taking it again in the same run, handing it on to torchrun's ranks).

A run of several processes on one node locks once, in `snug train`'s torchrun launcher, before
any rank starts: torchrun inherits the locked descriptor, so the lock lasts as long as torchrun
(which outlives its ranks), even should the launcher be killed; rank 0 takes no lock of its own
but checks that the launcher named in HANDED_ON holds it. Under a torchrun started by hand,
rank 0 takes the lock itself.
"""

from __future__ import annotations

import contextlib
import errno
import os
import threading
from collections.abc import Iterator
from pathlib import Path

from snug.errors import UserError
from snug.runtime import lockfile

LOCK_FILE = ".snug-lock"
# set by `snug train`'s torchrun launcher for its ranks: the pid of the process that holds
# output.dir's lock for them
HANDED_ON = "SNUG_OUTPUT_DIR_LOCKED_BY"
# (folder, thread) this process holds -> the locked descriptor (None: a launcher holds it for
# this rank); taking it again nests
_held: dict[tuple[str, int], int | None] = {}


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


def _in_use(out: Path, holder: str) -> OutputDirError:
    return OutputDirError(
        f"output.dir={out} is in use by another snug run ({holder}); wait for it to end, or "
        "choose another output.dir."
    )


def _refused(out: Path, path: Path, e: OSError) -> OutputDirError:
    if e.errno == errno.ELOOP:  # O_NOFOLLOW met a link
        return link_refused(out, path)
    return _unwritable(out, out, e)


def _dangling(out: Path, folder: Path) -> OutputDirError:
    where = f"output.dir={out} is" if folder == out else f"output.dir={out}: {folder} is"
    return OutputDirError(
        f"{where} a link to a missing folder {os.readlink(folder)}; make that folder, or "
        "choose another output.dir."
    )


def _make(out: Path) -> list[Path]:
    """Make output.dir and any folder above it that is missing; the folders made, deepest
    first (removed again if the run never takes the folder over). A link to a missing folder
    is refused: snug makes no folder at the other end of a link."""
    missing = [p for p in [out, *out.parents] if not p.exists()]
    for folder in reversed(missing):
        if folder.is_symlink():
            _remove_empty([m for m in missing if m in folder.parents])  # made before it
            raise _dangling(out, folder)
        try:
            folder.mkdir()
        except FileExistsError:
            continue  # made by another process meanwhile
        except OSError as e:
            _remove_empty([m for m in missing if m in folder.parents])
            raise _unwritable(out, folder.parent, e) from None
    return missing


def _remove_empty(folders: list[Path]) -> None:
    for folder in folders:  # deepest first; one that holds anything now stays
        try:
            folder.rmdir()
        except OSError:
            return


def _open_locked(out: Path, path: Path) -> int:
    """A descriptor of `path` that holds its lock, or OutputDirError naming the holder. The
    folder may go meanwhile (another process's failed start removes the folder it made): it
    is made again, a bounded number of times."""
    try:
        return lockfile.take(path, missing=lambda: _make(out))
    except lockfile.Busy as e:
        raise _in_use(out, e.holder) from None
    except lockfile.Unsteady as e:
        raise OutputDirError(
            f"output.dir={out}: cannot take its lock ({e}: other processes keep removing it); "
            "run again once they are done."
        ) from None
    except OSError as e:
        raise _refused(out, path, e) from None


def _check_handed_on(out: Path, launcher: str) -> None:
    """In rank 0 of a run `snug train` launched: the launcher (pid `launcher`) holds the lock,
    which torchrun keeps for as long as it runs."""
    holder = lockfile.holder_pid(out / LOCK_FILE)
    if str(holder) != launcher:
        now = f"pid {holder} holds it" if holder is not None else "it is not held"
        raise OutputDirError(
            f"output.dir={out}: the snug train that started this process (pid {launcher}, "
            f"{HANDED_ON}) should hold its lock, but {now}; start the run with snug train."
        )


@contextlib.contextmanager
def lock_output_dir(out: Path, command: str | None = None) -> Iterator[None]:
    """Hold output.dir's lock for the `with` block (made first if missing: the folders made
    for it go again at the end if nothing else was put in them). Taking it again in the same
    thread while held nests (`snug train` takes it before the heavy imports, the training
    loop again). In a rank whose launcher holds it (HANDED_ON), checks that it does."""
    out = Path(out)
    key = (str(out.resolve()), threading.get_ident())
    if key in _held:
        yield
        return
    # only in a rank torchrun started: a process a rank starts inherits the variable too
    launcher = os.environ.get(HANDED_ON) if "LOCAL_RANK" in os.environ else None
    if launcher is not None:
        _check_handed_on(out, launcher)
        _held[key] = None
        try:
            yield
        finally:
            del _held[key]
        return
    made = _make(out)
    path = out / LOCK_FILE
    try:
        fd = _open_locked(out, path)
    except BaseException:
        _remove_empty(made)
        raise
    _held[key] = fd
    try:
        lockfile.name_holder(fd, command)
        yield
    finally:
        del _held[key]
        lockfile.release(path, fd)
        _remove_empty(made)


def handed_on(out: Path) -> tuple[dict[str, str], tuple[int, ...]]:
    """(environment, descriptors) for a child process (torchrun) of this process, which holds
    output.dir's lock: the child keeps the lock for as long as it runs, and its rank 0 knows
    it need not take it. Nothing when this process does not hold it."""
    fd = _held.get((str(Path(out).resolve()), threading.get_ident()))
    if fd is None:
        return {}, ()
    return {HANDED_ON: str(os.getpid())}, (fd,)
