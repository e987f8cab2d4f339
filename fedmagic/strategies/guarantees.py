"""What a task's strategy promises its data owners about privacy, in words they can check.

Read from the strategy's description (``Strategy.describe()``), the one form
every party has: participants get it with the code and consent to it, so
what consent shows and what runs are the same parameters.
"""

from __future__ import annotations

from typing import Any, Iterator, Mapping

__all__ = ["guarantees", "private_training", "secure_aggregation", "target_epsilon"]


def guarantees(described: Mapping[str, Any] | None) -> list[str]:
    """One line per privacy guarantee of the described strategy, outermost first; [] for none."""
    lines = []
    distributed = False
    for layer in _layers(described):
        if layer.get("name") == "SecureAggregation":
            lines.append(_secure_aggregation(layer))
            distributed = True
        elif layer.get("name") == "DifferentialPrivacy":
            lines.append(_differential_privacy(layer, distributed))
        elif layer.get("name") == "PrivateTraining":
            lines.append(_private_training(layer))
    return lines


def private_training(described: Mapping[str, Any] | None) -> Mapping[str, Any] | None:
    """The parameters of DP-SGD on participants, if the described strategy asks for it."""
    for layer in _layers(described):
        if layer.get("name") == "PrivateTraining":
            return layer
    return None


def secure_aggregation(described: Mapping[str, Any] | None) -> Mapping[str, Any] | None:
    """The parameters of secure aggregation, if the described strategy aggregates securely:
    then no update of this node may leave it unmasked."""
    for layer in _layers(described):
        if layer.get("name") == "SecureAggregation":
            return layer
    return None


def target_epsilon(described: Mapping[str, Any] | None) -> tuple[float, float] | None:
    """The ``(target_epsilon, delta)`` a differentially private task stays within, if it has one."""
    for layer in _layers(described):
        if layer.get("name") == "DifferentialPrivacy" and layer.get("target_epsilon") is not None:
            return float(layer["target_epsilon"]), float(layer["delta"])
    return None


def _layers(described: Mapping[str, Any] | None) -> Iterator[Mapping[str, Any]]:
    """The strategy and the ones it wraps, outermost first."""
    while isinstance(described, Mapping):
        yield described
        described = described.get("strategy")


def _secure_aggregation(layer: Mapping[str, Any]) -> str:
    threshold = layer.get("threshold")
    t = (
        f"t={threshold}"
        if threshold is not None
        else "t (a majority of each node's neighbours and itself, e.g. 3 of 5)"
    )
    return (
        "secure aggregation (SecAgg+): the initiator and the relay see each round's sum of "
        f"the updates, never one update, and only with at least {t} in it; updates "
        f"quantised to {layer.get('bits', 16)} bits"
    )


def _differential_privacy(layer: Mapping[str, Any], distributed: bool = False) -> str:
    by = (
        "by the participants before masking, each its share (distributed)"
        if distributed
        else "by the initiator"
    )
    how = (
        f"each update clipped to L2 norm {layer['clip']:g}, each participant drawn with "
        f"probability {layer['sampling']:g} a round, Gaussian noise of "
        f"{layer['noise_multiplier']:.3g} x {layer['clip']:g} on the sum, added {by}"
    )
    if layer.get("target_epsilon") is None:
        return (
            f"differential privacy: epsilon grows every round, with no target, at delta "
            f"{layer['delta']:g} ({how})"
        )
    return (
        f"differential privacy: epsilon at most {layer['target_epsilon']:g} at delta "
        f"{layer['delta']:g} ({how})"
    )


def _private_training(layer: Mapping[str, Any]) -> str:
    return (
        f"DP-SGD on every participant: each example's gradient clipped to L2 norm "
        f"{layer['max_grad_norm']:g}, Gaussian noise of {layer['noise_multiplier']:g} x "
        f"{layer['max_grad_norm']:g} on each batch; each node counts its own epsilon at delta "
        f"{layer['delta']:g}, which grows with its rounds"
    )
