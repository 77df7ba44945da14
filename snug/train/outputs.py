"""Who owns output.dir, and when a new run may replace what an earlier one left there.

Nothing of an earlier run is removed, and nothing is written, until the new run has proven it
can start: config checked, model and data found and loaded, the checkpoint (when resuming)
read back into memory, the first optimizer step done. Only then does `commit` take the
directory over: the earlier run's outputs are moved aside into `previous/` (renames, no copy),
where they stay until a run in the folder completes; every output after that is written aside
and renamed into place. So a run that fails before its first optimizer step leaves every file
byte-identical (its own status aside, saying why: train/status.py), and one that fails later
leaves the earlier run's outputs in `previous/`.

From before anything is loaded to its end a run holds the folder's lock (train/lock.py), so no
second run writes into it. Every path snug writes, renames or removes inside the folder is
checked for symbolic links first (refused: see `links`). Pure file handling, no torch: the
command line runs these checks before the heavy imports.
"""

from __future__ import annotations

import contextlib
import json
import os
import re
import shutil
from collections.abc import Iterator
from pathlib import Path

from snug.config import Config, load_config, save_config
from snug.config.paths import is_inside
from snug.errors import UserError, first_line
from snug.runtime.files import fsync
from snug.train.lock import LOCK_FILE, OutputDirError, link_refused, lock_output_dir
from snug.train.resume import config_drift
from snug.train.status import NAME as STATUS
from snug.train.status import STARTING, is_status_file, left_by_start

RUN_MARKER = ".snug-run"  # marks a directory as a snug run, so a new run may replace its outputs
FINAL_OUTPUTS = ("adapter", "model", "loss.png", "summary.json")  # what a run ends with
RUN_OUTPUTS = (*FINAL_OUTPUTS, "checkpoints", "tensorboard", "metrics.jsonl", "config.yaml")
PREVIOUS = "previous"  # the earlier run's outputs, until a run in the folder completes
_STAGING = ".previous-incomplete"  # filled by commit, then renamed to previous/ in one step
COMPLETE = "COMPLETE"  # a checkpoint's completion marker, written last
_STEP = re.compile(r"^step-(\d+)$")
_ASIDE = re.compile(r"^\..+\.(tmp|old)[-.]")  # .adapter.tmp-PID, .loss.png.tmp.png, .model.old-PID


def check_output_dir(cfg: Config) -> None:
    """Refuse, before anything is loaded: output.dir that is a file or a folder of other files
    (no snug run marker), and an input (model, data) that lies inside an output this run would
    replace."""
    out = Path(cfg.output.dir)
    if out.exists() and not out.is_dir():
        raise OutputDirError(f"output.dir={out} is a file, not a directory; choose another path.")
    for parent in out.parents:
        if parent.exists() and not parent.is_dir():
            raise OutputDirError(
                f"output.dir={out}: {parent} is a file, so no directory can be made there."
            )
    # snug's own: the lock, and beside it the status of the run that holds it (of every rank,
    # which check this while rank 0 writes it) or of one killed before taking the folder over;
    # without it, the status a run left that failed before taking the folder over
    locked = (out / LOCK_FILE).exists()

    def snugs(p: Path) -> bool:
        return p.name == LOCK_FILE or (
            is_status_file(p.name) and (locked or (p.is_file() and left_by_start(p)))
        )

    if (
        out.is_dir()
        and not all(snugs(p) for p in out.iterdir())
        and not (out / RUN_MARKER).exists()
    ):
        raise OutputDirError(
            f"output.dir={out} already holds files that are not a snug run; choose another "
            "output.dir so nothing of yours is overwritten."
        )
    inputs = {"model.name_or_path": [cfg.model.name_or_path]}
    for key in ("train", "eval"):
        value = getattr(cfg.data, key)
        inputs[f"data.{key}"] = (
            [] if value is None else [value] if isinstance(value, str) else value
        )
    for key, values in inputs.items():
        for value in values:
            if not Path(value).exists():
                continue  # a hub id, or missing (said when it is loaded)
            if is_inside(out, value):
                raise OutputDirError(
                    f"{key}={value} contains output.dir={out}; a run may not write into its own "
                    "input: choose an output.dir outside it."
                )
            for name in (*RUN_OUTPUTS, PREVIOUS):
                if is_inside(value, out / name):
                    raise OutputDirError(
                        f"{key}={value} lies inside output.dir={out}, whose {name} this run "
                        f"replaces; copy it out of {out} first (e.g. to {out.parent}/"
                        f"{out.name}-{name}) or choose another output.dir."
                    )


