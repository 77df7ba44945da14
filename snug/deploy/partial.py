"""`snug generate`'s output, written as it goes, and resumed.

OUT.partial holds the answers so far: output rows in the input's order, appended and synced to
disk after each batch (whole batches only: a batch cut short by a crash or a full disk is cut
off again). OUT.partial.job says which job they belong to: the prompts (a hash of the rows and
of their token ids), the model (its weight files) and the generation settings. The same command
again finds both and goes on after the last whole batch; a partial file of another job, or one
without its record, is refused and left as it is. When every row is answered, OUT.partial
becomes OUT: a file under the name asked for is always whole.

A full disk stops the command with one line naming the file and how many answers it keeps.
While a command writes OUT, it holds OUT.partial.lock (an OS lock, snug/runtime/lockfile.py): a second
`snug generate` on the same output would go on with the same partial file and append into it,
so it is refused, naming the first.
"""

from __future__ import annotations

import contextlib
import errno
import hashlib
import json
import os
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from snug.errors import RunError, UserError
from snug.runtime import lockfile
from snug.runtime.files import OutOfSpace, disk_full

KIND = "snug generate job"  # the job record's "kind": what marks a file as one of snug's
# the job record's settings and the options that set them, to name a difference
OPTIONS = {
    "max_new_tokens": "--max-new-tokens",
    "temperature": "--temperature",
    "top_p": "--top-p",
    "seed": "--seed",
    "batch_size": "--batch-size",
    "dtype": "--dtype",
    "device": "--device",
}


class PartialRefused(UserError):
    """A partial output that is not this job's, or an output that appeared meanwhile: left as
    it is, said in one sentence."""


class NotWritten(RunError):
    """The answers could not be written (but for a full disk: files.OutOfSpace): one line,
    what was written stays."""


# what os.link raises where the filesystem has no hard links (FAT, some network shares)
NO_HARD_LINKS = {errno.EPERM, errno.EOPNOTSUPP, errno.ENOTSUP, errno.EMLINK, errno.EXDEV}


def partial_path(out: Path) -> Path:
    return out.with_name(out.name + ".partial")


def lock_path(out: Path) -> Path:
    return out.with_name(out.name + ".partial.lock")


@contextlib.contextmanager
def writing(out: Path, flag: str) -> Iterator[None]:
    """Hold OUT.partial.lock for the `with` block; PartialRefused, naming the holder, when
    another process holds it."""
    path = lock_path(out)
    try:
        fd = lockfile.take(path)
    except lockfile.Busy as e:
        raise PartialRefused(
            f"{flag} {out} is being written by another snug generate ({e.holder}); wait for it "
            "to end, or name another output."
        ) from None
    except (lockfile.Unsteady, OSError) as e:
        why = e.strerror if isinstance(e, OSError) and e.strerror else str(e)
        raise PartialRefused(
            f"{flag} {out}: cannot lock {path} ({why}); name another output."
        ) from None
    try:
        lockfile.name_holder(fd)
        yield
    finally:
        lockfile.release(path, fd)


def job_path(out: Path) -> Path:
    return out.with_name(out.name + ".partial.job")


def digest(items: list[Any]) -> str:
    """sha256 of items as canonical JSON lines."""
    h = hashlib.sha256()
    for item in items:
        h.update(json.dumps(item, sort_keys=True, ensure_ascii=False).encode() + b"\n")
    return h.hexdigest()


def weight_files(folder: Path | None) -> list[list]:
    """[name, bytes, mtime_ns] of a model or adapter folder's config and weight files: which
    weights answered, cheaply (hashing a 7B base's weights would take longer than a short job;
    re-saving or replacing them changes the times)."""
    if folder is None:
        return []
    names = ("config.json", "adapter_config.json")
    found = sorted(
        p for p in Path(folder).iterdir() if p.suffix == ".safetensors" or p.name in names
    )
    return [[p.name, p.stat().st_size, p.stat().st_mtime_ns] for p in found]


def job_record(rows: list[dict], prompts: list[list[int]], model: dict, settings: dict) -> dict:
    """What a partial output belongs to (`model`: names and weight files of what answers)."""
    return {
        "kind": KIND,
        "rows": len(rows),
        "rows_sha256": digest(rows),
        "prompts_sha256": digest(prompts),
        "model": model,
        "settings": settings,
    }


def differences(was: dict, now: dict) -> list[str]:
    """How the job of a partial file differs from this one, in the user's words."""
    said = []
    if (was.get("rows"), was.get("rows_sha256")) != (now["rows"], now["rows_sha256"]):
        said.append(f"its {was.get('rows')} rows are other prompts than --input's {now['rows']}")
    elif was.get("prompts_sha256") != now["prompts_sha256"]:
        said.append("the prompts render to other tokens (--system, --template or the tokenizer)")
    if was.get("model") != now["model"]:
        said.append(f"another model answered ({_model_name(was)}, now {_model_name(now)})")
    settings = was.get("settings") or {}
    for key, flag in OPTIONS.items():
        if settings.get(key) != now["settings"][key]:
            said.append(f"{flag} {settings.get(key)} there, {now['settings'][key]} now")
    return said


def _model_name(job: dict) -> str:
    model = job.get("model") or {}
    return f"{model.get('use')} on {model.get('base')}"


