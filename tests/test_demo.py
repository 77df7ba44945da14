"""The demos a fresh clone runs (`make quickstart`, `make preference-demo`): what the repo ships
for them and what the Makefile does, checked with `make -n` in a scratch folder (make decides
from the files' times; `-n` prints the commands it would run and runs none)."""

from __future__ import annotations

import os
import shutil
import subprocess
from pathlib import Path

import pytest

from conftest import ROOT

ADAPTER = "runs/quickstart/adapter/adapter_model.safetensors"
MERGED = "merged/quickstart/config.json"


def test_a_fresh_clone_holds_no_merged_model():
    """merged/ is what `snug merge` and `make preference-demo` write. A committed
    merged/quickstart made `snug merge --adapter runs/quickstart --out merged/quickstart` fail
    on a fresh clone (--out must be new) and the preference demo train on another machine's
    merge (its merge_report.json named that machine's path)."""
    assert "merged/" in (ROOT / ".gitignore").read_text().split()
    tracked = subprocess.run(
        ["git", "ls-files", "merged"], cwd=ROOT, capture_output=True, text=True, check=True
    ).stdout
    assert tracked == ""


def dry_run(tmp_path: Path, target: str, ages: dict[str, int]) -> list[str]:
    """`make -n TARGET` in a scratch folder holding the Makefile, an installed venv stamp and
    each file of `ages` (seconds old)."""
    for name in ("Makefile", "pyproject.toml"):
        shutil.copy(ROOT / name, tmp_path / name)
    stamp = tmp_path / "venv/.snug-installed"
    ages = {**ages, "venv/.snug-installed": 0}
    for name, age in ages.items():
        (tmp_path / name).parent.mkdir(parents=True, exist_ok=True)
        (tmp_path / name).write_text("")
        os.utime(tmp_path / name, (1_000_000 - age, 1_000_000 - age))
    os.utime(tmp_path / "pyproject.toml", (1_000_000 - 999, 1_000_000 - 999))
    assert stamp.exists()
    # under `make test` this runs inside make, whose variables would make this one a sub-make
    # (printing "make[1]: Entering directory" around what it would run)
    env = {k: v for k, v in os.environ.items() if k not in ("MAKELEVEL", "MAKEFLAGS", "MFLAGS")}
    done = subprocess.run(
        ["make", "-n", target, "VENV=venv"], cwd=tmp_path, capture_output=True, text=True, env=env
    )
    assert done.returncode == 0, done.stderr
    return done.stdout.splitlines()


@pytest.mark.parametrize(
    "ages,trains_quickstart,merges",
    [
        ({}, True, True),  # a fresh clone: the quickstart, its merge, the stage
        ({ADAPTER: 100}, False, True),  # the quickstart ran; nothing merged yet
        ({ADAPTER: 10, MERGED: 100}, False, True),  # the quickstart ran again since the merge
        ({ADAPTER: 100, MERGED: 10}, False, False),  # the merge is of the newest quickstart
    ],
    ids=["fresh", "not-merged", "merge-older", "merge-current"],
)
def test_preference_demo_merges_the_quickstart_when_missing_or_older(
    ages, trains_quickstart, merges, tmp_path
):
    """`make preference-demo` merges the quickstart's adapter into merged/quickstart when that
    is missing or older than the adapter, and trains the stage's example from it."""
    lines = dry_run(tmp_path, "preference-demo", ages)
    trains = [line for line in lines if "snug train examples/quickstart.yaml" in line]
    merge = [line for line in lines if "snug merge --adapter runs/quickstart" in line]
    assert bool(trains) == trains_quickstart, lines
    assert bool(merge) == merges, lines
    assert lines[-1] == "venv/bin/snug train examples/dpo.yaml"
