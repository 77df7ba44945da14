"""Write tests/slow.txt: the tests that took at least THRESHOLD seconds (setup, call and teardown
together) in a pytest run's `--durations=0` output, one node id a line. conftest.py marks them
`slow`, so that `make test-fast` (-m "not slow") leaves them out; `make test` runs them all.

Run: .venv/bin/python -m pytest -n 2 --dist loadfile -o addopts="" -q --durations=0 > LOG
     .venv/bin/python scripts/slow_tests.py LOG [THRESHOLD]   (default 1 second)
"""

from __future__ import annotations

import re
import sys
from collections import defaultdict
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent


def main(log: str, threshold: float = 1.0) -> None:
    seconds: dict[str, float] = defaultdict(float)
    for line in Path(log).read_text().splitlines():
        m = re.match(r"^([0-9.]+)s (setup|call|teardown)\s+(\S+)$", line)
        if m:
            seconds[m.group(3)] += float(m.group(1))
    slow = sorted(node for node, s in seconds.items() if s >= threshold)
    header = (
        f"# tests that took >= {threshold:g} s in a full run (scripts/slow_tests.py); "
        "conftest.py marks them slow\n"
    )
    (ROOT / "tests/slow.txt").write_text(header + "".join(f"{n}\n" for n in slow))
    total = sum(seconds.values())
    print(
        f"{len(slow)} of {len(seconds)} timed tests marked slow: {sum(seconds[n] for n in slow):.0f} of {total:.0f} s"
    )


if __name__ == "__main__":
    main(sys.argv[1], *(float(a) for a in sys.argv[2:3]))
