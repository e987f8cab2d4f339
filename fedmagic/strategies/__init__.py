"""How a round combines its updates: FedAvg and the strategies researchers compare it with.

Pass one to ``launch_task``::

    from fedmagic.strategies import FedAdam
    scheduler.launch_task(task_id="digits", strategy=FedAdam(eta=1e-2))

=================  ======================================================
``FedAvg``         the sample-weighted mean (the default)
``FedProx``        FedAvg, with a proximal term in each participant's loss
``FedAvgM``        FedAvg with server momentum
``FedAdagrad``,    FedAvg's mean as a pseudo-gradient for an adaptive
``FedAdam``,       server optimiser
``FedYogi``
``FedMedian``,     robust rules: each coordinate's median or trimmed mean,
``FedTrimmedAvg``
``Krum``,          or the updates closest to their neighbours
``MultiKrum``
``Differential``   a wrapper: clipped updates, Poisson sampling and
``Privacy``        Gaussian noise, with a privacy budget spent per round
``Private``        a wrapper: DP-SGD on every participant, each counting
``Training``       its own epsilon
``Secure``         a wrapper: SecAgg+, so the initiator sees each round's
``Aggregation``    sum only; around DifferentialPrivacy, distributed DP
=================  ======================================================

:class:`Strategy` is the seam the round loop asks; subclass it for a rule
of your own.
"""

from __future__ import annotations

from typing import Any, Mapping

from ..errors import ConfigurationError
from .base import Strategy
from .fedavg import FedAvg, FedAvgM, FedProx, proximal_term
from .fedopt import FedAdagrad, FedAdam, FedOpt, FedYogi
from .privacy import DifferentialPrivacy, PrivateTraining
from .robust import FedMedian, FedTrimmedAvg, Krum, MultiKrum
from .secure import SecureAggregation

__all__ = [
    "BY_NAME",
    "DifferentialPrivacy",
    "FedAdagrad",
    "FedAdam",
    "FedAvg",
    "FedAvgM",
    "FedMedian",
    "FedOpt",
    "FedProx",
    "FedTrimmedAvg",
    "FedYogi",
    "Krum",
    "MultiKrum",
    "PrivateTraining",
    "SecureAggregation",
    "Strategy",
    "proximal_term",
    "rebuild",
    "resolve",
]

#: The built-in strategies by the short names the command line and ``strategy="..."`` take.
BY_NAME: dict[str, type[Strategy]] = {
    "fedavg": FedAvg,
    "fedprox": FedProx,
    "fedavgm": FedAvgM,
    "fedadagrad": FedAdagrad,
    "fedadam": FedAdam,
    "fedyogi": FedYogi,
    "median": FedMedian,
    "trimmed": FedTrimmedAvg,
    "krum": Krum,
    "multikrum": MultiKrum,
}


def resolve(strategy: Any) -> Strategy:
    """A strategy object from what ``launch_task(strategy=...)`` was given.

    Args:
        strategy: a :class:`Strategy`, a short name from :data:`BY_NAME` (its
            defaults), or None for FedAvg.

    Raises:
        ConfigurationError: for anything else, listing the names.
    """
    if strategy is None:
        return FedAvg()
    if isinstance(strategy, Strategy):
        return strategy
    if isinstance(strategy, str) and strategy.lower() in BY_NAME:
        return BY_NAME[strategy.lower()]()
    if isinstance(strategy, type) and issubclass(strategy, Strategy):
        raise ConfigurationError(
            "strategy", strategy, f"pass an instance: strategy={strategy.__name__}()"
        )
    raise ConfigurationError(
        "strategy",
        strategy,
        "pass a strategy from fedmagic.strategies, e.g. strategy=FedAdam(eta=1e-2), or one "
        f"of the names {', '.join(BY_NAME)}",
    )


_BUILT_IN: dict[str, type[Strategy]] = {
    cls.__name__: cls for cls in (*BY_NAME.values(), FedOpt, PrivateTraining)
}


def rebuild(described: Mapping[str, Any]) -> Strategy:
    """The built-in strategy a description (``Strategy.describe()``) names, with its parameters.

    How a participant elected to aggregate a round folds updates just as the
    initiator would.

    Raises:
        ConfigurationError: for a strategy that is not one of fedmagic's.
    """
    name = described.get("name")
    if name == SecureAggregation.__name__:
        raise ConfigurationError(
            "strategy",
            name,
            "runs its protocol between the initiator and the participants; with "
            "is_centralized=False the elected participant would receive the updates "
            "instead; use is_centralized=True",
        )
    if name == DifferentialPrivacy.__name__:
        raise ConfigurationError(
            "strategy",
            name,
            "adds its noise where a round is combined, so with is_centralized=False the "
            "elected participant would see the round's updates without it; use "
            "is_centralized=True",
        )
    cls = _BUILT_IN.get(name) if isinstance(name, str) else None
    if cls is None:
        raise ConfigurationError(
            "strategy",
            name,
            "is not one of fedmagic.strategies, so a participant elected to aggregate "
            "(is_centralized=False) cannot rebuild it; use a built-in strategy, or "
            "is_centralized=True",
        )
    parameters = {key: value for key, value in described.items() if key != "name"}
    if isinstance(parameters.get("strategy"), Mapping):  # a wrapper's wrapped one
        parameters["strategy"] = rebuild(parameters["strategy"])
    return cls(**parameters)
