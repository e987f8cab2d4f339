"""Participants on this machine, for trying a task from one notebook.

Each is a real Jupyter kernel in a directory of its own, holding its own
partition of the digits data, that joins the task in the background with
consent given (they are the author's own). They shut down when the task
ends, when ``shutdown()`` is called, or when the kernel that started them
exits (ipykernel ends a kernel whose parent died). Each kernel's own output
goes to ``kernel.log`` in its directory.
"""

from __future__ import annotations

import atexit
import os
import shutil
import tempfile
import threading
from pathlib import Path
from typing import IO

from jupyter_client import KernelManager

from ..digits import write_partitions
from .session import loaded_session

__all__ = ["LocalParticipants"]

_JOIN = """\
from fedmagic.engine.joining import start_join
fedmagic_join = start_join({url!r}, {task!r}, {token!r}, {node!r},
                           consent=lambda package: True, wait={wait!r})
"""


class LocalParticipants:
    """``count`` participant kernels for ``task_id``, each with its own digits partition.

    Args:
        url: the relay they join through (the author's embedded relay by default).
        token: the task's join token; the author's launch of ``task_id`` uses it too.
        data_dir: where each party's data goes, relative to its directory; the
            author's own test data is put there in the current directory too.
        wait: seconds each participant waits for the task to start.
    """

    def __init__(
        self,
        task_id: str,
        count: int,
        url: str,
        token: str,
        *,
        split: str = "iid",
        data_dir: str = "demo_task/data",
        workdir: str | os.PathLike[str] | None = None,
        wait: float = 600.0,
    ) -> None:
        self.task_id = task_id
        self._own_workdir = workdir is None  # removed at shutdown
        self.workdir = Path(workdir or tempfile.mkdtemp(prefix="fedmagic-local-"))
        layout = write_partitions(self.workdir, count, split=split, data_dir=data_dir)
        if not Path(data_dir).exists():
            shutil.copytree(layout.initiator.data_dir, data_dir)
        self.nodes = [party.name for party in layout.nodes]
        self.managers: list[KernelManager] = []
        self._stopped = threading.Event()
        self._lock = threading.Lock()  # shutdown() runs from the watcher and from users
        self._logs: list[IO[bytes]] = []
        atexit.register(self.shutdown)
        try:
            for party in layout.nodes:
                manager = KernelManager(kernel_name="python3")
                log = open(party.workdir / "kernel.log", "wb")  # not into the author's cell
                self._logs.append(log)
                manager.start_kernel(
                    cwd=str(party.workdir),
                    stdout=log,
                    stderr=log,
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
        threading.Thread(
            target=self._shutdown_when_task_ends, daemon=True, name=f"fedmagic-local-{task_id}"
        ).start()

    def alive(self) -> list[bool]:
        return [manager.is_alive() for manager in self.managers]

    def shutdown(self) -> None:
        """Stop every participant kernel and remove their directory (harmless twice)."""
        self._stopped.set()
        with self._lock:
            for manager in self.managers:
                if manager.has_kernel:
                    manager.shutdown_kernel(now=True)
            for log in self._logs:
                log.close()
            if self._own_workdir:
                shutil.rmtree(self.workdir, ignore_errors=True)

    def _shutdown_when_task_ends(self) -> None:
        while not self._stopped.wait(0.5):
            run = loaded_session(create=True).tasks.get(self.task_id)
            if run is not None and run.done():
                self.shutdown()

    def __repr__(self) -> str:
        alive = sum(self.alive())
        return (
            f"<LocalParticipants for task {self.task_id!r}: {', '.join(self.nodes)} "
            f"({alive} running) in {self.workdir}>"
        )
