"""fedmagic: federated averaging that feels native in Jupyter.

    from fedmagic import FedAvgScheduler, logger

``FedAvgScheduler`` is imported on first use: it brings torch, which the
relay (``fedmagic relay``, ``import fedmagic.relay``) does without.
"""

from .log import logger

__all__ = ["FedAvgScheduler", "load_ipython_extension", "logger", "unload_ipython_extension",
           "__version__"]
__version__ = "0.1.0"

_bridge = None


def __getattr__(name: str) -> object:
    if name == "FedAvgScheduler":
        from .fed_avg import FedAvgScheduler

        globals()[name] = FedAvgScheduler  # later lookups skip this function
        return FedAvgScheduler
    raise AttributeError(f"module 'fedmagic' has no attribute {name!r}")


def __dir__() -> list[str]:
    return sorted(set(globals()) | set(__all__))


def load_ipython_extension(ipython) -> None:
    """``%load_ext fedmagic``: register the magics (loading twice is harmless)."""
    from .magics import FedMagics

    ipython.register_magics(FedMagics)
    global _bridge
    if _bridge is None and getattr(ipython, "kernel", None) is not None:
        from .lab import LabBridge

        _bridge = LabBridge()  # the Federation panel and Verify data button in JupyterLab


def unload_ipython_extension(ipython) -> None:
    """``%unload_ext fedmagic``: remove the magics, so ``%reload_ext`` picks up changes."""
    global _bridge
    if _bridge is not None:
        _bridge.close()
        _bridge = None
    for kind in ("line", "cell"):
        table = ipython.magics_manager.magics[kind]
        for name in [name for name, function in table.items()
                     if type(getattr(function, "__self__", None)).__name__ == "FedMagics"]:
            del table[name]
