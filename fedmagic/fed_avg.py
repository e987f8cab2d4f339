"""``FedAvgScheduler``, the class a task's author subclasses, where the tutorial imports it.

    from fedmagic.fed_avg import FedAvgScheduler

What a task defines is :class:`fedmagic.engine.scheduler.Scheduler`; this
adds ``launch_task``, which runs the task the way the code around it asks:
to the end in a script, in the background in a ``%%fedavg_task`` cell, not
at all on a participant rebuilding the task from the code it received.
"""

from __future__ import annotations

from typing import Any

from .engine.context import current_context
from .engine.launch import run_task
from .engine.scheduler import Scheduler
from .errors import TaskFailed

__all__ = ["FedAvgScheduler"]


class FedAvgScheduler(Scheduler):
    """A federated-averaging task: subclass it, then call ``launch_task``.

    It takes :class:`~fedmagic.engine.scheduler.Scheduler`'s arguments:
    ``min_clients``, ``max_clients``, ``name``, ``max_rounds``,
    ``merge_epochs``, ``calculation_timeout``, ``log_rounds``.
    """

    def launch_task(self, task_id: str, **options: Any) -> Any:
        """Run this task as its initiator and return its ``TaskResult``.

        In a ``%%fedavg_task`` cell, the task starts in the background and its
        ``TaskRun`` is returned at once (with ``--wait``, the ``TaskResult``);
        in a participant rebuilding the task from its code, nothing happens.

        Args:
            task_id: the id participants join with.
            **options: see :func:`fedmagic.engine.launch.start_task` (relay, token,
                join_timeout, resume, weighted, dataset_verify...).

        Raises:
            TaskFailed: if the task ends before ``is_task_finished()``.
        """
        context = current_context()
        if context is not None and context.launch is not None:
            return context.launch(self, task_id, options)
        try:
            return run_task(self, task_id, **options)
        except (TaskFailed, KeyboardInterrupt) as exc:
            # Expected endings: their message says it all, fedmagic's frames add nothing.
            raise exc.with_traceback(None) from None
