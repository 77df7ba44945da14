"""`snug` commands in processes of their own that skip the ~10 s of imports a fresh
`python -m snug.cli` spends on this machine's CPU: each is forked from a server process that
imported snug, torch and transformers once (multiprocessing's forkserver), so it starts clean,
as a new process would, only faster. It is a real process: killed for real by a signal, with
its own stdout and stderr, which it and every process it starts (torchrun, ranks) share.

Written here because subprocess needs an executable and multiprocessing gives no pipes that
children of the child inherit; the server itself is the standard library's."""

from __future__ import annotations

import multiprocessing
import os
import signal
import subprocess
import sys
import tempfile
import threading
import time
from pathlib import Path

PRELOAD = ["snug.cli", "snug.train.training", "snug.plan.simulate", "snug.deploy.session"]
_context = None


def _server():
    global _context
    if _context is None:
        _context = multiprocessing.get_context("forkserver")
        _context.set_forkserver_preload(PRELOAD)
    return _context


def _on_terminal(path: str) -> None:
    """In the child: a session of its own whose controlling terminal is the pseudo-terminal at
    `path`, as stdin, stdout and stderr, so Ctrl-C typed on it sends SIGINT; and SIGINT raises
    KeyboardInterrupt, as in a Python started from a login shell (a test runner started in the
    background by a non-interactive shell ignores SIGINT, and children inherit that)."""
    import fcntl
    import termios

    os.setsid()
    fd = os.open(path, os.O_RDWR)
    fcntl.ioctl(fd, termios.TIOCSCTTY, 0)
    for target in (0, 1, 2):
        os.dup2(fd, target)
    os.close(fd)
    sys.stdin = open(0, buffering=1, closefd=False)  # noqa: SIM115
    signal.signal(signal.SIGINT, signal.default_int_handler)


def _child(
    argv: list[str],
    script: str | None,
    env: dict[str, str],
    cwd: str,
    fifos: list[str],
    terminal: str | None,
) -> None:
    """In the forked process: the caller's environment, directory and output pipes (or the
    pseudo-terminal `terminal`), then `snug ARGV` (or `script`, which ends by calling it);
    exits with its status."""
    code = 1
    try:
        os.environ.clear()
        os.environ.update(env)
        os.chdir(cwd)
        if terminal is not None:
            _on_terminal(terminal)
        for fd, path in zip((1, 2), fifos, strict=False):  # no fifos on a terminal
            w = os.open(path, os.O_WRONLY)
            os.dup2(w, fd)
            os.close(w)
        sys.stdout = open(1, "w", buffering=1, closefd=False)  # noqa: SIM115
        sys.stderr = open(2, "w", buffering=1, closefd=False)  # noqa: SIM115
        from snug.runtime.shutdown import stacks_on_request

        stacks_on_request()  # as the snug command does
        if "PYTEST_XDIST_WORKER" in env:  # one core's worth of threads, as conftest.py sets
            import torch

            torch.set_num_threads(1)
        sys.argv = ["snug", *argv]
        if script is not None:
            exec(script, {"__name__": "__main__"})
            code = 0
        else:
            from snug.cli import main

            code = main(argv)
    except SystemExit as e:
        code = e.code if isinstance(e.code, int) else (0 if e.code is None else 1)
    except BaseException:  # noqa: BLE001 (reported as a crashed process would be)
        import traceback

        traceback.print_exc()
    finally:
        sys.stdout.flush()
        sys.stderr.flush()
        os._exit(code)


