"""Joining a task from Python, in the background: what notebooks and kernels use.

``start_join`` connects and takes part on a thread of its own, so the kernel
that calls it stays responsive while its node trains; ``fedmagic join`` is
the same runtime in the foreground.
"""

from __future__ import annotations

import asyncio
import contextvars
import ssl as ssl_module
import threading
from concurrent.futures import Future
from typing import Any, Callable

from ..background import BackgroundLoop
from ..log import log_sink
from ..wire.sessions import join_relay
from .participant import RECONNECT_WINDOW, Consent, JoinOutcome, ParticipantRuntime

__all__ = ["JoinRun", "start_join"]


class JoinRun:
    """A node's part in a task, running in the background.

    Attributes:
        events: ``(kind, details)`` of what happened, oldest first.
    """

    def __init__(self, task_id: str, node: str) -> None:
        self.task_id = task_id
        self.node = node
        self.events: list[tuple[str, dict[str, Any]]] = []
        self._finished = threading.Event()
        self._outcome: JoinOutcome | None = None
        self._error: BaseException | None = None
        self._background: BackgroundLoop | None = None  # the node's thread, once started

    def done(self) -> bool:
        return self._finished.is_set()

    def leave(self) -> None:
        """Stop taking part; the initiator sees this node leave."""
        if self._background is not None and not self.done():
            self._background.cancel()

    def wait(self, timeout: float | None = None) -> JoinOutcome:
        """Block until this node's part ends.

        Raises:
            TimeoutError: if it has not ended after ``timeout`` seconds.
            FedMagicError: if the connection or the initiator broke down.
        """
        if not self._finished.wait(timeout):
            raise TimeoutError(
                f"{self.node!r} is still in task {self.task_id!r} after {timeout:g} s"
            )
        if self._error is not None:
            raise self._error
        assert self._outcome is not None, "a part that ended without an error has an outcome"
        return self._outcome

    def __repr__(self) -> str:
        state = (
            "running"
            if not self.done()
            else (f"ended: {self._outcome.reason}" if self._outcome else f"failed: {self._error}")
        )
        return f"<JoinRun {self.node!r} in {self.task_id!r}, {state}>"


def start_join(
    url: str,
    task: str,
    token: str,
    node: str,
    consent: Consent,
    *,
    wait: float = 300.0,
    ssl: ssl_module.SSLContext | None = None,
    on_event: Callable[[str, dict[str, Any]], None] | None = None,
    reconnect_window: float = RECONNECT_WINDOW,
    quiet: bool = False,
) -> JoinRun:
    """Join ``task`` at the relay ``url`` as ``node`` and take part in the background.

    Args:
        consent: shown the task's package; returns whether to run its code.
        wait: seconds to keep trying while the relay or the task is not up yet.
        on_event: called with ``(kind, details)`` as the task goes on.
        reconnect_window: see :class:`~fedmagic.engine.participant.ParticipantRuntime`.
        quiet: the task's log lines become ``("log", {"text": line})`` events
            instead of going to stderr (in a notebook, whichever cell runs).
    """
    run = JoinRun(task, node)

    def record(kind: str, details: dict[str, Any]) -> None:
        run.events.append((kind, details))
        if on_event is not None:
            on_event(kind, details)

    async def main() -> JoinOutcome:
        link = await join_relay(url, task, token, node, wait=wait, ssl=ssl)
        return await ParticipantRuntime(
            link, node, consent, record, reconnect_window=reconnect_window
        ).run()

    def finish(part: Future[JoinOutcome]) -> None:  # on the node's thread, its loop closed
        try:
            run._outcome = part.result()
        except asyncio.CancelledError:  # leave()
            run._outcome = JoinOutcome(task, node, False, "left the task")
        except BaseException as exc:
            run._error = exc
        finally:
            try:
                record("ended", {"outcome": run._outcome, "error": run._error})
            finally:
                run._finished.set()  # after the last event: whoever waited sees them all

    context = contextvars.Context()  # none of the caller's, as on a thread of its own
    if quiet:
        context.run(log_sink.set, lambda line: record("log", {"text": line}))
    run._background = BackgroundLoop(f"fedmagic-join-{node}")
    run._background.run(main(), context=context, then=finish)
    return run
