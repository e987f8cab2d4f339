"""Differential privacy for a whole task: clipped updates, Poisson sampling, Gaussian noise.

McMahan et al. 2018, "Learning Differentially Private Recurrent Language
Models" (DP-FedAvg with a fixed denominator): each round every available
participant takes part with probability ``q``, on its own draw; each update
(its model minus the round's global model) is clipped to L2 norm ``C``; the
clipped updates are summed, Gaussian noise of standard deviation ``z * C``
is added to the sum, and the sum is divided by the *expected* number of
participants ``q * N``, not by how many came, so one participant changes
the result by at most ``C / (q N)`` whatever the others do. That is the
sampled Gaussian mechanism, one step per round; an RDP accountant from
Opacus turns the rounds so far into (epsilon, delta).

The noise is central: the initiator adds it, so the initiator itself is
trusted with the un-noised sum (secure aggregation is what takes that
away). The inner strategy steps the server from the noised mean, which is
post-processing and costs no privacy: FedAvg takes it as the next model,
FedAdam takes an Adam step along it.
"""

from __future__ import annotations

import random
import secrets
import warnings
from dataclasses import dataclass, field
from typing import Any, ClassVar, Mapping, Sequence

import torch

from ..errors import ConfigurationError
from .aggregate import Partial, State, accumulator_dtype, check_sums
from .base import Strategy, Wrapper, check_positive, check_share, innermost, layers, require_mean
from .fedavg import FedAvg

__all__ = ["ClippedSum", "DifferentialPrivacy", "PrivacyAccountant", "PrivateTraining", "innermost"]


class PrivacyAccountant:
    """(epsilon, delta) of the rounds so far: Opacus's RDP analysis, one step per round.

    Each round is one sampled Gaussian mechanism with sampling rate ``q`` and
    noise multiplier ``z``. Its Rényi divergences at Opacus's orders are
    computed once per ``(z, q)`` and added up per round, as Opacus's
    ``RDPAccountant`` adds them, so an epsilon takes microseconds, not a
    tenth of a second, on the round loop's thread.
    """

    def __init__(self, steps: Sequence[tuple[float, float]] = ()) -> None:
        self._steps: list[tuple[float, float]] = []
        self._once: dict[tuple[float, float], Any] = {}
        self._total: Any = 0.0
        for z, q in steps:
            self.step(z, q)

    def step(self, z: float, q: float) -> None:
        self._steps.append((z, q))
        self._total = self._total + self._rdp(z, q)

    @property
    def steps(self) -> list[tuple[float, float]]:
        """Every round's ``(z, q)``, in order."""
        return list(self._steps)

    def epsilon(self, delta: float) -> float:
        """Epsilon spent so far at ``delta``; 0 before the first round."""
        return self._epsilon(self._total, delta) if self._steps else 0.0

    def epsilon_after(self, z: float, q: float, delta: float) -> float:
        """What epsilon would be after one more round of ``(z, q)``."""
        return self._epsilon(self._total + self._rdp(z, q), delta)

    def _rdp(self, z: float, q: float) -> Any:
        from opacus.accountants import RDPAccountant
        from opacus.accountants.analysis.rdp import compute_rdp

        if (z, q) not in self._once:
            self._once[z, q] = compute_rdp(
                q=q, noise_multiplier=z, steps=1, orders=RDPAccountant.DEFAULT_ALPHAS
            )
        return self._once[z, q]

    @staticmethod
    def _epsilon(rdp: Any, delta: float) -> float:
        from opacus.accountants import RDPAccountant
        from opacus.accountants.analysis.rdp import get_privacy_spent

        epsilon, _ = get_privacy_spent(orders=RDPAccountant.DEFAULT_ALPHAS, rdp=rdp, delta=delta)
        return float(epsilon)


def calibrate(target_epsilon: float, delta: float, q: float, rounds: int) -> float:
    """The smallest noise multiplier whose ``rounds`` rounds spend at most ``target_epsilon``."""
    from opacus.accountants.utils import get_noise_multiplier

    with warnings.catch_warnings():  # the search's own orders, not the chosen z's
        warnings.filterwarnings("ignore", "Optimal order is the", UserWarning)
        return float(
            get_noise_multiplier(
                target_epsilon=target_epsilon,
                target_delta=delta,
                sample_rate=q,
                steps=rounds,
                accountant="rdp",
                epsilon_tolerance=0.005,
            )
        )


