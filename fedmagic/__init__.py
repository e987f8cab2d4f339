"""fedmagic: federated averaging that feels native in Jupyter.

    from fedmagic import FedAvgScheduler, logger
"""

from .fed_avg import FedAvgScheduler
from .log import logger

__all__ = ["FedAvgScheduler", "load_ipython_extension", "logger", "unload_ipython_extension",
           "__version__"]
__version__ = "0.1.0"

_bridge = None


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