def links(out: Path) -> list[Path]:
    """What snug may write, rename or remove inside output.dir and is a symbolic link: a run's
    outputs, its marker, lock, status and previous/, the hidden files it writes aside, and the
    checkpoints (kept, written aside, pruned). output.dir itself, and the folders above it, may
    be links: they are where the run lives, not what it replaces."""
    if not out.is_dir():
        return []
    names = {*RUN_OUTPUTS, PREVIOUS, _STAGING, RUN_MARKER, LOCK_FILE, STATUS, STARTING}
    found = [
        p for p in out.iterdir() if p.is_symlink() and (p.name in names or _ASIDE.match(p.name))
    ]
    checkpoints = out / "checkpoints"
    if checkpoints.is_dir() and not checkpoints.is_symlink():
        found += [
            p
            for p in checkpoints.iterdir()
            if p.is_symlink() and (_STEP.match(p.name) or p.name.startswith((".tmp-", ".old-")))
        ]
    return sorted(found)


def _writable(out: Path) -> None:
    """The folders whose entries a run adds, renames or removes must let it (a user's file
    mode; root passes those, not a read-only file system)."""
    for folder in (out, out / "checkpoints", out / PREVIOUS):
        if folder.is_dir() and not os.access(folder, os.W_OK | os.X_OK):
            raise OutputDirError(
                f"output.dir={out}: cannot write into {folder} (not writable for this user, or a "
                "read-only file system); choose a folder you can write to."
            )


def _summary(folder: Path) -> dict:
    try:
        summary = json.loads((folder / "summary.json").read_text())
    except (OSError, ValueError):
        return {}
    return summary if isinstance(summary, dict) else {}


def _finished_run(out: Path) -> Path | None:
    """Where the folder's finished run is (`summary.json` status completed, with its
    config.yaml): in place, or, while a later run that took the folder over has not completed
    (stopped, failed, interrupted, killed), in previous/, which it keeps until a run here
    completes."""
    # beside a completed run in place, a previous/ is a leftover (commit deletes it)
    folder = out if _summary(out).get("status") == "completed" else out / PREVIOUS
    if _summary(folder).get("status") == "completed" and (folder / "config.yaml").is_file():
        return folder
    return None


def _other_finished_run(cfg: Config, out: Path) -> None:
    """A finished run (in place, or in previous/ behind an unfinished later one) with no
    checkpoint to resume is replaced only by a run of its own config, but for what a
    continuation may change (train/resume.py config_drift: not the guarded keys). Where a
    checkpoint exists, resuming it checks this run against it (its data too), also when it is
    an unfinished run's: a run of another config is refused there."""
    finished = _finished_run(out)
    if finished is None or newest_checkpoint(out / "checkpoints") is not None:
        return
    where = "" if finished == out else f" (in {finished}, until a run here completes)"
    what = "use another output.dir, or --fresh to replace it."
    try:
        saved = load_config(finished / "config.yaml").to_dict()
    except UserError as e:
        raise OutputDirError(
            f"{out} holds a finished run{where} whose config.yaml cannot be read "
            f"({first_line(e)}); " + what
        ) from None
    now = cfg.to_dict()
    changes = config_drift(saved, now)
    if saved["memory"].get("auto_fit") and now["memory"]["auto_fit"]:  # batch chosen per run
        batch = ("train.micro_batch x processes:", "train.grad_accum:")
        changes = [c for c in changes if not c.startswith(batch)]
    if saved["method"]["name"] != now["method"]["name"]:  # its keys differ with it
        changes = [c for c in changes if c.startswith("method.name") or not c.startswith("method.")]
    if changes:
        more = f"; and {len(changes) - 3} more" if len(changes) > 3 else ""
        raise OutputDirError(
            f"{out} holds a finished {saved['train']['stage']} run of "
            f"{saved['model']['name_or_path']}{where} that differs from this one ("
            + "; ".join(changes[:3])
            + f"{more}); "
            + what
        )


def check_run_folder(cfg: Config, fresh: bool) -> None:
    """With the folder's lock held (its content cannot change meanwhile): no link where snug
    writes, every folder writable, and no finished run of another config replaced unless
    `fresh`."""
    out = Path(cfg.output.dir)
    found = links(out)
    if found:
        raise link_refused(out, found[0])
    _writable(out)
    if not fresh:
        _other_finished_run(cfg, out)


@contextlib.contextmanager
def own_output_dir(
    cfg: Config, fresh: bool, command: str | None = None, lock: bool = True
) -> Iterator[Path]:
    """The checks of output.dir, its lock for the `with` block (`lock`: this process is the
    run's rank 0), a take-over that a kill cut short undone (the only change made here: it puts
    the user's files back), then the checks of what the folder holds."""
    check_output_dir(cfg)
    out = Path(cfg.output.dir)
    with lock_output_dir(out, command) if lock else contextlib.nullcontext():
        if lock:
            restore_cut_take_over(out)
        check_run_folder(cfg, fresh)
        yield out


def complete_checkpoints(root: Path) -> list[Path]:
    """Complete checkpoints, oldest first; half-written ones are not listed."""
    if not root.is_dir():
        return []
    done = [p for p in root.iterdir() if _STEP.match(p.name) and (p / COMPLETE).exists()]
    return sorted(done, key=lambda p: int(p.name.split("-")[1]))


