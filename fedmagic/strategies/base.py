"""The seam between the round loop and how a round combines its updates.

The round loop knows time: who is connected, deadlines, uploads within a
memory budget, reconnects. A :class:`Strategy` knows the arithmetic, and the
round loop asks it these things, and nothing else, about aggregation:

    at launch             check()                    can any round of this task work?
    before each round     stop_before()              must the task end here (a spent budget)?
                          exclude(), sample()        who takes part
                          config()                   what each node is told with the round
                          round_memory()             what keeping the round's updates costs
                          begin()                    the global state the round starts from
                          protect()                  a protocol the updates travel under, so
                                                     only their sum is seen (secure aggregation)
    for each update       weight(), fold()           how much it counts; fold it in or keep it
    after the round       next_state()               the new global state (a server optimiser)
                          record()                   what it adds to the round's history row
    on evaluation rounds  evaluate()                 participants' own test results, combined

Its parameters (``describe()``) are part of the task's code hash, so data
owners consent to them; what it learns across rounds (``state_dict()``: a
server optimiser's moments) goes into the checkpoint, so a resumed task
continues it. Strategies are dataclasses: their fields are their parameters.
"""

from __future__ import annotations

import dataclasses
import random
from typing import Any, ClassVar, Mapping, Sequence

import torch

from ..errors import ConfigurationError
from .aggregate import Fold, State, WeightedMean

__all__ = ["Strategy", "Wrapper", "described_text", "innermost", "layers", "require_mean"]


class Strategy:
    """How a round's updates become the next global model; subclass to make one.

    The base is FedAvg's shape without its weighting: every update counts
    the same and the round's mean is the next model. Override what differs.
    """

    #: The strategy holds every update of a round whole, rather than folding
    #: each into a running sum; ``round_memory()`` says what that costs.
    keeps_updates: ClassVar[bool] = False
    #: A round needs ``min_clients`` updates; False for one that takes whoever a random draw
    #: gave, even none (Poisson sampling under differential privacy).
    applies_min_clients: ClassVar[bool] = True

    # At launch.

    def check(self, min_clients: int, max_clients: int) -> None:
        """Refuse parameters no round of ``min_clients`` to ``max_clients`` nodes could meet.

        Raises:
            ConfigurationError: naming the parameter and what would work.
        """

    # Before each round.

    def stop_before(self, round: int) -> str | None:
        """Why the task must end before ``round``, if it must; the task then finishes with
        the rounds it has, saying so."""
        return None

    def exclude(self, round: int, samples: Mapping[str, int]) -> dict[str, str]:
        """Nodes to leave out of this round (of those available, with their sample counts),
        each with the reason the task's events give."""
        return {}

    def sample(self, round: int, nodes: Sequence[str], most: int) -> list[str]:
        """Which of the rested ``nodes`` train this round: at most ``most``, at random."""
        return random.sample(list(nodes), most) if len(nodes) > most else list(nodes)

    def config(self, round: int, node: str) -> dict[str, Any]:
        """What ``node`` is told with the round (the scheduler's ``round_config`` there)."""
        return {}

    def round_memory(self, count: int, state_bytes: int) -> int:
        """Bytes a round of ``count`` updates holds at once beyond uploads in flight.

        0 for a strategy that folds each update into a running sum: the round
        loop's upload budget is then the only bound.
        """
        return count * state_bytes if self.keeps_updates else 0

    def begin(self, round: int, current: State) -> None:
        """The round starts from ``current``, the global state its nodes receive."""

    def protect(self, round: int, current: State, weights: Mapping[str, float]) -> Any:
        """A secure round the updates of ``weights``' nodes (by their weights) travel under,
        so the initiator sees only their sum; None: they travel in the clear, and fold."""
        return None

    # Each update.

    def weight(self, samples: int) -> float:
        """How much one update counts, given the samples it was trained on."""
        return 1.0

    def fold(self, reference: State) -> Fold:
        """The fold that takes this task's updates; made once, reset every round."""
        return WeightedMean(reference)

    # After the round.

    def next_state(
        self, round: int, current: State, combined: dict[str, torch.Tensor]
    ) -> dict[str, torch.Tensor]:
        """The next global state, from the current one and the round's combined updates."""
        return combined

    def record(self, round: int) -> dict[str, Any]:
        """What the strategy adds to the round's history row (a privacy budget spent, say)."""
        return {}

    def evaluate(self, results: Sequence[tuple[int, Mapping[str, Any]]]) -> dict[str, float]:
        """Participants' own test results, ``(examples, metrics)`` each, as one set of metrics.

        Each metric is the mean of the participants that reported it, weighted
        by their examples; ``examples`` is their total.
        """
        totals: dict[str, float] = {}
        weights: dict[str, int] = {}
        for examples, metrics in results:
            if examples <= 0:
                continue
            for name, value in metrics.items():
                if isinstance(value, (int, float)) and not isinstance(value, bool):
                    totals[name] = totals.get(name, 0.0) + examples * float(value)
                    weights[name] = weights.get(name, 0) + examples
        combined = {name: totals[name] / weights[name] for name in totals}
        combined["examples"] = sum(examples for examples, _ in results if examples > 0)
        return combined

    # What it keeps across rounds.

    def state_dict(self) -> dict[str, torch.Tensor]:
        """What it learned across rounds, as tensors (saved with the checkpoint)."""
        return {}

    def load_state_dict(self, state: Mapping[str, torch.Tensor]) -> None:
        """Continue from a checkpoint's ``state_dict()``."""

    # What it is.

    def describe(self) -> dict[str, Any]:
        """Its name and parameters: what consent shows and the code hash covers."""
        parameters: dict[str, Any] = (
            {item.name: getattr(self, item.name) for item in dataclasses.fields(self) if item.init}
            if dataclasses.is_dataclass(self)
            else {}
        )
        return {"name": type(self).__name__, **parameters}

    def __str__(self) -> str:
        return described_text(self.describe())