@dataclass(eq=False)
class DifferentialPrivacy(Wrapper):
    """Central differential privacy around a strategy whose round is a mean (FedAvg, FedOpt).

    Give either ``noise_multiplier`` or ``target_epsilon`` with ``rounds``,
    or both:

    - ``noise_multiplier`` alone: the noise is set; epsilon grows each round
      and the history records it.
    - ``target_epsilon`` and ``rounds``, without ``noise_multiplier``: the
      noise is calibrated so that ``rounds`` rounds spend ``target_epsilon``
      (describe() shows the ``noise_multiplier`` it chose).
    - ``target_epsilon`` with ``noise_multiplier``: the task stops before the
      round that would spend more than ``target_epsilon``.

    In every case with a ``target_epsilon``, no round is run that would pass it.

    Args:
        strategy: what steps the server from the noised mean: FedAvg (the
            default), FedProx, FedAvgM or an adaptive FedOpt; not the robust
            rules, whose result is not a mean of bounded updates. Its
            weighting gives way: every clipped update counts the same.
        clip: ``C``, the L2 norm each participant's update (its model minus
            the round's global model, over every floating-point tensor) is
            scaled down to.
        sampling: ``q``, each available participant's chance to take part in
            a round, drawn on its own. 1: everyone, every round. A draw of
            more than ``max_clients`` is cut down to it at random, which the
            accountant does not model (the history row says ``truncated``):
            keep ``max_clients`` at least the number of participants.
        noise_multiplier: ``z``; the noise on the sum has standard deviation
            ``z * clip``.
        target_epsilon: the most epsilon the task may spend, at ``delta``.
        delta: the delta epsilon is counted at; below 1 / (participants).
        rounds: the rounds ``target_epsilon`` is spread over, to calibrate
            the noise.

    Integer tensors (BatchNorm's batch counters) are not averaged: they keep
    the global model's values, since their updates are not clipped.
    """

    strategy: Strategy = field(default_factory=FedAvg)
    clip: float = 1.0
    sampling: float = 1.0
    noise_multiplier: float | None = None
    target_epsilon: float | None = None
    delta: float = 1e-5
    rounds: int | None = None

    #: A round takes whoever the draw gave, even none: Poisson sampling's guarantee needs it.
    applies_min_clients: ClassVar[bool] = False

    _accountant: PrivacyAccountant = field(init=False, repr=False)
    _z: float = field(init=False, repr=False)
    _current: State | None = field(default=None, init=False, repr=False)
    _expected: float = field(default=0.0, init=False, repr=False)
    _drawn: int = field(default=0, init=False, repr=False)
    _truncated: bool = field(default=False, init=False, repr=False)

    def __post_init__(self) -> None:
        inner = self.strategy
        if not isinstance(inner, Strategy) or isinstance(inner, DifferentialPrivacy):
            raise ConfigurationError(
                "strategy",
                inner,
                "must be a strategy to wrap, such as FedAvg() or FedAdam(eta=0.01), "
                "not another DifferentialPrivacy",
            )
        if any(type(layer).__name__ == "SecureAggregation" for layer in layers(inner)):
            raise ConfigurationError(
                "strategy",
                str(inner),
                "holds SecureAggregation, which must be the outermost wrapper so the "
                "participants add the noise before masking: write "
                "SecureAggregation(DifferentialPrivacy(...))",
            )
        require_mean(
            inner, "whose sensitivity to one participant has no bound to calibrate noise to"
        )
        check_positive("clip", self.clip)
        check_share("sampling", self.sampling, lowest=0.0, below=1.0 + 1e-12)
        if self.sampling <= 0:
            raise ConfigurationError("sampling", self.sampling, "must be above 0 and at most 1")
        check_share("delta", self.delta, lowest=1e-300)
        if self.target_epsilon is not None:
            check_positive("target_epsilon", self.target_epsilon)
        if self.noise_multiplier is not None:
            check_positive("noise_multiplier", self.noise_multiplier)
            self._z = float(self.noise_multiplier)
        elif self.target_epsilon is not None and self.rounds is not None:
            if isinstance(self.rounds, bool) or not isinstance(self.rounds, int) or self.rounds < 1:
                raise ConfigurationError("rounds", self.rounds, "must be a whole number above 0")
            self._z = calibrate(self.target_epsilon, self.delta, self.sampling, self.rounds)
        else:
            raise ConfigurationError(
                "noise_multiplier",
                None,
                "say how much noise: noise_multiplier=z, or target_epsilon=... with "
                "rounds=... to calibrate it (and delta, 1e-5 by default)",
            )
        self._accountant = PrivacyAccountant()

    # What the round loop asks.

    def sample(self, round: int, nodes: Sequence[str], most: int) -> list[str]:
        """Each of ``nodes`` on its own draw of probability ``sampling``; none is possible."""
        draw = random.SystemRandom()
        drawn = [node for node in nodes if draw.random() < self.sampling]
        self._expected = self.sampling * len(nodes)
        self._drawn = len(drawn)
        self._truncated = len(drawn) > most
        return draw.sample(drawn, most) if self._truncated else drawn

    def weight(self, samples: int) -> float:
        return 1.0  # every clipped update counts the same: their sum's bound is what is noised

    def begin(self, round: int, current: State) -> None:
        self._current = current
        super().begin(round, current)

    def fold(self, reference: State) -> ClippedSum:
        return ClippedSum(reference, self)

    def next_state(
        self, round: int, current: State, combined: dict[str, torch.Tensor]
    ) -> dict[str, torch.Tensor]:
        """``combined`` is the round's sum of clipped updates; noise it, divide, step.

        A round with nobody to draw from (all sat out) leaves the model as it
        was: it releases nothing, so it spends nothing.
        """
        return self.release(round, current, combined)

    def release(
        self,
        round: int,
        current: State,
        combined: dict[str, torch.Tensor],
        noised: bool = False,
    ) -> dict[str, torch.Tensor]:
        """Noise the sum (unless the participants did: ``noised``, distributed DP), divide
        it by the expected count, count the round, and let the wrapped strategy step."""
        if self._expected <= 0:
            return {name: tensor.clone() for name, tensor in current.items()}
        noise = torch.Generator().manual_seed(secrets.randbits(63))
        std = self._z * self.clip
        expected = self._expected
        mean: dict[str, torch.Tensor] = {}
        for name, tensor in current.items():
            if not tensor.is_floating_point():
                mean[name] = tensor.clone()
                continue
            total = combined[name]
            if not noised:
                noisy = torch.randn(total.shape, generator=noise, dtype=total.dtype)
                total.add_(noisy, alpha=std)
            start = tensor.detach().to(dtype=total.dtype)
            mean[name] = (start + total / expected).to(tensor.dtype)
        self._accountant.step(self._z, self.sampling)
        return self.strategy.next_state(round, current, mean)

    @property
    def expected(self) -> float:
        """This round's expected number of participants, ``q N``: what the sum is divided by."""
        return self._expected

    def stop_before(self, round: int) -> str | None:
        if self.target_epsilon is None:
            return super().stop_before(round)
        after = self._accountant.epsilon_after(self._z, self.sampling, self.delta)
        if after <= self.target_epsilon:
            return None
        spent = self._accountant.epsilon(self.delta)
        return (
            f"its privacy budget: round {round} would bring epsilon to {after:.3g}, over "
            f"target_epsilon={self.target_epsilon:g} at delta={self.delta:g} "
            f"({spent:.3g} spent)"
        )

    def record(self, round: int) -> dict[str, Any]:
        row: dict[str, Any] = {
            **super().record(round),
            "epsilon": self._accountant.epsilon(self.delta),
            "delta": self.delta,
            "drawn": self._drawn,
        }
        if self._truncated:
            row["truncated"] = True
        return row

    def state_dict(self) -> dict[str, torch.Tensor]:
        steps = self._accountant.steps
        state = super().state_dict()
        state["accountant"] = torch.tensor(steps, dtype=torch.float64).reshape(len(steps), 2)
        return state

    def load_state_dict(self, state: Mapping[str, torch.Tensor]) -> None:
        super().load_state_dict(state)
        steps = state.get("accountant")
        self._accountant = PrivacyAccountant(
            [] if steps is None else [(float(z), float(q)) for z, q in steps.tolist()]
        )

    def describe(self) -> dict[str, Any]:
        return {**super().describe(), "noise_multiplier": self._z}  # the calibrated one too

    @property
    def epsilon(self) -> float:
        """Epsilon spent so far, at ``delta``."""
        return self._accountant.epsilon(self.delta)


