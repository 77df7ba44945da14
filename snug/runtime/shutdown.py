"""Ending a `snug` process without tearing the interpreter down.

Python's own exit frees every object of every imported module one by one: about 1.5 s after
importing torch, transformers and peft on this project's 2-core machine, 0.6 s after torch alone
(`python benchmarks/startup.py`). A command has finished its work by then, so `exit_now` does
what an exit must in the order Python's does (threading's shutdown: its exit hooks, which stop
idle `concurrent.futures` workers, then a join of every thread that is not a daemon, including
those started meanwhile; the atexit handlers, which include libraries' cleanup and weakref
finalizers; stdout and stderr flushed, then the C library's own buffers, which `os._exit`
would drop: NCCL's and bitsandbytes' messages written with C stdio) and then ends the process
with `os._exit`. C++ static destructors do not run. Written here: no library offers this."""

from __future__ import annotations

import atexit
import ctypes
import faulthandler
import os
import signal
import sys
import threading


def stacks_on_request() -> None:
    """`kill -USR1 PID` makes this process print every thread's Python stack to its stderr and
    go on (a run that seems stuck: where is each rank?). The standard library's faulthandler,
    which writes from its own C handler, so it answers even while a thread holds the GIL."""
    if hasattr(signal, "SIGUSR1"):
        try:
            faulthandler.register(signal.SIGUSR1, file=sys.stderr, all_threads=True)
        except (AttributeError, OSError, RuntimeError, ValueError):  # no stderr, or no descriptor
            pass


def exit_now(code: int | None) -> None:
    shutdown = getattr(threading, "_shutdown", None)  # what Py_FinalizeEx calls first
    if shutdown is not None:
        shutdown()
    else:
        for thread in threading.enumerate():
            if thread is not threading.main_thread() and not thread.daemon:
                thread.join()
    atexit._run_exitfuncs()  # the interpreter's own exit runs them next
    for stream in (sys.stdout, sys.stderr):
        try:
            stream.flush()
        except (AttributeError, OSError, ValueError):  # None (closed at start), closed, or gone
            pass
    try:
        ctypes.CDLL(None).fflush(None)  # every C stdio stream
    except (AttributeError, OSError):
        pass
    os._exit(code if isinstance(code, int) else 0 if code is None else 1)
