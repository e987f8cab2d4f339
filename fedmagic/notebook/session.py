"""One kernel's fedmagic: the tasks it runs and joined, and what its cells registered.

``%load_ext fedmagic`` makes the session and hands it to the magics and the
JupyterLab bridge; ``fedmagic.running_task(task_id)`` finds a task through it.
The engine knows nothing of it: a ``%%fedavg_task`` cell runs under a
:class:`~fedmagic.engine.context.CodeContext` whose ``launch`` is the
session's, which starts the task in the background and keeps it here, so a
re-run cell finds its task instead of starting a second one.
"""

from __future__ import annotations

import logging
import os
import threading
from typing import TYPE_CHECKING, Any, Callable

from ..engine.context import CodeContext
from ..engine.launch import TaskRun, start_embedded_relay, start_task
from ..engine.scheduler import Scheduler
from ..wire.relay import EmbeddedRelay

if TYPE_CHECKING:
    from .local import LocalParticipants
    from .panel import ParticipantPanel

__all__ = ["KernelSession", "loaded_session"]

log = logging.getLogger("fedmagic")


class KernelSession:
    """What one kernel's fedmagic holds.

    Attributes:
        tasks: the tasks this kernel started, by task id.
        joined: the tasks it joined as a data owner (their panels), by task id.
        verify_classes: the ``DatasetVerify`` class a ``%%dataset_verify``
            cell registered for each task id.
        join_tokens: join tokens chosen before a task's launch (local
            participants already hold them).
        local: the participant kernels ``%fedavg_local`` started, by task id.
        task_cells: the ``%%fedavg_task`` cell that launched each task, as
            ``(source, filename)``: what ``%fedavg_simulate`` runs again.
    """

    def __init__(self) -> None:
        self.tasks: dict[str, TaskRun] = {}
        self.joined: dict[str, ParticipantPanel] = {}
        self.verify_classes: dict[str, type] = {}
        self.join_tokens: dict[str, str] = {}
        self.local: dict[str, LocalParticipants] = {}
        self.task_cells: dict[str, tuple[str, str]] = {}
        self.last_task_cell: tuple[str, str] | None = None
        self._watchers: list[Callable[[], None]] = []
        self._relay: EmbeddedRelay | None = None
        self._relay_lock = threading.Lock()

    def relay_url(self) -> str:
        """Where this kernel's tasks and local participants meet.

        ``$FEDMAGIC_RELAY`` if set; else a relay embedded in this kernel,
        started on first use and stopped once no task or local participant
        of this kernel needs it.
        """
        url = os.environ.get("FEDMAGIC_RELAY")
        if url:
            return url
        with self._relay_lock:
            if self._relay is None:
                self._relay = start_embedded_relay()
            return self._relay.url

    def release_relay(self) -> None:
        """Stop the embedded relay if nothing of this kernel uses it any more."""
        with self._relay_lock:
            busy = any(not run.done() for run in self.tasks.values()) or any(
                group.running for group in self.local.values()
            )
            if self._relay is not None and not busy:
                relay, self._relay = self._relay, None
                relay.stop()

    def add_local(self, group: LocalParticipants) -> None:
        """Keep ``group``; it takes part in the next launch of its task (or the running one)."""
        old = self.local.get(group.task_id)
        if old is not None and old.running:
            log.info("shutting down the earlier participants of task %r", group.task_id)
            old.shutdown()
        self.local[group.task_id] = group
        running = self.tasks.get(group.task_id)
        if running is not None and not running.done():
            group.follow(running, running.name)

    def task(self, task_id: str) -> TaskRun:
        """The task this kernel started as ``task_id``.

        Raises:
            KeyError: saying which tasks it did start.
        """
        try:
            return self.tasks[task_id]
        except KeyError:
            started = ", ".join(map(repr, self.tasks)) or "none yet"
            raise KeyError(
                f"this kernel started no task {task_id!r} (it started: {started}); "
                "a %%fedavg_task cell starts one"
            ) from None

    def watch(self, watcher: Callable[[], None]) -> None:
        """Call ``watcher()``, from any thread, whenever a task starts, moves on or ends."""
        self._watchers.append(watcher)

    def unwatch(self, watcher: Callable[[], None]) -> None:
        if watcher in self._watchers:
            self._watchers.remove(watcher)

    def changed(self) -> None:
        for watcher in list(self._watchers):
            watcher()

    def cell(
        self,
        source: str,
        filename: str,
        *,
        wait: bool = False,
        options: dict[str, Any] | None = None,
    ) -> CodeContext:
        """What a ``%%fedavg_task`` cell runs under: its source is the task's code.

        Args:
            wait: ``launch_task`` blocks until the task ends and returns its result.
            options: ``launch_task`` options from the magic's line; the call's own win.
        """

        def launch(scheduler: Scheduler, task_id: str, given: dict[str, Any]) -> Any:
            chosen = {**(options or {}), **given}
            if chosen.get("simulate") is None:
                self.task_cells[task_id] = self.last_task_cell = (source, filename)
            return self._launch(scheduler, task_id, chosen, wait)

        return CodeContext(source, filename, launch)

    def _launch(
        self, scheduler: Scheduler, task_id: str, options: dict[str, Any], wait: bool
    ) -> Any:
        from IPython import get_ipython
        from IPython.display import display

        simulated = options.get("simulate") is not None
        key = f"{task_id} (simulated)" if simulated else task_id
        running = self.tasks.get(key)
        if running is not None and not running.done():
            log.info(
                "%s %r is already running in this kernel; here it is (to start it "
                "again, call .stop() on it first)",
                "a simulation of task" if simulated else "task",
                task_id,
            )
        else:
            in_kernel = getattr(get_ipython(), "kernel", None) is not None
            options.setdefault("dataset_verify", self.verify_classes.get(task_id))
            options.setdefault("token", self.join_tokens.get(task_id))
            if not options.get("relay") and not simulated:
                options["relay"] = self.relay_url()
            try:
                running = start_task(
                    scheduler, task_id, **{"quiet": in_kernel and not wait, **options}
                )
            except BaseException:
                self.release_relay()
                raise
            self.tasks[key] = running
            group = None if simulated else self.local.get(task_id)
            if group is not None and group.running:
                group.follow(running, running.name)

            def on_event(_event: str, run: TaskRun = running) -> None:
                if run.done():
                    self.release_relay()
                self.changed()

            running.subscribe(on_event)
            self.changed()
        if not wait:
            return running
        display(running)  # the live widget, while the cell waits
        return running.wait()


_loaded: KernelSession | None = None


def loaded_session(create: bool = False) -> KernelSession:
    """The session of this kernel's loaded extension (kept across ``%reload_ext``).

    Raises:
        RuntimeError: if ``%load_ext fedmagic`` has not run, unless ``create``.
    """
    global _loaded
    if _loaded is None:
        if not create:
            raise RuntimeError(
                "fedmagic is not loaded in this kernel: run %load_ext fedmagic, "
                "then start a task in a %%fedavg_task cell"
            )
        _loaded = KernelSession()
    return _loaded