@dataclass
class Partial:
    """An output being written: `done` answers (whole batches) in `path`."""

    out: Path
    path: Path
    done: int
    flag: str

    def append(self, text: str, total: int) -> None:
        """Append a batch's lines and sync them to disk; a failed write is cut off again (the
        file keeps whole batches) and stops the command with one line."""
        data = text.encode()
        try:
            fd = os.open(self.path, os.O_WRONLY | os.O_APPEND)
        except FileNotFoundError:
            raise self._removed(total) from None
        except OSError as e:
            raise self._stopped(e, total) from None
        try:
            start = os.fstat(fd).st_size
            try:
                view = memoryview(data)
                while view:  # os.write may write part of it
                    view = view[os.write(fd, view) :]
                os.fsync(fd)
            except OSError as e:
                os.ftruncate(fd, start)
                raise self._stopped(e, total) from None
        finally:
            os.close(fd)
        self.done += text.count("\n")

    def _removed(self, total: int) -> NotWritten:
        return NotWritten(
            f"{self.flag} {self.out}: {self.path} was removed while this ran, and its "
            f"{self.done} of {total} answers with it; run the same command again to start over."
        )

    def _stopped(self, e: OSError, total: int) -> RunError:
        if disk_full(e):
            return OutOfSpace(self._keeps("the disk is full", "make room", total))
        return NotWritten(self._keeps(f"cannot write there ({e.strerror or e})", "fix that", total))

    def _keeps(self, what: str, fix: str, total: int) -> str:
        return (
            f"{self.flag} {self.out}: {what}; {self.path} keeps {self.done} of {total} answers: "
            f"{fix} and run the same command again to go on from there."
        )

    def finish(self, total: int) -> None:
        """OUT.partial becomes OUT, and its job record goes. OUT made by someone else meanwhile
        is left as it is."""
        try:
            os.link(self.path, self.out)
        except FileExistsError:
            raise PartialRefused(
                f"{self.flag} {self.out} appeared while this ran and is left as it is; the "
                f"answers are in {self.path}."
            ) from None
        except FileNotFoundError:
            raise self._removed(total) from None
        except OSError as e:
            if e.errno not in NO_HARD_LINKS:
                raise self._stopped(e, total) from None
            if self.out.exists():  # a filesystem without hard links: rename, unless it appeared
                raise PartialRefused(
                    f"{self.flag} {self.out} appeared while this ran; the answers are in "
                    f"{self.path}."
                ) from None
            os.rename(self.path, self.out)
        self.path.unlink(missing_ok=True)
        job_path(self.out).unlink(missing_ok=True)


def read_job(out: Path, flag: str) -> dict | None:
    """The job record beside `out`, if any; a file there that is not one is refused."""
    path = job_path(out)
    if not path.exists():
        return None
    try:
        job = json.loads(path.read_text(encoding="utf-8"))
    except (OSError, UnicodeDecodeError, json.JSONDecodeError):
        job = None
    if not isinstance(job, dict) or job.get("kind") != KIND:
        raise PartialRefused(
            f"{flag} {out}: {path} is not a job record of snug generate; remove it or name "
            "another output."
        )
    return job


def check_before_loading(out: Path, flag: str) -> None:
    """What can be refused before the model loads: a partial file without its job record."""
    read_job(out, flag)
    if partial_path(out).exists() and not job_path(out).exists():
        raise PartialRefused(
            f"{flag} {out}: {partial_path(out)} exists, but no {job_path(out).name} says what "
            "it holds; remove it or name another output."
        )


def answered(path: Path, rows: list[dict], output_row, model: str, batch: int) -> tuple[int, int]:
    """(answers, bytes) of the whole batches at the start of a partial file: each line must be
    the output row of its input row; a last line cut short is left out, and so are the lines
    of a batch not written whole."""
    data = path.read_bytes()
    lines, ends = [], []
    at = 0
    while (end := data.find(b"\n", at)) != -1:  # a tail without its newline was cut short
        lines.append(data[at:end])
        ends.append(end + 1)
        at = end + 1
    if len(lines) > len(rows):
        raise PartialRefused(f"{path} holds {len(lines)} answers for {len(rows)} rows")
    for i, (line, row) in enumerate(zip(lines, rows, strict=False)):
        try:
            got = json.loads(line)
        except (json.JSONDecodeError, UnicodeDecodeError):
            got = None
        answer = got.get("output") if isinstance(got, dict) else None
        if not isinstance(answer, str) or got != output_row(row, answer, model):
            raise PartialRefused(f"{path} line {i + 1} is not the answer to input row {i + 1}")
    whole = len(lines) if len(lines) == len(rows) else len(lines) - len(lines) % batch
    return whole, ends[whole - 1] if whole else 0


def open_partial(out: Path, job: dict, rows: list[dict], output_row, flag: str) -> Partial:
    """The partial output of this job: resumed after its whole batches, or started."""
    path, model, batch = partial_path(out), job["model"]["use"], job["settings"]["batch_size"]
    if path.exists():
        was = read_job(out, flag)
        said = differences(was, job) if was is not None else ["it has no job record"]
        if not said:
            try:
                done, size = answered(path, rows, output_row, model, batch)
            except PartialRefused as e:
                said = [str(e)]
        if said:
            raise PartialRefused(
                f"{flag} {out}: {path} holds the answers of another job ({'; '.join(said)}); "
                f"run with the same input and options to go on with it, or remove {path} and "
                f"{job_path(out).name}, or name another output."
            )
        if size < path.stat().st_size:
            os.truncate(path, size)
        return Partial(out, path, done, flag)
    text = json.dumps(job, indent=2) + "\n"
    tmp = job_path(out).with_name(f".{job_path(out).name}.tmp-{os.getpid()}")
    started = Partial(out, path, 0, flag)
    try:
        tmp.write_text(text, encoding="utf-8")
        os.replace(tmp, job_path(out))  # checked above: none there, or this command's own
        os.close(os.open(path, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o644))
    except FileExistsError:
        raise PartialRefused(f"{flag} {out}: {path} appeared while this started.") from None
    except OSError as e:
        tmp.unlink(missing_ok=True)
        raise started._stopped(e, len(rows)) from None
    return started
