"""How long a command keeps quiet: run it, time-stamp each line of its stdout and stderr, and
print the longest stretch without a line (issue 33: every wait over 2 seconds says something).

    python benchmarks/silence.py snug plan --model Qwen/Qwen2.5-7B --gpu "RTX 4090" --search
"""

from __future__ import annotations

import subprocess
import sys
import threading
import time


def main(argv: list[str]) -> int:
    started = time.monotonic()
    lines: list[tuple[float, str, str]] = []
    proc = subprocess.Popen(argv, stdout=subprocess.PIPE, stderr=subprocess.PIPE)

    def read(stream, name: str) -> None:
        for line in iter(stream.readline, b""):
            text = line.decode(errors="replace").rstrip()
            lines.append((time.monotonic() - started, name, text))

    readers = [
        threading.Thread(target=read, args=(proc.stdout, "out")),
        threading.Thread(target=read, args=(proc.stderr, "err")),
    ]
    for r in readers:
        r.start()
    proc.wait()
    for r in readers:
        r.join()
    ended = time.monotonic() - started
    lines.sort()
    for t, name, text in lines:
        print(f"{t:7.1f} {name} {text[:150]}")
    marks = [0.0, *(t for t, _, _ in lines), ended]
    gap, at = max((b - a, a) for a, b in zip(marks, marks[1:], strict=False))
    print(
        f"exit {proc.returncode}; {ended:.1f} s in all; {len(lines)} lines; longest silence "
        f"{gap:.1f} s (from {at:.1f} s)"
    )
    return proc.returncode


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
