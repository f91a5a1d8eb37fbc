"""`python -m engine.run` for the tests, forked from a process that has already imported torch, MONAI and the
engine.

A new interpreter spends ~8 s of CPU importing them (2-core AVX2-only EPYC, 2026-12-01), and the suite started
dozens of runs whose process boundary is not what they test. multiprocessing's forkserver (one per pytest worker,
started by the first run) imports them once; each run is forked from that single-threaded process and is still a
process of its own: its own pid, exit code, signals, environment, working directory, stdout and stderr, entered
through `engine.run.console()` as `python -m engine.run` is. What it does not repeat is the imports, so tests of
start-up itself, of the interpreter (a sitecustomize hook), of torchrun or of a pod's command keep real processes.
"""

from __future__ import annotations

import atexit
import io
import multiprocessing
import os
import signal
import subprocess
import sys
import tempfile
import threading
import time
import weakref
from pathlib import Path

# What `engine.run` imports for each command, in the forkserver; each run then imports only what these did not.
PRELOAD = ["engine.run", "engine.data.prepare", "engine.data.sharing", "engine.serving.evaluation",
           "engine.serving.export", "engine.serving.inference", "engine.training.workflow", "engine.training.build",
           "engine.experiments.cv", "engine.experiments.sweep"]
_context = multiprocessing.get_context("forkserver")
_context.set_forkserver_preload(PRELOAD)
_started: weakref.WeakSet = weakref.WeakSet()


@atexit.register  # after multiprocessing's own exit handler is registered, so before it joins (waits for) them
def _kill_leftovers() -> None:
    """A run a failed test left running is killed when its pytest worker ends, not waited for."""
    for run in list(_started):
        run.kill()


def _enter(argv: list[str], cwd: str, env: dict, out: str, err: str) -> None:
    """In the forked process: `python -m engine.run ARGV` in `cwd` with `env`, stdout and stderr to files."""
    os.chdir(cwd)
    os.environ.clear()
    os.environ.update(env)
    for fd, path in ((1, out), (2, err)):
        target = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_APPEND)
        os.dup2(target, fd)
        os.close(target)
    sys.stdout = sys.__stdout__ = io.TextIOWrapper(io.FileIO(1, "w", closefd=False), encoding="utf-8",
                                                   line_buffering=True)
    sys.stderr = sys.__stderr__ = io.TextIOWrapper(io.FileIO(2, "w", closefd=False), encoding="utf-8",
                                                   errors="backslashreplace", line_buffering=True)
    from engine import run

    sys.argv = [run.__file__, *argv]
    run.console()  # ends the process with the command's exit code (os._exit)


class Forked:
    """A forked `python -m engine.run`, with the part of subprocess.Popen the tests use: pid, poll, wait,
    communicate, send_signal, kill, returncode, and `stdout` and `stderr` as lines that follow the run's output
    until it ends. `merged`: stderr goes where stdout goes (Popen's stderr=STDOUT), and `stderr` is None."""

    def __init__(self, argv: list[str], cwd: Path, env: dict, merged: bool = False):
        self._folder = tempfile.TemporaryDirectory(prefix="ct3d-forked-")
        self.out, self.err = (os.path.join(self._folder.name, name) for name in ("stdout", "stderr"))
        if merged:
            self.err = self.out
        for path in {self.out, self.err}:
            open(path, "w").close()
        self.args = argv
        self._lock = threading.Lock()
        self._process = _context.Process(target=_enter, args=(argv, str(cwd), dict(env), self.out, self.err))
        self._process.start()
        self.pid = self._process.pid
        _started.add(self)
        self.stdout = self._follow(self.out)
        self.stderr = None if merged else self._follow(self.err)

    @property
    def returncode(self) -> int | None:
        return self.poll()

    def poll(self) -> int | None:
        with self._lock:  # multiprocessing's Popen reads the exit code once, from a pipe: one reader at a time
            return self._process.exitcode

    def wait(self, timeout: float | None = None) -> int:
        deadline = None if timeout is None else time.monotonic() + timeout
        while self.poll() is None:
            if deadline is not None and time.monotonic() > deadline:
                raise subprocess.TimeoutExpired(self.args, timeout)
            time.sleep(0.02)
        return self.poll()

    def send_signal(self, signum: int) -> None:
        if self.poll() is None:
            os.kill(self.pid, signum)

    def kill(self) -> None:
        self.send_signal(signal.SIGKILL)

    def output(self) -> tuple[str, str]:
        """Everything the run wrote to stdout and stderr so far (merged: both in the first, the second empty)."""
        out, err = (Path(p).read_text(encoding="utf-8", errors="replace") for p in (self.out, self.err))
        return (out, "") if self.err == self.out else (out, err)

    def communicate(self, timeout: float | None = None) -> tuple[str, str]:
        self.wait(timeout)
        return self.output()

    def _follow(self, path: str):
        with open(path, encoding="utf-8", errors="replace") as f:
            pending = ""
            while True:
                ended = self.poll() is not None  # before reading: what it wrote before it ended is read below
                pending += f.read()
                *lines, pending = pending.split("\n")
                yield from (line + "\n" for line in lines)
                if ended:
                    if pending:
                        yield pending
                    return
                time.sleep(0.02)


def forked_run(argv: list[str], cwd: Path, env: dict, timeout: float = 600) -> subprocess.CompletedProcess:
    """subprocess.run(`python -m engine.run ARGV`, capture_output=True, text) for a forked run."""
    proc = Forked(argv, cwd, env)
    try:
        proc.wait(timeout)
    except subprocess.TimeoutExpired:
        proc.kill()
        proc.wait()
        raise
    out, err = proc.output()
    return subprocess.CompletedProcess(argv, proc.returncode, out, err)
