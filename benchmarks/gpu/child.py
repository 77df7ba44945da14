"""One measured run in a process of its own, for reality.py and baseline.py.

On a GPU each run is a fresh interpreter (`python SCRIPT OUTDIR --one ...`, its result printed
as a `RESULT {json}` line): CUDA must not have been initialised by a parent (a forked child
cannot use it then; bitsandbytes initialises it on import), and nothing of one run's allocator
state may reach the next. In the CPU dry run there is no CUDA, so each run is a fork of the
script's process, which imported snug, transformers, peft and the Trainer once (`preload`): a
fresh interpreter spends 5-10 s of this project's CPUs on those imports, four times a dry run.
The fork is still a process of its own (its memory, its exit), so both paths measure alike.

Written here because neither subprocess (needs an interpreter start) nor a process pool (keeps
its workers) gives one fork per run with a deadline and the child's error as text.
"""

from __future__ import annotations

import json
import multiprocessing
import os
import subprocess
import sys
import traceback
from collections.abc import Callable

# What the runs import, made once in the dry run's parent (module names).
PRELOAD = ("peft", "transformers.trainer", "snug.train.training", "snug.plan.search")


def preload() -> None:
    import importlib

    for name in PRELOAD:
        importlib.import_module(name)


def run_fresh(argv: list[str], timeout: float, cwd: str | None = None) -> dict:
    """`python ARGV` to its end; the dict its `RESULT ` line carries. Raises RuntimeError with
    the end of its output when it printed none."""
    proc = subprocess.run(
        [sys.executable, *argv],
        capture_output=True,
        text=True,
        timeout=timeout,
        env={**os.environ, "PYTHONUNBUFFERED": "1"},
        cwd=cwd,
    )
    for line in proc.stdout.splitlines():
        if line.startswith("RESULT "):
            return json.loads(line[len("RESULT ") :])
    tail = (proc.stderr or proc.stdout).strip().splitlines()[-3:]
    raise RuntimeError(" | ".join(tail)[-600:])


def run_forked(call: Callable[[], dict], timeout: float) -> dict:
    """`call()` in a fork of this process; its result. Raises RuntimeError with the child's
    error (or how it ended) when it returned none within `timeout` seconds."""
    context = multiprocessing.get_context("fork")
    receive, send = context.Pipe(duplex=False)

    def child() -> None:
        try:
            send.send(("ok", call()))
        except BaseException as e:  # noqa: BLE001 (the parent records it as the run's error)
            tail = traceback.format_exc().strip().splitlines()[-3:]
            send.send(("error", f"{type(e).__name__}: {e} | {' | '.join(tail)}"[-600:]))
        sys.stdout.flush()

    process = context.Process(target=child)
    process.start()
    send.close()
    try:
        if not receive.poll(timeout):
            process.kill()
            raise RuntimeError(f"no result within {timeout:.0f} s")
        kind, value = receive.recv()
    except EOFError:
        process.join()
        raise RuntimeError(f"the run's process ended with code {process.exitcode}") from None
    finally:
        process.join(30)  # it ends once it has sent; one that hangs instead is killed
        if process.is_alive():
            process.kill()
            process.join()
    if kind == "error":
        raise RuntimeError(value)
    return value
