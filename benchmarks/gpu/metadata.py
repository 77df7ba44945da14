"""Write snug's package metadata (name, version, entry points) into a folder, for a machine that
runs snug from this source folder without installing it (the GPU kit on a device whose image
lacks the project's .venv): the registry's door (snug/core/registry.py) finds snug's own methods
and stages through the `snug.plugins` entry point that pyproject.toml declares, which Python's
importlib.metadata reads from a `*.dist-info` folder on sys.path.

usage: python benchmarks/gpu/metadata.py FOLDER     (then put FOLDER on PYTHONPATH)

Written here rather than `pip install --target`: that builds a wheel, which needs the build
backend (setuptools) the device image may lack, offline."""

from __future__ import annotations

import re
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent.parent


def entry_points(pyproject: str) -> str:
    """pyproject's [project.scripts] and [project.entry-points."GROUP"] tables, as the
    entry_points.txt of a dist-info folder writes them."""
    out = []
    for header, body in re.findall(
        r"^\[(project\.[^\]]+)\]\n(.*?)(?=^\[|\Z)", pyproject, re.M | re.S
    ):
        if header == "project.scripts":
            group = "console_scripts"
        elif header.startswith("project.entry-points."):
            group = header.removeprefix("project.entry-points.").strip('"')
        else:
            continue
        lines = [line.replace(" = ", "=").replace('"', "") for line in body.splitlines()]
        out += [
            f"[{group}]",
            *[line for line in lines if "=" in line and not line.startswith("#")],
            "",
        ]
    return "\n".join(out)


def main(folder: str) -> None:
    pyproject = (ROOT / "pyproject.toml").read_text(encoding="utf-8")
    version = re.search(r'^version = "([^"]+)"', pyproject, re.M).group(1)
    info = Path(folder) / f"snug-{version}.dist-info"
    info.mkdir(parents=True, exist_ok=True)
    (info / "METADATA").write_text(f"Metadata-Version: 2.1\nName: snug\nVersion: {version}\n")
    (info / "entry_points.txt").write_text(entry_points(pyproject))


if __name__ == "__main__":
    main(sys.argv[1])
