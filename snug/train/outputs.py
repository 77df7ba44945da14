"""Who owns output.dir, and when a new run may replace what an earlier one left there.

Nothing of an earlier run is removed, and nothing is written, until the new run has proven it
can start: config checked, model and data found and loaded, the checkpoint (when resuming)
read back into memory, the first optimizer step done. Only then does `commit` take the
directory over; every output after
that is written aside and renamed into place. So a run that fails before its first optimizer
step leaves every file byte-identical. Pure file handling, no torch: the command line runs
`check_output_dir` before the heavy imports.
"""

from __future__ import annotations

import os
import re
import shutil
from pathlib import Path

from snug.config import Config, save_config
from snug.errors import UserError
from snug.paths import is_inside

RUN_MARKER = ".snug-run"  # marks a directory as a snug run, so a new run may replace its outputs
FINAL_OUTPUTS = ("adapter", "model", "loss.png", "summary.json")  # what a run ends with
RUN_OUTPUTS = (*FINAL_OUTPUTS, "checkpoints", "tensorboard", "metrics.jsonl", "config.yaml")
COMPLETE = "COMPLETE"  # a checkpoint's completion marker, written last
_STEP = re.compile(r"^step-(\d+)$")


class OutputDirError(UserError):
    """output.dir is not ours to write, or the run would overwrite its own inputs."""


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
    if out.is_dir() and any(out.iterdir()) and not (out / RUN_MARKER).exists():
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
            for name in RUN_OUTPUTS:
                if is_inside(value, out / name):
                    raise OutputDirError(
                        f"{key}={value} lies inside output.dir={out}, whose {name} this run "
                        f"replaces; copy it out of {out} first (e.g. to {out.parent}/"
                        f"{out.name}-{name}) or choose another output.dir."
                    )


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


def prune(root: Path, keep_last: int) -> None:
    for old in complete_checkpoints(root)[:-keep_last] if keep_last > 0 else []:
        shutil.rmtree(old)
    for stale in [*root.glob(".tmp-step-*"), *root.glob(".old-step-*")]:
        shutil.rmtree(stale, ignore_errors=True)


def _remove(path: Path) -> None:
    if path.is_dir():
        shutil.rmtree(path)
    elif path.exists() or path.is_symlink():
        path.unlink()


def commit(cfg: Config, resuming: bool) -> Path:
    """The new run takes output.dir over, once it has proven it can start: the directory is
    made and marked, the earlier run's final outputs go (and, unless resuming, its checkpoints,
    metrics and TensorBoard logs), and the config that trains is written. Returns the dir."""
    out = Path(cfg.output.dir)
    out.mkdir(parents=True, exist_ok=True)
    (out / RUN_MARKER).touch()
    if resuming:
        recover(out / "checkpoints")
    for name in FINAL_OUTPUTS if resuming else RUN_OUTPUTS:
        _remove(out / name)
    for leftover in out.glob(".*.tmp-*"):  # outputs a killed run was writing aside
        _remove(leftover)
    save_config(cfg, out / "config.yaml")
    return out
