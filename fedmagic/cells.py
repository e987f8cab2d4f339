"""What notebook cells hand to the engine, without importing IPython.

While a ``%%fedavg_task`` cell runs, ``current_cell`` holds its source and its
options: ``launch_task`` then sends the cell as the task's code and, unless
the cell asked to wait, starts the task in the background. The kernel also
remembers the ``DatasetVerify`` cells registered for each task, the tasks it
runs (so a re-run cell finds its task instead of starting a second one) and
the tasks it joined; ``changed()`` tells whoever watches (the JupyterLab
extension's comm) that any of them moved on.
"""

from __future__ import annotations

import contextlib
import contextvars
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any, Callable, Iterator

if TYPE_CHECKING:
    from .launch import TaskRun
    from .panel import ParticipantPanel

__all__ = ["TaskCell", "changed", "current_cell", "join_tokens", "joined_tasks",
           "running_tasks", "task_cell", "verify_classes", "watchers"]


@dataclass(frozen=True)
class TaskCell:
    """A ``%%fedavg_task`` cell: its source and the options of its magic line."""

    source: str
    filename: str
    wait: bool = False
    options: dict[str, Any] = field(default_factory=dict)


_CURRENT = contextvars.ContextVar[TaskCell | None]("fedmagic_task_cell", default=None)

#: The DatasetVerify class a ``%%dataset_verify`` cell registered for each task id.
verify_classes: dict[str, type] = {}
#: Join tokens chosen before a task's launch (local participants already hold them).
join_tokens: dict[str, str] = {}
#: The tasks this kernel started, by task id.
running_tasks: dict[str, TaskRun] = {}
#: The tasks this kernel joined as a data owner, by task id.
joined_tasks: dict[str, ParticipantPanel] = {}
#: Called, from any thread, when a task of this kernel starts, moves on or ends.
watchers: list[Callable[[], None]] = []


def changed() -> None:
    for watcher in list(watchers):
        watcher()


def current_cell() -> TaskCell | None:
    return _CURRENT.get()


@contextlib.contextmanager
def task_cell(cell: TaskCell) -> Iterator[None]:
    token = _CURRENT.set(cell)
    try:
        yield
    finally:
        _CURRENT.reset(token)
