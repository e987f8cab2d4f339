"""Where a task's author imports ``FedAvgScheduler`` from, as in the reference tutorial.

    from fedmagic.fed_avg import FedAvgScheduler
"""

from .engine.scheduler import FedAvgScheduler

__all__ = ["FedAvgScheduler"]
