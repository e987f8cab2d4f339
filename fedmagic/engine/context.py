"""Where a task's code runs, and what ``launch_task`` does there.

A script calls ``launch_task`` and the task runs to its end. The code that
runs a task's definition may want otherwise while it runs it, and says so
with one context: a notebook cell hands over its own source (the code
participants receive) and starts the task in the background; a participant
running code it received launches nothing. The engine defines this context;
whoever runs the code installs it, so the engine never asks who that is.
"""

from __future__ import annotations

import contextlib
import contextvars
from dataclasses import dataclass
from typing import Any, Callable, Iterator

from .scheduler import Scheduler

__all__ = ["CodeContext", "current_context", "running_code"]

#: What ``launch_task(task_id, **options)`` does instead of running the task to its end.
Launch = Callable[[Scheduler, str, dict[str, Any]], Any]


@dataclass(frozen=True)
class CodeContext:
    """The code being run, when it is no file, and what ``launch_task`` does in it.

    Attributes:
        source: the code that defines the task's classes, sent to participants
            for a class defined in ``__main__`` (a notebook cell); None: the
            class's own file.
        filename: the name tracebacks show for ``source``.
        launch: what ``launch_task`` does here; None: run the task to its end.
    """

    source: str | None = None
    filename: str = ""
    launch: Launch | None = None


_CURRENT = contextvars.ContextVar[CodeContext | None]("fedmagic_code_context", default=None)


def current_context() -> CodeContext | None:
    return _CURRENT.get()


@contextlib.contextmanager
def running_code(context: CodeContext) -> Iterator[None]:
    """Install ``context`` while the code it describes runs."""
    token = _CURRENT.set(context)
    try:
        yield
    finally:
        _CURRENT.reset(token)
