"""Robust rules, which a minority of arbitrary updates cannot steer far.

They need every update of a round at once, so a round holds one copy of
the model per participant (``round_memory``); the round loop keeps each
round within the task's ``upload_memory`` and refuses, at launch, a task
whose ``min_clients`` updates would not fit. They are unweighted: a sample
count is a claim, and a rule meant to resist lying nodes does not take it.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Sequence

import torch

from ..errors import ConfigurationError
from .aggregate import Fold, KeptUpdates, State, coordinate_median, multi_krum, trimmed_mean
from .base import Strategy, check_share

__all__ = ["FedMedian", "FedTrimmedAvg", "Krum", "MultiKrum"]


@dataclass(eq=False)
class FedMedian(Strategy):
    """Each coordinate's median across the round (Yin et al. 2018, "Byzantine-Robust
    Distributed Learning: Towards Optimal Statistical Rates")."""

    keeps_updates = True

    def fold(self, reference: State) -> Fold:
        return KeptUpdates(lambda states, weights: coordinate_median(states))


@dataclass(eq=False)
class FedTrimmedAvg(Strategy):
    """Each coordinate's mean once its ``beta`` share of highest and lowest values
    is cut (Yin et al. 2018).

    Args:
        beta: the share cut from each end, below 0.5; ``floor(beta * n)``
            values go from each end, so 3 updates with 0.1 give the plain mean.
    """

    keeps_updates = True
    beta: float = 0.1

    def __post_init__(self) -> None:
        check_share("beta", self.beta, below=0.5)

    def fold(self, reference: State) -> Fold:
        return KeptUpdates(lambda states, weights: trimmed_mean(states, self.beta))


@dataclass(eq=False)
class MultiKrum(Strategy):
    """The mean of the ``m`` updates closest to their neighbours (El Mhamdi et al. 2018).

    Each update is scored by the squared distances to its ``n - f - 2``
    nearest others (Blanchard et al. 2017); with at most ``f`` arbitrary
    updates among more than ``2f + 2``, the best-scored ones are honest.

    Args:
        f: how many arbitrary (Byzantine) updates a round may hold.
        m: how many best-scored updates to average; None: ``n - f``.
    """

    keeps_updates = True
    f: int = 1
    m: int | None = None

    def __post_init__(self) -> None:
        if not isinstance(self.f, int) or isinstance(self.f, bool) or self.f < 0:
            raise ConfigurationError("f", self.f, "must be a whole number, 0 or more")
        if self.m is not None and (
            not isinstance(self.m, int) or isinstance(self.m, bool) or self.m < 1
        ):
            raise ConfigurationError("m", self.m, "must be a whole number, at least 1, or None")

    def check(self, min_clients: int, max_clients: int) -> None:
        if min_clients <= 2 * self.f + 2:
            raise ConfigurationError(
                "min_clients",
                min_clients,
                f"{type(self).__name__}(f={self.f}) needs more than 2f+2={2 * self.f + 2} "
                f"updates a round to tell {self.f} arbitrary ones apart: raise min_clients "
                f"to {2 * self.f + 3}, or lower f",
            )
        if self.m is not None and self.m > min_clients:
            raise ConfigurationError(
                "m",
                self.m,
                f"cannot average more updates than a round may have: min_clients={min_clients}",
            )

    def fold(self, reference: State) -> Fold:
        return KeptUpdates(self._reduce)

    def _reduce(self, states: Sequence[State], weights: Sequence[float]) -> dict[str, torch.Tensor]:
        keep = self.m if self.m is not None else len(states) - self.f
        return multi_krum(states, self.f, keep)


@dataclass(eq=False)
class Krum(MultiKrum):
    """The one update closest to its neighbours (Blanchard et al. 2017, "Machine Learning
    with Adversaries: Byzantine Tolerant Gradient Descent"): Multi-Krum with ``m = 1``.

    Args:
        f: how many arbitrary (Byzantine) updates a round may hold.
    """

    m: int | None = field(default=1, init=False)
