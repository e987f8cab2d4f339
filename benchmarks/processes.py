"""What benchmarks that run trials as processes share: no process a trial leaves behind
escapes the count, or the machine."""

from __future__ import annotations

import contextlib
import ctypes
import os
import time

import psutil

PR_SET_CHILD_SUBREAPER = 36


def set_child_subreaper() -> bool:
    """Become the parent of any process a trial orphans, so none escapes the count."""
    with contextlib.suppress(Exception):
        return ctypes.CDLL(None, use_errno=True).prctl(PR_SET_CHILD_SUBREAPER, 1, 0, 0, 0) == 0
    return False


def reap() -> None:
    """Collect the exit status of every child that has ended."""
    with contextlib.suppress(ChildProcessError):
        while os.waitpid(-1, os.WNOHANG)[0]:
            pass


def living_children() -> list[psutil.Process]:
    """This process's descendants that still run (zombies, dead but not yet reaped, do not)."""
    alive = []
    for process in psutil.Process().children(recursive=True):
        with contextlib.suppress(psutil.Error):
            if process.status() != psutil.STATUS_ZOMBIE:
                alive.append(process)
    return alive


def describe(process: psutil.Process) -> str:
    with contextlib.suppress(psutil.Error):
        return f"{process.pid} {process.name()}: {' '.join(process.cmdline())[:160]}"
    return f"{process.pid} (gone)"


def orphans(grace: float) -> list[str]:
    """Processes still here (reparented to this one) ``grace`` seconds after a trial's process
    exited: described, then ended by their pid."""
    deadline = time.monotonic() + grace
    while True:
        reap()
        alive = living_children()
        if not alive or time.monotonic() > deadline:
            break
        time.sleep(0.2)
    found = [describe(process) for process in alive]
    for process in alive:
        with contextlib.suppress(psutil.Error):
            process.kill()
    reap()
    return found
