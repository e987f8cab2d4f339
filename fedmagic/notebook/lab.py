"""The kernel's end of the JupyterLab extension: one comm per kernel.

``%load_ext fedmagic`` opens a comm named ``fedmagic`` to the frontend. The
kernel sends over it the state of the tasks it runs and has joined, whenever
they move on; the frontend finds the comm again after a page reload (with
``comm_info``), asks for the state, runs Verify data and stops tasks. Jupyter's
own channels carry it all: no side server, no port of its own.
"""

from __future__ import annotations

import logging
import threading
from typing import Any

from .session import KernelSession

__all__ = ["TARGET", "LabBridge", "frontend_state"]

TARGET = "fedmagic"

log = logging.getLogger("fedmagic")


class LabBridge:
    """The comm that keeps the frontend's Federation panel and Verify data button current."""

    def __init__(self, session: KernelSession) -> None:
        from comm import create_comm

        self.session = session
        self._lock = threading.Lock()  # tasks report from their own threads
        self.comm = create_comm(target_name=TARGET, data={"type": "state", **self.state()})
        self.comm.on_msg(self._on_message)
        session.watch(self.push)

    def state(self) -> dict[str, Any]:
        """What the frontend shows: see :func:`frontend_state`."""
        return frontend_state(self.session)

    def push(self) -> None:
        with self._lock:
            try:
                self.comm.send({"type": "state", **self.state()})
            except Exception:  # a closed comm or a broken frontend must not stop a task
                log.debug("could not update the JupyterLab extension", exc_info=True)

    def close(self) -> None:
        self.session.unwatch(self.push)
        self.comm.close()

    def _on_message(self, message: dict[str, Any]) -> None:
        data = message["content"]["data"]
        action = data.get("action")
        if action == "refresh":
            self.push()
        elif action == "verify":
            self.comm.send({"type": "verified", "results": self.verify_data()})
            self.push()
        elif action == "stop":
            run = self.session.tasks.get(str(data.get("task_id")))
            if run is not None:
                run.stop()
            self.push()
        else:
            log.warning("the JupyterLab extension sent an unknown action %r", action)

    def verify_data(self) -> list[dict[str, Any]]:
        """Run Verify data for every task this kernel joined; say so when it joined none."""
        joined = self.session.joined
        if not joined:
            return [
                {
                    "passed": False,
                    "task_id": None,
                    "node": None,
                    "detail": "this kernel has not joined a task: run %fedavg_join "
                    "URL --task ID --token T --node NAME first",
                }
            ]
        results = []
        for task_id, panel in list(joined.items()):
            if panel.package is None:
                results.append(
                    {
                        "passed": False,
                        "task_id": task_id,
                        "node": panel.node,
                        "detail": "the task's code has not arrived yet: wait for "
                        "the task to start, then verify",
                    }
                )
                continue
            passed = panel.verify_data()
            assert panel.verified is not None, "verify_data() records what it found"
            _, detail = panel.verified
            results.append(
                {"passed": bool(passed), "task_id": task_id, "node": panel.node, "detail": detail}
            )
        return results


def frontend_state(session: KernelSession) -> dict[str, Any]:
    """What the frontend shows: every task this kernel runs or has joined.

    Tasks come newest first, by when they started (a task launched again
    under its id keeps its place in the session, not its age), so the
    frontend's "this notebook's task" is the first running one.
    """
    tasks = sorted(
        ((key, run.snapshot()) for key, run in list(session.tasks.items())),
        key=lambda pair: pair[1].started,
        reverse=True,
    )
    return {
        # by the session's key, which a task's simulation has apart from the task's own
        "tasks": [{**task.to_json(), "task_id": key} for key, task in tasks],
        "joins": [panel.snapshot().to_json() for panel in list(session.joined.values())],
    }