class Wrapper(Strategy):
    """A strategy around another: everything it does not change, the wrapped one answers.

    Privacy is added this way (``DifferentialPrivacy(FedAdam(...))``), so
    one server optimiser serves with and without it. Subclasses are
    dataclasses whose first field is ``strategy``, the wrapped one.
    """

    strategy: Strategy

    @property  # a class constant elsewhere, the wrapped one's here
    def keeps_updates(self) -> bool:  # type: ignore[override]
        return self.strategy.keeps_updates

    @property
    def applies_min_clients(self) -> bool:  # type: ignore[override]
        return self.strategy.applies_min_clients

    def check(self, min_clients: int, max_clients: int) -> None:
        self.strategy.check(min_clients, max_clients)

    def stop_before(self, round: int) -> str | None:
        return self.strategy.stop_before(round)

    def exclude(self, round: int, samples: Mapping[str, int]) -> dict[str, str]:
        return self.strategy.exclude(round, samples)

    def sample(self, round: int, nodes: Sequence[str], most: int) -> list[str]:
        return self.strategy.sample(round, nodes, most)

    def config(self, round: int, node: str) -> dict[str, Any]:
        return self.strategy.config(round, node)

    def round_memory(self, count: int, state_bytes: int) -> int:
        return self.strategy.round_memory(count, state_bytes)

    def begin(self, round: int, current: State) -> None:
        self.strategy.begin(round, current)

    def protect(self, round: int, current: State, weights: Mapping[str, float]) -> Any:
        return self.strategy.protect(round, current, weights)

    def weight(self, samples: int) -> float:
        return self.strategy.weight(samples)

    def fold(self, reference: State) -> Fold:
        return self.strategy.fold(reference)

    def next_state(
        self, round: int, current: State, combined: dict[str, torch.Tensor]
    ) -> dict[str, torch.Tensor]:
        return self.strategy.next_state(round, current, combined)

    def record(self, round: int) -> dict[str, Any]:
        return self.strategy.record(round)

    def evaluate(self, results: Sequence[tuple[int, Mapping[str, Any]]]) -> dict[str, float]:
        return self.strategy.evaluate(results)

    def state_dict(self) -> dict[str, torch.Tensor]:
        return {f"inner.{name}": value for name, value in self.strategy.state_dict().items()}

    def load_state_dict(self, state: Mapping[str, torch.Tensor]) -> None:
        self.strategy.load_state_dict(
            {
                name.removeprefix("inner."): value
                for name, value in state.items()
                if name.startswith("inner.")
            }
        )

    def describe(self) -> dict[str, Any]:
        described = super().describe()
        described["strategy"] = self.strategy.describe()
        return described


def layers(strategy: Strategy) -> list[Strategy]:
    """The strategy and every one it wraps, outermost first."""
    found = [strategy]
    while isinstance(found[-1], Wrapper):
        found.append(found[-1].strategy)
    return found


def innermost(strategy: Strategy) -> Strategy:
    """The strategy at the heart of any wrappers: the one whose fold a round uses."""
    return layers(strategy)[-1]


def require_mean(strategy: Strategy, why: str) -> None:
    """Refuse, for a wrapper, a strategy whose round is not a mean of the updates.

    Raises:
        ConfigurationError: saying ``why`` the wrapper needs a mean, and what would do.
    """
    if type(innermost(strategy)).fold is not Strategy.fold:
        raise ConfigurationError(
            "strategy",
            str(strategy),
            f"combines updates by a rule of its own (median, trimmed mean, Krum), {why}; "
            "wrap FedAvg, FedProx, FedAvgM or an adaptive FedOpt",
        )


def described_text(described: Mapping[str, Any]) -> str:
    """A strategy's description as a call, e.g. ``FedProx(weighted=True, mu=0.01)``."""
    parameters = {key: value for key, value in described.items() if key != "name"}
    arguments = ", ".join(
        f"{key}={described_text(value) if isinstance(value, Mapping) else repr(value)}"
        for key, value in parameters.items()
    )
    return f"{described.get('name', '?')}({arguments})"


def check_share(name: str, value: Any, *, lowest: float = 0.0, below: float = 1.0) -> None:
    """Refuse a parameter that is not a number in ``[lowest, below)``.

    Raises:
        ConfigurationError: naming the parameter.
    """
    if not (
        isinstance(value, (int, float)) and not isinstance(value, bool) and lowest <= value < below
    ):
        raise ConfigurationError(name, value, f"must be a number from {lowest:g} up to {below:g}")


def check_positive(name: str, value: Any) -> None:
    """Refuse a parameter that is not a positive finite number.

    Raises:
        ConfigurationError: naming the parameter.
    """
    if not (
        isinstance(value, (int, float)) and not isinstance(value, bool) and 0 < value < float("inf")
    ):
        raise ConfigurationError(name, value, "must be a positive number")