def newest_checkpoint(root: Path) -> Path | None:
    """The checkpoint a resume starts from, found without changing anything: the newest
    complete one, or one that a kill left moved aside (.old-step-N, see `recover`)."""
    found = complete_checkpoints(root)
    if root.is_dir():
        for old in root.glob(".old-step-*"):
            final = root / old.name.removeprefix(".old-")
            if (old / COMPLETE).exists() and not (final / COMPLETE).exists():
                found.append(old)
    found.sort(key=lambda p: int(p.name.rsplit("-", 1)[1]))
    return found[-1] if found else None


def recover(root: Path) -> Path | None:
    """Clean what a kill during a save left behind and return the newest complete checkpoint:
    a checkpoint moved aside for a same-step replacement comes back if the new one never
    landed; temporary and unmarked directories are removed. Only a committed run calls it."""
    if not root.exists():
        return None
    for old in root.glob(".old-step-*"):
        final = root / old.name.removeprefix(".old-")
        if (final / COMPLETE).exists() or not (old / COMPLETE).exists():
            shutil.rmtree(old, ignore_errors=True)
        else:
            shutil.rmtree(final, ignore_errors=True)
            os.replace(old, final)
    for p in root.iterdir():
        if p.name.startswith(".tmp-step-") or (_STEP.match(p.name) and not (p / COMPLETE).exists()):
            shutil.rmtree(p, ignore_errors=True)
    done = complete_checkpoints(root)
    return done[-1] if done else None


def prune(root: Path, keep_last: int, best: int | None = None) -> None:
    """The newest `keep_last` complete checkpoints stay (0: all), and step-`best` (output.
    keep_best's) whatever its age; older ones and what a kill left aside go."""
    for old in complete_checkpoints(root)[:-keep_last] if keep_last > 0 else []:
        if old.name != f"step-{best}":
            shutil.rmtree(old)
    for stale in [*root.glob(".tmp-step-*"), *root.glob(".old-step-*")]:
        shutil.rmtree(stale, ignore_errors=True)


def _remove(path: Path) -> None:
    if path.is_dir() and not path.is_symlink():
        shutil.rmtree(path)
    elif path.exists() or path.is_symlink():
        path.unlink()


def restore_cut_take_over(out: Path) -> None:
    """A kill between the renames that move the earlier run's outputs aside (`commit`) left
    some in the staging folder: each goes back in its place (nothing new was written under
    its name before the staging folder became previous/)."""
    staging = out / _STAGING
    if staging.is_symlink() or not staging.is_dir():
        return
    for entry in staging.iterdir():
        if not (out / entry.name).exists() and not (out / entry.name).is_symlink():
            os.replace(entry, out / entry.name)
    if any(staging.iterdir()):  # a name taken meanwhile (by hand): keep both, this as previous/
        if not (out / PREVIOUS).exists():
            os.replace(staging, out / PREVIOUS)
        return
    staging.rmdir()


def commit(cfg: Config, resuming: bool) -> Path:
    """The new run takes output.dir over, once it has proven it can start: the directory is
    made and marked, the earlier run's final outputs (and, unless resuming, its checkpoints,
    metrics and TensorBoard logs) are moved into previous/, and the config that trains is
    written. Returns the dir.

    previous/ keeps the outputs of the last run that completed here (or, if none did, what
    the folder held when the first unfinished run took over): while it exists, what a later
    run that did not complete left (a stopped or failed attempt's summary, or with --fresh
    its checkpoints) is deleted instead. A previous/ beside a completed summary.json is one
    that the completed run was killed before deleting: it goes."""
    out = Path(cfg.output.dir)
    out.mkdir(parents=True, exist_ok=True)
    (out / RUN_MARKER).touch()
    restore_cut_take_over(out)
    if resuming:
        recover(out / "checkpoints")
    names = (*FINAL_OUTPUTS, "config.yaml") if resuming else RUN_OUTPUTS
    present = [n for n in names if (out / n).exists() or (out / n).is_symlink()]
    previous = out / PREVIOUS
    if previous.exists() and _summary(out).get("status") == "completed":
        shutil.rmtree(previous)
    if previous.exists():
        for name in present:
            _remove(out / name)
    elif present:
        staging = out / _STAGING
        staging.mkdir()
        for name in present:  # summary.json among them: a kill here is undone next time
            os.replace(out / name, staging / name)
        os.replace(staging, previous)  # the commit point
        fsync(out)
    for leftover in [*out.glob(".*.tmp-*"), *out.glob(".*.old-*"), *out.glob(".*.tmp.*")]:
        _remove(leftover)  # outputs a killed run was writing aside
    save_config(cfg, out / "config.yaml")
    return out


def discard_previous(out: Path) -> None:
    """A run completed here (its outputs and summary.json in place): previous/ goes."""
    shutil.rmtree(out / PREVIOUS, ignore_errors=True)