@dataclass(eq=False)
class PrivateTraining(Wrapper):
    """Sample-level differential privacy on every participant: DP-SGD (Abadi et al. 2016).

    Each participant's own optimizer, made private with Opacus, clips every
    example's gradient to L2 norm ``max_grad_norm`` and adds Gaussian noise of
    ``noise_multiplier * max_grad_norm`` to each batch's sum before it steps.
    Each node counts its own epsilon, at ``delta``, with Opacus's RDP
    accountant (its sampling rate is its batch size over its examples) and
    reports it with every round: a bound on what its updates reveal about one
    of its own examples, whoever sees them. Nothing changes on the
    initiator: the wrapped strategy combines the updates.

    The task's scheduler has to keep its optimizer as ``self.optimizer``
    (the tutorial makes it in ``make_model()``), average its loss over the
    batch, and use layers Opacus supports (GroupNorm, not BatchNorm); a
    participant where it cannot fails its verification saying why.
    Epsilon assumes batches drawn at random; a shuffled loader is the usual
    stand-in.
    """

    strategy: Strategy = field(default_factory=FedAvg)
    noise_multiplier: float = 1.0
    max_grad_norm: float = 1.0
    delta: float = 1e-5

    def __post_init__(self) -> None:
        if not isinstance(self.strategy, Strategy):
            raise ConfigurationError(
                "strategy", self.strategy, "must be a strategy to wrap, such as FedAvg()"
            )
        check_positive("noise_multiplier", self.noise_multiplier)
        check_positive("max_grad_norm", self.max_grad_norm)
        check_share("delta", self.delta, lowest=1e-300)


