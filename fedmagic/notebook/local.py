"""Participants on this machine, for trying a task from one notebook.

Each is a real Jupyter kernel in a directory of its own, holding its own
partition of the digits data, that joins the task in the background with
consent given (they are the author's own). Their data goes where the task
reads it: ``<name>/data``, the task's name being known once it launches.
They shut down as the task ends (before its ``wait()`` returns), when
``shutdown()`` is called, or when the kernel that started them exits
(ipykernel ends a kernel whose parent died). Each kernel's own output goes
to ``kernel.log`` in its directory.
"""

from __future__ import annotations

import atexit
import logging
import os
import shutil
import tempfile
import threading
from pathlib import Path
from typing import IO, Callable

from jupyter_client import KernelManager

from ..digits import write_partitions
from ..engine.launch import TaskRun

__all__ = ["LocalParticipants"]

log = logging.getLogger("fedmagic")

_JOIN = """\
from fedmagic.engine.joining import start_join
fedmagic_join = start_join({url!r}, {task!r}, {token!r}, {node!r},
                           consent=lambda package: True, wait={wait!r})
"""
#: Where the digits are written in each directory until the task says where it reads them.
_DIGITS = "digits"


class LocalParticipants:
    """``count`` participant kernels for ``task_id``, each with its own digits partition.

    Args:
        url: the relay they join through.
        token: the task's join token; the author's launch of ``task_id`` uses it too.
        data_dir: where each party's data goes, relative to its directory (the
            author's test data goes there in the current directory too); by
            default ``<name>/data`` of the task that launches, as
            ``fedmagic.examples`` and the tutorials read it.
        wait: seconds each participant waits for the task to start.
        on_shutdown: called once they have all shut down.
    """

    def __init__(
        self,
        task_id: str,
        count: int,
        url: str,
        token: str,
        *,
        split: str = "iid",
        data_dir: str | None = None,
        workdir: str | os.PathLike[str] | None = None,
        wait: float = 600.0,
        on_shutdown: Callable[[], None] | None = None,
    ) -> None:
        self.task_id = task_id
        self.url = url
        self._own_workdir = workdir is None  # removed at shutdown
        self.workdir = Path(workdir or tempfile.mkdtemp(prefix="fedmagic-local-"))
        self._data_dir = data_dir
        self._layout = write_partitions(
            self.workdir, count, split=split, data_dir=data_dir or _DIGITS
        )
        if data_dir is not None:
            self._place_test_data(data_dir)
        self.nodes = [party.name for party in self._layout.nodes]
        self.managers: list[KernelManager] = []
        self._stopped = False
        self._on_shutdown = on_shutdown
        self._lock = threading.Lock()  # shutdown() runs on a task's thread and from users
        self._logs: list[IO[bytes]] = []
        atexit.register(self.shutdown)
        try:
            for party in self._layout.nodes:
                manager = KernelManager(kernel_name="python3")
                log_file = open(party.workdir / "kernel.log", "wb")  # not into the author's cell
                self._logs.append(log_file)
                manager.start_kernel(
                    cwd=str(party.workdir),
                    stdout=log_file,
                    stderr=log_file,
                    env={**os.environ, "OMP_NUM_THREADS": "1"},
                )
                self.managers.append(manager)
                client = manager.client()
                client.start_channels()
                try:
                    client.wait_for_ready(timeout=60)
                    client.execute(
                        _JOIN.format(url=url, task=task_id, token=token, node=party.name, wait=wait)
                    )
                finally:
                    client.stop_channels()
        except BaseException:
            self.shutdown()
            raise

    @property
    def running(self) -> bool:
        """Whether they are up: started, and not shut down yet."""
        return not self._stopped

    def alive(self) -> list[bool]:
        return [manager.is_alive() for manager in self.managers]

    def follow(self, run: TaskRun, name: str) -> None:
        """Take part in ``run``: put the data where task ``name`` reads it; end with the run."""
        if self._data_dir is None:
            where = Path(name) / "data"
            for party in self._layout.nodes:
                _link(party.workdir / where, party.data_dir)
            self._place_test_data(str(where))
            log.info(
                "%d participants on this machine hold their digits in %s, in directories under %s",
                len(self.nodes),
                where,
                self.workdir,
            )

        def end_with_the_run(_event: str) -> None:
            if run.done():
                self.shutdown()

        run.subscribe(end_with_the_run)
        if run.done():
            self.shutdown()

    def shutdown(self) -> None:
        """Stop every participant kernel and remove their directory (harmless twice)."""
        with self._lock:
            if self._stopped:
                return
            self._stopped = True
            for manager in self.managers:
                if manager.has_kernel:
                    manager.shutdown_kernel(now=True)
            for log_file in self._logs:
                log_file.close()
            if self._own_workdir:
                shutil.rmtree(self.workdir, ignore_errors=True)
        atexit.unregister(self.shutdown)
        if self._on_shutdown is not None:
            self._on_shutdown()

    def _place_test_data(self, data_dir: str) -> None:
        """Put the author's test set in ``data_dir`` here, unless something is there."""
        if not Path(data_dir).exists():
            shutil.copytree(self._layout.initiator.data_dir, data_dir)

    def __repr__(self) -> str:
        state = f"{sum(self.alive())} running" if self.running else "shut down"
        return (
            f"<LocalParticipants for task {self.task_id!r}: {', '.join(self.nodes)} "
            f"({state}) at {self.url}, in {self.workdir}>"
        )


def _link(path: Path, target: Path) -> None:
    """Make ``path`` lead to ``target`` (a symbolic link, or a copy where links fail)."""
    if path.exists() or path.is_symlink():
        return
    path.parent.mkdir(parents=True, exist_ok=True)
    try:
        path.symlink_to(target, target_is_directory=True)
    except OSError:
        shutil.copytree(target, path)
