"""Secure aggregation for a whole task: the initiator learns each round's sum, never one update.

Each round runs SecAgg+ (:mod:`fedmagic.strategies.secagg`) among the
round's participants. Each uploads its update (its model minus the round's
global model, times its share of the round's weight) quantised and masked:
the initiator and the relay hold masked words only, until the updates of at
least ``t`` participants are summed and the masks cancel. The next model is
the global model plus that weighted mean, which the wrapped strategy steps
from as it would in the clear (FedAvg takes it, FedAdam takes an Adam step
along it).

With :class:`~fedmagic.strategies.privacy.DifferentialPrivacy` inside,
``SecureAggregation(DifferentialPrivacy(...))``, the noise moves to the
participants (distributed DP): each clips its own update to L2 norm ``C``
and adds Gaussian noise of standard deviation ``z C / sqrt(t)`` before
masking. A revealed sum holds at least ``t`` updates, so at least the
central mechanism's ``z C`` of noise, and nobody (initiator, relay, other
participants) ever sees an un-noised sum. The draw, the fixed denominator
``q N`` and the accountant stay DifferentialPrivacy's.

Both sides derive a round's parameters from the strategy's description
(:func:`round_settings`), which data owners consent to and the code hash
covers: the initiator chooses who takes part and their weights, not the
threshold, the quantisation or the noise.
"""

from __future__ import annotations

import math
import secrets
from dataclasses import dataclass, field
from typing import Any, Mapping, Sequence

import torch

from ..errors import ConfigurationError
from .aggregate import State
from .base import Strategy, Wrapper, check_positive, layers, require_mean
from .fedavg import FedAvg
from .privacy import DifferentialPrivacy
from .secagg import SecAggParameters, SecAggServer, SecureSum

__all__ = ["RoundSettings", "SecureAggregation", "SecureRoundPlan", "round_settings"]

#: The fewest participants a secure round can have: with two, each learns the other's update.
FEWEST = 3
#: Under distributed DP, the masked range reaches this many noise deviations past ``C``.
NOISE_DEVIATIONS = 6.0


@dataclass(frozen=True)
class RoundSettings:
    """What a secure round of ``parameters.participants`` nodes runs with."""

    parameters: SecAggParameters
    #: Under distributed DP: the L2 norm each participant clips its update to.
    l2_clip: float | None = None
    #: Under distributed DP: the standard deviation of each participant's noise per weight.
    noise_sd: float = 0.0


def round_settings(described: Mapping[str, Any], participants: int) -> RoundSettings:
    """The settings of a secure round of ``participants`` nodes, from the task's strategy as
    described (``SecureAggregation.describe()``): the initiator and every participant derive
    the same, from what the data owners consented to.

    Without ``clip``, the masked range is ``[-1, 1]`` for a weighted mean (each update is
    scaled by its share of the round's weight), and under distributed DP ``C`` plus
    :data:`NOISE_DEVIATIONS` deviations of a participant's noise, which a coordinate passes
    with probability 2e-9.

    Raises:
        ConfigurationError: for parameters no round of ``participants`` nodes can run with.
    """
    bits = described.get("bits", 16)
    first = SecAggParameters(
        participants,
        threshold=described.get("threshold"),
        degree=described.get("degree"),
        bits=bits,
    )
    privacy = _privacy_layer(described.get("strategy"))
    l2_clip, noise_sd = None, 0.0
    if privacy is not None:
        l2_clip = float(privacy["clip"])
        noise_sd = float(privacy["noise_multiplier"]) * l2_clip / math.sqrt(first.threshold)
    clip = described.get("clip")
    if clip is None:
        clip = 1.0 if l2_clip is None else l2_clip + NOISE_DEVIATIONS * noise_sd
    parameters = SecAggParameters(
        participants, threshold=first.threshold, degree=first.degree, clip=clip, bits=bits
    )
    return RoundSettings(parameters, l2_clip, noise_sd)


