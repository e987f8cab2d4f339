"""The options a user asks for a simulation with, on a command line or a notebook's line.

``fedmagic simulate`` and ``%fedavg_simulate`` both take them, each around
options of its own (the command's rounds and strategy, the magic's task).
Light on purpose: a command's parser is built before it knows its command,
so this imports neither torch nor numpy.
"""

from __future__ import annotations

import argparse
import math
from typing import Any

__all__ = [
    "ENGINES",
    "OPTIONS",
    "PARTITIONS",
    "add_options",
    "resources",
    "resources_text",
    "settings",
]

#: Where virtual participants train: a Dask cluster's workers, or this process.
ENGINES = ("dask", "local")
#: How a training set is shared out: :data:`fedmagic.partition.SCHEMES`, which
#: imports numpy (tests/test_simulation.py checks they agree).
PARTITIONS = ("iid", "dirichlet", "by-label")


def resources(text: str) -> dict[str, float]:
    """``"GPU=1 MEMORY=4e9"`` as Dask's worker resources, as ``dask worker --resources`` reads it.

    Raises:
        argparse.ArgumentTypeError: for anything else, saying what a resource looks like.
    """
    parsed: dict[str, float] = {}
    for item in text.replace(",", " ").split():
        name, _, amount = item.partition("=")
        try:
            value = float(amount)
        except ValueError:
            value = math.nan
        if not name or not (math.isfinite(value) and value > 0):
            raise argparse.ArgumentTypeError(
                f"{item!r} is no resource: write NAME=AMOUNT with a positive amount, e.g. GPU=1"
            )
        parsed[name] = value
    if not parsed:
        raise argparse.ArgumentTypeError("name at least one resource, e.g. GPU=1")
    return parsed


def resources_text(resources: dict[str, float] | None) -> str:
    """Resources as ``dask worker --resources`` takes them (``"GPU=1"``); "" for none."""
    return " ".join(f"{name}={amount:g}" for name, amount in (resources or {}).items())


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
    (
        "--resources",
        {
            "type": resources,
            "metavar": "'NAME=AMOUNT ...'",
            "help": "the Dask worker resources a round's work needs, e.g. 'GPU=1': only "
            "workers started with them (dask worker --resources 'GPU=1') train",
        },
    ),
)


def add_options(parser: argparse.ArgumentParser) -> None:
    """Add :data:`OPTIONS` to ``parser``."""
    for flag, keywords in OPTIONS:
        parser.add_argument(flag, **keywords)


def settings(options: argparse.Namespace) -> dict[str, Any]:
    """The :class:`~fedmagic.engine.simulation.Simulation` keywords the options say.

    ``address``, ``workers`` and ``resources`` only with the Dask engine, which alone
    takes them.
    """
    said = {
        "partition": options.partition,
        "alpha": options.alpha,
        "seed": options.seed,
        "per_round": options.per_round,
        "engine": options.engine,
    }
    if options.engine == "dask":
        said |= {
            "address": options.address,
            "workers": options.workers,
            "resources": options.resources,
        }
    return said
