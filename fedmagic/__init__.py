"""fedmagic: federated averaging that feels native in Jupyter.

    from fedmagic import FedAvgScheduler, logger

``FedAvgScheduler`` and ``FedSGDScheduler`` (one gradient step a round) are
imported on first use: they bring torch, which the relay (``fedmagic relay``,
``import fedmagic.wire.relay``) does without.
In a notebook, ``fedmagic.running_task(task_id)`` is a task a cell started.
"""

from __future__ import annotations

from typing import TYPE_CHECKING

from .log import info_to_stdout, logger

if TYPE_CHECKING:
    from .engine.launch import TaskRun

__all__ = [
    "FedAvgScheduler",
    "FedSGDScheduler",
    "load_ipython_extension",
    "logger",
    "running_task",
    "unload_ipython_extension",
    "__version__",
]
__version__ = "0.1.0"

_bridge = None


def __getattr__(name: str) -> object:
    if name in ("FedAvgScheduler", "FedSGDScheduler"):
        from . import fed_avg

        scheduler = getattr(fed_avg, name)
        globals()[name] = scheduler  # later lookups skip this function
        return scheduler
    raise AttributeError(f"module 'fedmagic' has no attribute {name!r}")


def __dir__() -> list[str]:
    return sorted(set(globals()) | set(__all__))


def running_task(task_id: str) -> TaskRun:
    """The task a ``%%fedavg_task`` cell of this kernel started as ``task_id``.

    Raises:
        KeyError: if this kernel started no such task (saying which it did).
        RuntimeError: if ``%load_ext fedmagic`` has not run in this kernel.
    """
    from .notebook.session import loaded_session

    return loaded_session().task(task_id)


def load_ipython_extension(ipython) -> None:
    """``%load_ext fedmagic``: the kernel's session, its magics, and how tasks are shown.

    Loading twice is harmless; the session outlives ``%reload_ext``.
    """
    from .notebook.magics import FedMagics
    from .notebook.session import loaded_session
    from .notebook.widget import show_task

    session = loaded_session(create=True)
    ipython.register_magics(FedMagics(ipython, session))
    ipython.display_formatter.ipython_display_formatter.for_type_by_name(
        "fedmagic.engine.launch", "TaskRun", show_task
    )
    global _bridge
    if getattr(ipython, "kernel", None) is not None:
        info_to_stdout()
    if _bridge is None and getattr(ipython, "kernel", None) is not None:
        from .notebook.lab import LabBridge

        _bridge = LabBridge(session)  # the Federation panel and Verify data button in JupyterLab


def unload_ipython_extension(ipython) -> None:
    """``%unload_ext fedmagic``: remove the magics, so ``%reload_ext`` picks up changes."""
    global _bridge
    if _bridge is not None:
        _bridge.close()
        _bridge = None
    for kind in ("line", "cell"):
        table = ipython.magics_manager.magics[kind]
        for name in [
            name
            for name, function in table.items()
            if type(getattr(function, "__self__", None)).__name__ == "FedMagics"
        ]:
            del table[name]