class Forked:
    """`snug ARGV` (or `script` with sys.argv = ["snug", *ARGV]) in a process of its own, with
    `env` added to this process's environment, started in this process's current directory (as
    a subprocess would be); used like `subprocess.Popen` with pipes: `poll()`,
    `send_signal()`, `communicate(timeout)` -> (stdout, stderr) once the process and every
    process it started have closed them, then `returncode` (minus the signal number when a
    signal ended it). With `terminal` (the path of a pseudo-terminal's child end) it runs on
    that terminal instead of pipes, as in a terminal window: `communicate` then waits only."""

    def __init__(
        self, argv: list[str], script: str | None = None, terminal: str | None = None, **env: str
    ) -> None:
        self._dir = tempfile.mkdtemp(prefix="snug-forked-")
        names = () if terminal else ("stdout", "stderr")
        self._fifos = fifos = [str(Path(self._dir) / name) for name in names]
        for path in fifos:
            os.mkfifo(path)
        self._texts: list[list[bytes]] = [[], []]
        self._readers = [
            threading.Thread(target=self._drain, args=(path, chunks), daemon=True)
            for path, chunks in zip(fifos, self._texts[: len(fifos)], strict=True)
        ]
        for reader in self._readers:
            reader.start()
        self._process = _server().Process(
            target=_child,
            args=(
                [str(a) for a in argv],
                script,
                {**os.environ, **env},
                os.getcwd(),
                fifos,
                terminal,
            ),
        )
        self._process.start()
        self.pid = self._process.pid
        self.returncode: int | None = None

    @staticmethod
    def _drain(path: str, chunks: list[bytes]) -> None:
        with open(path, "rb", buffering=0) as f:  # blocks until the child opens it
            while chunk := f.read(65536):
                chunks.append(chunk)

    def poll(self) -> int | None:
        if self.returncode is None and not self._process.is_alive():
            self.returncode = self._process.exitcode
        return self.returncode

    def send_signal(self, sig: int) -> None:
        os.kill(self.pid, sig)

    def stderr_so_far(self) -> str:
        return b"".join(self._texts[1]).decode(errors="replace")

    def _holders(self) -> list[int]:
        """The processes other than this one with one of the output pipes open."""
        targets = set(self._fifos)
        found = []
        for entry in Path("/proc").iterdir():
            if not entry.name.isdigit() or int(entry.name) == os.getpid():
                continue
            try:
                if any(os.readlink(fd) in targets for fd in (entry / "fd").iterdir()):
                    found.append(int(entry.name))
            except OSError:  # gone meanwhile, or not ours to read
                continue
        return found

    def _stop_holders(self) -> str:
        """What is still holding the output open (command line, state, kernel wait, and each
        thread's Python stack: snug's processes print them on SIGUSR1), then SIGKILL to it, so
        that a test that timed out says where and leaves nothing running."""
        lines = []
        holders = self._holders()
        for pid in holders:
            try:
                proc = Path("/proc") / str(pid)
                cmd = (proc / "cmdline").read_bytes().replace(b"\0", b" ").decode(errors="replace")
                state = next(
                    line
                    for line in (proc / "status").read_text().splitlines()
                    if line.startswith("State:")
                )
                wchan = (proc / "wchan").read_text()
                lines.append(f"pid {pid}: {cmd.strip()} ({state}, waiting in {wchan or '-'})")
                os.kill(pid, signal.SIGUSR1)
            except (OSError, StopIteration):
                continue
        time.sleep(1)  # the stacks reach the pipes (faulthandler writes from its handler)
        for pid in holders:
            try:
                os.kill(pid, signal.SIGKILL)
            except OSError:
                pass
        time.sleep(0.5)
        err = self.stderr_so_far()
        return "\n".join(["still running:", *lines, "stderr's end:", err[-8000:]])

    def communicate(self, timeout: float = 300) -> tuple[str, str]:
        deadline = time.monotonic() + timeout
        while self.poll() is None:
            if time.monotonic() > deadline:
                report = self._stop_holders()
                os.kill(self.pid, signal.SIGKILL)
                self._process.join()
                raise LeftRunning(["forked"], timeout, report)
            time.sleep(0.05)
        # EOF once whatever the process started has ended too. A reader still waiting in open()
        # (the child died before opening its end) is let through by a writer that opens and
        # closes at once; no reader yet or any more: ENXIO.
        for path, reader in zip(self._fifos, self._readers, strict=True):
            while reader.is_alive():
                if time.monotonic() > deadline:
                    report = self._stop_holders()
                    raise LeftRunning(["forked (its children)"], timeout, report)
                try:
                    os.close(os.open(path, os.O_WRONLY | os.O_NONBLOCK))
                except OSError:
                    pass
                reader.join(0.05)
        for path in self._fifos:
            os.unlink(path)
        os.rmdir(self._dir)
        return tuple(b"".join(t).decode(errors="replace") for t in self._texts)


class LeftRunning(subprocess.TimeoutExpired):
    """A command (or what it started) still running at its deadline, with what held it."""

    def __init__(self, cmd: list[str], timeout: float, report: str) -> None:
        super().__init__(cmd, timeout)
        self.report = report

    def __str__(self) -> str:
        return f"{super().__str__()}\n{self.report}"


def run_forked(
    argv: list[str], script: str | None = None, timeout: float = 300, **env: str
) -> subprocess.CompletedProcess:
    """`Forked(argv, script, **env)` to its end, as `subprocess.run` reports it."""
    child = Forked(argv, script, **env)
    out, err = child.communicate(timeout)
    return subprocess.CompletedProcess(["snug", *argv], child.returncode, out, err)