class ClippedSum:
    """A round's updates, each clipped to L2 norm ``clip`` around the round's global model,
    summed. One accumulator per floating-point tensor, however many updates come."""

    keeps: ClassVar[bool] = False

    def __init__(self, reference: State, privacy: DifferentialPrivacy) -> None:
        self._privacy = privacy
        self._sums = {
            name: torch.zeros(tensor.shape, dtype=accumulator_dtype(tensor.dtype))
            for name, tensor in reference.items()
            if tensor.is_floating_point()
        }
        self.count = 0
        #: Each update's norm before clipping, this round: what a display may show.
        self.norms: list[float] = []

    def add(self, state: State, weight: float) -> None:
        current = self._privacy._current
        assert current is not None, "the round loop calls begin() before it folds"
        sums = list(self._sums.values())
        deltas = torch._foreach_sub(
            [state[name].detach().to(dtype=total.dtype) for name, total in self._sums.items()],
            [current[name].to(dtype=total.dtype) for name, total in self._sums.items()],
        )
        norms = torch._foreach_norm(deltas) if deltas else []
        norm = float(torch.linalg.vector_norm(torch.stack(list(norms)))) if norms else 0.0
        scale = min(1.0, self._privacy.clip / norm) if norm > 0 else 1.0
        torch._foreach_add_(sums, deltas, alpha=scale)
        self.norms.append(norm)
        self.count += 1

    def combine(self) -> dict[str, torch.Tensor]:
        """The sum (not a mean: the noise and the fixed denominator are the strategy's)."""
        total = {name: value.clone() for name, value in self._sums.items()}
        self.reset()
        return total

    def reset(self) -> None:
        for total in self._sums.values():
            total.zero_()
        self.count = 0
        self.norms = []

    def shares_memory_with(self, state: State) -> bool:
        return False  # combine() hands out copies

    def partial(self) -> Partial:
        taken = Partial(
            {name: total.clone() for name, total in self._sums.items()}, count=self.count
        )
        self.reset()
        return taken

    def merge(self, partial: Partial) -> None:
        """Add another fold's sum of clipped updates in (each was clipped where it was folded)."""
        if partial.count == 0:
            return
        check_sums(partial.sums, self._sums)
        torch._foreach_add_(list(self._sums.values()), [partial.sums[n] for n in self._sums])
        self.count += partial.count
