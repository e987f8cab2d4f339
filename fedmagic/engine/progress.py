"""A simulated round as it goes: counts, the slowest and why some were left out, histograms.

Thousands of virtual participants make a table of one row each unreadable
(and a display of one slow to draw), so a simulation's round is summed up
as it runs: how many of those selected are done, by status; the few
slowest and the failed with why; how samples and train time spread.
"""

from __future__ import annotations

import heapq
import math
from dataclasses import dataclass, field
from typing import Any, Iterable

from .state import NodeStatus
from .virtual import Outcome

__all__ = ["RoundProgress", "histogram"]

#: How many of the slowest and of the failed a summary names.
SHOWN = 5


@dataclass
class RoundProgress:
    """One round of a simulation, summed up from its participants' outcomes so far."""

    number: int
    selected: int
    counts: dict[str, int] = field(default_factory=dict)
    #: The slowest so far, slowest first, as (seconds, node).
    slowest: list[tuple[float, str]] = field(default_factory=list)
    #: Why participants were left out (failed or refused), a few reasons: how many for
    #: each, and the first few of them.
    left_out: dict[str, tuple[int, list[str]]] = field(default_factory=dict)
    samples: list[int] = field(default_factory=list)
    seconds: list[float] = field(default_factory=list)
    finished: bool = False

    @property
    def done(self) -> int:
        """Participants that have an outcome this round, whatever it is."""
        return sum(self.counts.values())

    def add(self, outcomes: Iterable[Outcome]) -> None:
        for outcome in outcomes:
            status = str(outcome.status)
            self.counts[status] = self.counts.get(status, 0) + 1
            if outcome.status == NodeStatus.UPLOADED:
                self.samples.append(outcome.samples)
                self.seconds.append(outcome.seconds)
                heapq.heappush(self.slowest, (outcome.seconds, outcome.node))
                if len(self.slowest) > SHOWN:
                    heapq.heappop(self.slowest)
            elif outcome.detail in self.left_out or len(self.left_out) < SHOWN:
                count, nodes = self.left_out.get(outcome.detail, (0, []))
                self.left_out[outcome.detail] = (
                    count + 1,
                    nodes + [outcome.node][: 3 - len(nodes)],
                )

    def summary(self) -> dict[str, Any]:
        """What a display shows: plain values only (a widget's traitlet, a JSON line).

        A display's thread reads it while outcomes come in: each part is copied whole first.
        """
        left_out, counted = list(self.left_out.items()), dict(self.counts)
        # in the statuses' own order (uploaded before refused), however outcomes came in
        counts = {status: counted[status] for status in NodeStatus if status in counted}
        return {
            "round": self.number,
            "selected": self.selected,
            "done": sum(counts.values()),
            "counts": counts,
            "slowest": [
                [node, seconds] for seconds, node in sorted(list(self.slowest), reverse=True)
            ],
            "left_out": [[why, count, list(nodes)] for why, (count, nodes) in left_out],
            "samples": histogram(list(self.samples)),
            "seconds": histogram(list(self.seconds)),
            "finished": self.finished,
        }


def histogram(values: list[int] | list[float], bins: int = 12) -> dict[str, list[float]]:
    """``values`` counted in ``bins`` equal bins: ``edges`` (bins + 1 of them) and ``counts``."""
    if not values:
        return {"edges": [], "counts": []}
    low, high = float(min(values)), float(max(values))
    if high == low:
        return {"edges": [low, high], "counts": [float(len(values))]}
    width = (high - low) / bins
    counts = [0.0] * bins
    for value in values:
        counts[min(math.floor((value - low) / width), bins - 1)] += 1
    return {"edges": [low + width * index for index in range(bins + 1)], "counts": counts}