@dataclass(eq=False)
class SecureAggregation(Wrapper):
    """SecAgg+ around a strategy whose round is a mean (FedAvg, FedProx, FedAvgM, FedOpt),
    optionally with :class:`DifferentialPrivacy` inside it, for distributed DP.

    Args:
        strategy: what steps the server from the round's mean; not a robust
            rule (median, Krum), which needs every update in the clear.
        threshold: ``t``, the fewest updates a revealed sum may hold, and the
            shares that rebuild a participant's secrets. Above half of each
            neighbourhood of ``degree + 1`` nodes. Default: the smallest
            majority of it, which survives the most dropouts.
        degree: neighbours each participant agrees keys with; the cost of a
            round grows as ``n * degree``. Default: ``2 ceil(log2 n) + 2``
            (everyone up to 11 nodes), so ``n log n`` in all.
        clip: each coordinate of a participant's (weighted) update is clipped
            to ``[-clip, clip]`` before it is quantised; see :func:`round_settings`
            for the default.
        bits: quantisation to ``2^bits`` levels across ``[-clip, clip]``,
            rounded stochastically (unbiased). A sum of ``m`` updates is off by
            less than ``m * 2 clip / (2^bits - 1)`` per weight; the history's
            ``error_bound`` says it for the weighted mean of each round.

    A round needs at least 3 participants; the task needs ``min_clients`` of
    at least 3. The threat model is SecAgg+'s: an honest-but-curious
    initiator and relay, and participants that may drop at any stage; see
    :mod:`fedmagic.strategies.secagg`.
    """

    strategy: Strategy = field(default_factory=FedAvg)
    threshold: int | None = None
    degree: int | None = None
    clip: float | None = None
    bits: int = 16

    _dropped_draw: int = field(default=0, init=False, repr=False)
    _last: SecureRoundPlan | None = field(default=None, init=False, repr=False)

    def __post_init__(self) -> None:
        inner = self.strategy
        if not isinstance(inner, Strategy) or any(
            isinstance(layer, SecureAggregation) for layer in layers(inner)
        ):
            raise ConfigurationError(
                "strategy",
                inner,
                "must be a strategy to wrap, such as FedAvg() or DifferentialPrivacy(...), "
                "not another SecureAggregation",
            )
        require_mean(
            inner, "which needs every update in the clear; secure aggregation reveals their sum"
        )
        if self.clip is not None:
            check_positive("clip", self.clip)
        SecAggParameters(FEWEST, bits=self.bits)  # bits now; threshold and degree in check()

    @property
    def privacy(self) -> DifferentialPrivacy | None:
        """The differential privacy inside, whose noise the participants add."""
        found = [layer for layer in layers(self.strategy) if isinstance(layer, DifferentialPrivacy)]
        return found[0] if found else None

    def check(self, min_clients: int, max_clients: int) -> None:
        super().check(min_clients, max_clients)
        if self.applies_min_clients and min_clients < FEWEST:
            raise ConfigurationError(
                "min_clients",
                min_clients,
                f"secure aggregation needs at least {FEWEST} participants a round (with 2, "
                "each learns the other's update from the sum and its own): set min_clients=3 "
                "or more",
            )
        described = self.describe()
        for participants in range(max(min_clients, FEWEST), max_clients + 1):
            try:
                round_settings(described, participants)
            except ConfigurationError as refused:
                raise ConfigurationError(
                    refused.parameter,
                    refused.value,
                    f"{refused.reason} (for a round of {participants} participants, which "
                    f"min_clients={min_clients} and max_clients={max_clients} allow)",
                ) from None

    def sample(self, round: int, nodes: Sequence[str], most: int) -> list[str]:
        """The wrapped strategy's draw; a random draw of fewer than 3 is dropped (the round
        then runs with nobody), since a secure round of 1 or 2 would give their updates away."""
        drawn = super().sample(round, nodes, most)
        self._dropped_draw = len(drawn) if 0 < len(drawn) < FEWEST else 0
        return [] if self._dropped_draw else drawn

    def protect(
        self, round: int, current: State, weights: Mapping[str, float]
    ) -> SecureRoundPlan | None:
        """The secure round the updates of ``weights``' nodes travel under."""
        nodes = sorted(weights)
        if len(nodes) < FEWEST:
            return None
        settings = round_settings(self.describe(), len(nodes))
        nonce = secrets.token_bytes(32)
        template = {name: t for name, t in current.items() if t.is_floating_point()}
        privacy, denominator = self.privacy, None
        if privacy is not None:  # every clipped update counts the same: DP's fixed sum
            scales = dict.fromkeys(nodes, 1.0)
            denominator = privacy.expected
        else:
            total = sum(weights.values())
            scales = {node: weights[node] / total for node in nodes}
        server = SecAggServer(nodes, settings.parameters, nonce, template)
        self._last = SecureRoundPlan(round, settings, nonce, server, scales, current, denominator)
        return self._last

    def next_state(
        self, round: int, current: State, combined: dict[str, torch.Tensor]
    ) -> dict[str, torch.Tensor]:
        """``combined`` is the plan's: the weighted mean model, or under distributed DP the
        participants' noised sum, which DifferentialPrivacy divides without noising again."""
        privacy = self.privacy
        if privacy is not None and self._last is not None and self._last.number == round:
            return privacy.release(round, current, combined, noised=True)
        return super().next_state(round, current, combined)

    def record(self, round: int) -> dict[str, Any]:
        row = super().record(round)
        plan = self._last
        if plan is not None and plan.number == round:
            row["threshold"] = plan.settings.parameters.threshold
            if plan.revealed is not None:
                row["error_bound"] = plan.error_bound
        if self._dropped_draw:
            row["dropped_draw"] = self._dropped_draw
        return row


