"""The rules of time and memory a task's rounds follow, chosen by its author at launch.

How long the task waits for participants, how long a node may take, how
many samples are plausible, and how much memory uploads may take at once.
How updates combine is the task's strategy (:mod:`fedmagic.strategies`).
Checked when the task is launched, so a rule that cannot work fails before
anything starts. Everything here is pure: the round loop asks, these answer.
"""

from __future__ import annotations

import math
import numbers
from dataclasses import dataclass
from typing import Any

from ..errors import ConfigurationError
from ..strategies import Strategy
from .state import size_text

__all__ = ["RoundPolicy", "sit_out_rounds"]

#: A node that timed out or stalled sits out 1, 2, 4 ... rounds, at most this many.
MAX_SIT_OUT = 8
#: The upload deadline: this long, plus a second per ``UPLOAD_RATE`` bytes of state.
UPLOAD_BASE_SECONDS = 30.0
UPLOAD_RATE = 1 << 20


@dataclass(frozen=True)
class RoundPolicy:
    """How the initiator runs rounds.

    Args:
        join_timeout: seconds to wait for ``min_clients`` verified participants.
        join_grace: once ``min_clients`` are in, seconds to wait for more.
        max_samples: a node reporting more training samples than this is
            refused as implausible.
        upload_timeout: seconds a node has to deliver its whole update once it
            may send it (not reset by each frame); default 30 s plus a second
            per MiB of state.
        upload_memory: bytes of updates being received at once; with a budget
            of one model, updates arrive one at a time.
        progress_every: seconds between the "waiting for ..." lines of a round.
        federated_evaluation: on the rounds the initiator tests, participants
            with test data of their own test the model on it too.
    """

    join_timeout: float = 300.0
    join_grace: float = 3.0
    max_samples: int = 10**9
    upload_timeout: float | None = None
    upload_memory: int = 256 << 20
    progress_every: float = 10.0
    federated_evaluation: bool = True

    def __post_init__(self) -> None:
        for name in ("join_timeout", "join_grace", "progress_every"):
            _seconds(name, getattr(self, name), allow_zero=name == "join_grace")
        if self.upload_timeout is not None:
            _seconds("upload_timeout", self.upload_timeout)
        if not isinstance(self.federated_evaluation, bool):
            raise ConfigurationError(
                "federated_evaluation", self.federated_evaluation, "must be True or False"
            )
        for name in ("max_samples", "upload_memory"):
            value = getattr(self, name)
            if not isinstance(value, int) or isinstance(value, bool) or value < 1:
                raise ConfigurationError(name, value, "must be a whole number, at least 1")

    def upload_seconds(self, state_bytes: int) -> float:
        """The whole-upload deadline for a state of ``state_bytes``."""
        if self.upload_timeout is not None:
            return self.upload_timeout
        return UPLOAD_BASE_SECONDS + state_bytes / UPLOAD_RATE

    def upload_slots(self, state_bytes: int) -> int:
        """How many updates may be received at once within ``upload_memory``."""
        return max(1, self.upload_memory // max(state_bytes, 1))

    def keepable(self, strategy: Strategy, count: int, state_bytes: int) -> int:
        """How many of ``count`` updates a round may hold within ``upload_memory``.

        All of them for a strategy that folds updates into a running sum; for
        one that keeps them whole (median, Krum), as many as fit.
        """
        while count > 0 and strategy.round_memory(count, state_bytes) > self.upload_memory:
            count -= 1
        return count

    def check_memory(self, strategy: Strategy, min_clients: int, state_bytes: int) -> None:
        """Refuse a strategy that could not keep a round of ``min_clients`` updates.

        Raises:
            ConfigurationError: naming ``upload_memory``, what a round needs and the fix.
        """
        if self.keepable(strategy, min_clients, state_bytes) < min_clients:
            need = strategy.round_memory(min_clients, state_bytes)
            raise ConfigurationError(
                "upload_memory",
                self.upload_memory,
                f"{type(strategy).__name__} holds every update of a round at once: "
                f"min_clients={min_clients} updates of {size_text(state_bytes)} need "
                f"{size_text(need)}; "
                f"raise upload_memory to {need} or more, or choose a strategy that folds "
                "updates as they arrive, such as FedAvg",
            )


def sit_out_rounds(strikes: int) -> int:
    """Rounds a node sits out after its ``strikes``-th timeout in a row: 1, 2, 4..."""
    return min(2 ** max(strikes - 1, 0), MAX_SIT_OUT)


def _number(value: Any) -> bool:
    return isinstance(value, numbers.Real) and not isinstance(value, bool) and math.isfinite(value)


def _seconds(name: str, value: Any, allow_zero: bool = False) -> None:
    if not (_number(value) and (value >= 0 if allow_zero else value > 0)):
        raise ConfigurationError(
            name, value, "must be a " + ("" if allow_zero else "positive ") + "number of seconds"
        )
