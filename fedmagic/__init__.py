"""fedmagic: federated averaging that feels native in Jupyter.

    from fedmagic import FedAvgScheduler, logger
"""

from .fed_avg import FedAvgScheduler
from .log import logger

__all__ = ["FedAvgScheduler", "logger", "__version__"]
__version__ = "0.1.0"