@dataclass(eq=False)
class SecureRoundPlan:
    """One secure round as the strategy sets it: who, with what, and what its sum becomes.

    The round loop moves the server's messages (:attr:`server`) and hands the
    revealed sum to :meth:`combined`.
    """

    number: int
    settings: RoundSettings
    nonce: bytes
    server: SecAggServer
    #: What each participant scales its update by: its share of the round's weight, or 1.
    scales: dict[str, float]
    current: State
    #: Under distributed DP: what DifferentialPrivacy divides the sum by, ``q N``.
    denominator: float | None = None
    revealed: SecureSum | None = None

    def setup(self, node: str) -> dict[str, Any]:
        """What ``node`` is told to start the round: the others, the nonce, its scale."""
        return {"nodes": list(self.server.nodes), "nonce": self.nonce, "scale": self.scales[node]}

    def masked_template(self) -> dict[str, torch.Tensor]:
        """A masked upload's shape: one vector of words modulo the round's modulus."""
        parameters = self.settings.parameters
        size = sum(tensor.numel() for tensor in self.server.template.values())
        dtype = torch.uint32 if parameters.modulus_bits == 32 else torch.uint64
        return {"masked": torch.zeros(size, dtype=dtype)}

    @property
    def error_bound(self) -> float:
        """The most the round's mean can be off per weight from the exact mean of the
        clipped updates (quantisation), over the survivors' total scale."""
        assert self.revealed is not None, "the round's sum is revealed"
        if self.denominator is not None:
            return self.revealed.error_bound / self.denominator
        return self.revealed.error_bound / sum(self.scales[node] for node in self.revealed.nodes)

    def combined(self, revealed: SecureSum) -> dict[str, torch.Tensor]:
        """What the round's sum stands for, as the wrapped strategy's fold would give it.

        The weighted mean model (integer tensors keep the global model's values), or
        under distributed DP the sum of the noised, clipped updates.
        """
        self.revealed = revealed
        total = revealed.total
        if self.settings.l2_clip is not None:
            return {name: tensor.clone() for name, tensor in total.items()}
        scale = sum(self.scales[node] for node in revealed.nodes)
        combined = {}
        for name, tensor in self.current.items():
            if name in total:
                mean = tensor.detach().to(torch.float64) + total[name] / scale
                combined[name] = mean.to(tensor.dtype)
            else:
                combined[name] = tensor.clone()
        return combined


def _privacy_layer(described: Any) -> Mapping[str, Any] | None:
    while isinstance(described, Mapping):
        if described.get("name") == DifferentialPrivacy.__name__:
            return described
        described = described.get("strategy")
    return None
