"""The rules a task's rounds follow, chosen by its author at launch.

Who may be picked, how much weight each update carries, how long a node may
take, and how updates are combined. Checked when the task is launched, so a
rule that cannot work fails before anything starts. Everything here is pure:
the round loop asks, these answer.
"""

from __future__ import annotations

import math
import numbers
from dataclasses import dataclass
from typing import Any

from ..errors import ConfigurationError

__all__ = ["AGGREGATIONS", "RoundPolicy", "over_share", "sit_out_rounds"]

#: How updates are combined: FedAvg's (weighted) mean, or a robust statistic.
AGGREGATIONS = ("mean", "median", "trimmed_mean")
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
        weighted: weight updates by sample counts (FedAvg); False: plain mean.
        aggregation: ``"mean"``, or the robust ``"median"`` or ``"trimmed_mean"``
            (coordinate-wise and unweighted; they hold every update of a round
            in memory, where the mean holds one running sum).
        trim: for ``"trimmed_mean"``, the share of values cut from each end.
        max_weight_share: the largest share of a round's total weight one node
            may carry; a node over it is left out of that round. None: no cap.
        max_samples: a node reporting more training samples than this is
            refused as implausible.
        upload_timeout: seconds a node has to deliver its whole update once it
            may send it (not reset by each frame); default 30 s plus a second
            per MiB of state.
        upload_memory: bytes of updates being received at once; with a budget
            of one model, updates arrive one at a time.
        progress_every: seconds between the "waiting for ..." lines of a round.
    """

    join_timeout: float = 300.0
    join_grace: float = 3.0
    weighted: bool = True
    aggregation: str = "mean"
    trim: float = 0.1
    max_weight_share: float | None = None
    max_samples: int = 10**9
    upload_timeout: float | None = None
    upload_memory: int = 256 << 20
    progress_every: float = 10.0

    def __post_init__(self) -> None:
        for name in ("join_timeout", "join_grace", "progress_every"):
            _seconds(name, getattr(self, name), allow_zero=name == "join_grace")
        if self.upload_timeout is not None:
            _seconds("upload_timeout", self.upload_timeout)
        if self.aggregation not in AGGREGATIONS:
            raise ConfigurationError(
                "aggregation",
                self.aggregation,
                f"choose one of {', '.join(map(repr, AGGREGATIONS))}",
            )
        if not (_number(self.trim) and 0 <= self.trim < 0.5):
            raise ConfigurationError(
                "trim", self.trim, "the share cut from each end must be at least 0 and below 0.5"
            )
        if self.max_weight_share is not None and not (
            _number(self.max_weight_share) and 0 < self.max_weight_share <= 1
        ):
            raise ConfigurationError(
                "max_weight_share",
                self.max_weight_share,
                "must be a share above 0 and at most 1 (0.5: no node "
                "carries more than half a round's weight), or None",
            )
        for name in ("max_samples", "upload_memory"):
            value = getattr(self, name)
            if not isinstance(value, int) or isinstance(value, bool) or value < 1:
                raise ConfigurationError(name, value, "must be a whole number, at least 1")
        if not isinstance(self.weighted, bool):
            raise ConfigurationError("weighted", self.weighted, "must be True or False")

    @property
    def keeps_updates(self) -> bool:
        """Whether a round holds every update whole (the robust aggregations) rather than
        folding each into a running mean."""
        return self.aggregation != "mean"

    def check_clients(self, min_clients: int) -> None:
        """Refuse a share cap no round of ``min_clients`` nodes could meet.

        Raises:
            ConfigurationError: if ``max_weight_share * min_clients < 1``.
        """
        share = self.max_weight_share
        if share is not None and self.weighted and share * min_clients < 1:
            raise ConfigurationError(
                "max_weight_share",
                share,
                f"cannot be met by a round of min_clients="
                f"{min_clients}: some node always carries at least 1/{min_clients} of the "
                f"weight; raise it to {1 / min_clients:.3g} or more",
            )

    def upload_seconds(self, state_bytes: int) -> float:
        """The whole-upload deadline for a state of ``state_bytes``."""
        if self.upload_timeout is not None:
            return self.upload_timeout
        return UPLOAD_BASE_SECONDS + state_bytes / UPLOAD_RATE

    def upload_slots(self, state_bytes: int) -> int:
        """How many updates may be received at once within ``upload_memory``."""
        return max(1, self.upload_memory // max(state_bytes, 1))


def over_share(samples: dict[str, int], share: float) -> dict[str, float]:
    """The nodes whose weight exceeds ``share`` of the total, with their shares.

    The heaviest offender goes first and the shares are taken again without
    it, so one inflated count does not also push honest nodes over the cap.
    """
    left, out = dict(samples), {}
    while left:
        total = sum(left.values())
        node = max(left, key=left.__getitem__)
        if total <= 0 or left[node] / total <= share:
            break
        out[node] = left.pop(node) / total
    return out


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
