"""Rank processes forked from a server that has imported torch, transformers' modeling modules and
the project once, so a rank starts in a fraction of a second instead of paying ~4 s of imports.

``start(script, argv, env, log)`` returns a ``Forked`` handle with what the tests use of
``subprocess.Popen``: ``pid``, ``poll()``, ``wait(timeout)``, ``send_signal()``, ``kill()``,
``returncode``. The rank is a real process (its own pid, signals, exit status, process group
peers); only its imports are inherited. What must be a fresh interpreter (torchrun, launch scripts,
ulimit, network namespaces) keeps using ``subprocess``.

The server is multiprocessing's forkserver with ``tests.rank_preload`` preloaded; each rank's
process sets its environment, working directory, threads and output file, then runs the script as
``__main__``, as ``python script args`` would.
"""

from __future__ import annotations

import atexit
import functools
import logging
import multiprocessing
import os
import runpy
import signal
import subprocess
import sys
from pathlib import Path


@functools.cache
def _context() -> multiprocessing.context.BaseContext:
    context = multiprocessing.get_context("forkserver")
    context.set_forkserver_preload(["tests.rank_preload"])
    return context


def _run(script: str, argv: list[str], env: dict[str, str], cwd: str, log: str) -> None:
    """In the forked process: become ``python script *argv`` with ``env``, output to ``log``."""
    fd = os.open(log, os.O_WRONLY | os.O_APPEND | os.O_CREAT, 0o644)
    os.dup2(fd, 1)
    os.dup2(fd, 2)
    os.close(fd)
    sys.stdout.reconfigure(line_buffering=True)
    sys.stderr.reconfigure(line_buffering=True)
    os.environ.clear()
    os.environ.update(env)
    os.chdir(cwd)
    signal.signal(signal.SIGINT, signal.SIG_DFL)
    import torch

    # the server computed nothing with threads; a fresh interpreter would read OMP_NUM_THREADS
    if env.get("OMP_NUM_THREADS", "").isdigit():
        torch.set_num_threads(int(env["OMP_NUM_THREADS"]))
    atexit._clear()  # the server's exit handlers are not this process's
    sys.argv = [script, *argv]
    try:
        runpy.run_path(script, run_name="__main__")
    finally:
        atexit._run_exitfuncs()  # what the script registered, as interpreter exit runs it
        logging.shutdown()


class RankTimedOut(subprocess.TimeoutExpired):
    """A rank still running at its wait's timeout: the message ends with its log's last lines,
    which say where it hung (a test's temporary folder may be gone before anyone reads it)."""

    def __str__(self) -> str:
        return f"{super().__str__()}; its log ends:\n{self.output}"


class Forked:
    """A rank process forked from the server, with ``subprocess.Popen``'s ways to watch it."""

    def __init__(self, process: multiprocessing.process.BaseProcess, args: list[str], log: Path | None = None) -> None:
        self.process, self.args, self.log = process, args, log

    @property
    def pid(self) -> int:
        return self.process.pid

    @property
    def returncode(self) -> int | None:
        return self.process.exitcode  # negative: killed by that signal, as Popen says it

    def poll(self) -> int | None:
        return self.process.exitcode

    def wait(self, timeout: float | None = None) -> int:
        self.process.join(timeout)
        if self.process.exitcode is None:
            tail = self.log.read_text(errors="replace").splitlines()[-15:] if self.log and self.log.is_file() else []
            raise RankTimedOut(self.args, timeout, output="\n".join(tail))
        return self.process.exitcode

    def send_signal(self, sig: int) -> None:
        if self.process.exitcode is None:
            os.kill(self.pid, sig)

    def kill(self) -> None:
        self.send_signal(signal.SIGKILL)

    def terminate(self) -> None:
        self.send_signal(signal.SIGTERM)


def start(script: Path, argv: list[str], env: dict[str, str], cwd: Path, log: Path) -> Forked:
    """``python script *argv`` as a process forked from the preloaded server."""
    process = _context().Process(target=_run, args=(str(script), argv, env, str(cwd), str(log)), daemon=False)
    process.start()
    return Forked(process, [sys.executable, str(script), *argv], log)
