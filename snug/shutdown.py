"""Ending a `snug` process without tearing the interpreter down.

Python's own exit frees every object of every imported module one by one: about 1.5 s after
importing torch, transformers and peft on this project's 2-core machine, 0.6 s after torch alone
(`python benchmarks/startup.py`). A command has finished its work by then, so `exit_now` does
what an exit must (waits for threads that are not daemons, runs the atexit handlers, which
include libraries' cleanup and weakref finalizers, flushes stdout and stderr) and then ends
the process with `os._exit`. Written here: no library offers this."""

from __future__ import annotations

import atexit
import os
import sys
import threading


def exit_now(code: int | None) -> None:
    for thread in threading.enumerate():
        if thread is not threading.main_thread() and not thread.daemon:
            thread.join()
    atexit._run_exitfuncs()  # the interpreter's own exit would run them here
    for stream in (sys.stdout, sys.stderr):
        try:
            stream.flush()
        except (OSError, ValueError):  # closed, or a pipe whose reader has gone
            pass
    os._exit(code if isinstance(code, int) else 0 if code is None else 1)
