"""The options a user asks for a simulation with, on a command line or a notebook's line.

``fedmagic simulate`` and ``%fedavg_simulate`` both take them, each around
options of its own (the command's rounds and strategy, the magic's task).
Light on purpose: a command's parser is built before it knows its command,
so this imports neither torch nor numpy.
"""

from __future__ import annotations

import argparse
from typing import Any

__all__ = ["ENGINES", "OPTIONS", "PARTITIONS", "add_options", "settings"]

#: Where virtual participants train: a Dask cluster's workers, or this process.
ENGINES = ("dask", "local")
#: How a training set is shared out: :data:`fedmagic.partition.SCHEMES`, which
#: imports numpy (tests/test_simulation.py checks they agree).
PARTITIONS = ("iid", "dirichlet", "by-label")

#: Each option: its flag, and what argparse makes of it.
OPTIONS: tuple[tuple[str, dict[str, Any]], ...] = (
    (
        "--partition",
        {
            "default": "iid",
            "choices": PARTITIONS,
            "help": "how the task's training set is shared out (default iid)",
        },
    ),
    ("--alpha", {"type": float, "default": 0.5, "help": "Dirichlet's concentration (default 0.5)"}),
    ("--seed", {"type": int, "default": 0, "help": "the partition's seed (default 0)"}),
    (
        "--per-round",
        {"type": int, "help": "virtual participants drawn each round (default: all)"},
    ),
    (
        "--engine",
        {
            "default": "dask",
            "choices": ENGINES,
            "help": "dask: workers on a Dask cluster (default); local: one worker in this process",
        },
    ),
    ("--address", {"help": "a running Dask scheduler's (default: workers on this machine)"}),
    ("--workers", {"type": int, "help": "Dask workers to start here (default: one a core)"}),
)


def add_options(parser: argparse.ArgumentParser) -> None:
    """Add :data:`OPTIONS` to ``parser``."""
    for flag, keywords in OPTIONS:
        parser.add_argument(flag, **keywords)


def settings(options: argparse.Namespace) -> dict[str, Any]:
    """The :class:`~fedmagic.engine.simulation.Simulation` keywords the options say.

    ``address`` and ``workers`` only with the Dask engine, which alone takes them.
    """
    said = {
        "partition": options.partition,
        "alpha": options.alpha,
        "seed": options.seed,
        "per_round": options.per_round,
        "engine": options.engine,
    }
    if options.engine == "dask":
        said |= {"address": options.address, "workers": options.workers}
    return said
