"""Adaptive server optimisers: FedAdagrad, FedAdam and FedYogi.

Reddi et al. 2021, "Adaptive Federated Optimization" (Algorithm 2). The
round's weighted mean minus the current model is a pseudo-gradient Δ, and
the server takes an adaptive step along it:

    m = beta1 * m + (1 - beta1) * Δ
    v = v + Δ²                                        FedAdagrad
    v = beta2 * v + (1 - beta2) * Δ²                  FedAdam
    v = v - (1 - beta2) * Δ² * sign(v - Δ²)           FedYogi
    x = x + eta * m / (sqrt(v) + tau)

with ``m`` starting at 0 and ``v`` at ``tau²`` (the paper's ``v₋₁ ≥ τ²``),
and no bias correction, as in the paper. The paper's defaults: ``beta1 =
0.9``, ``beta2 = 0.99``, ``tau = 1e-3``; ``eta`` is the one to tune (the
paper searches 10^-3 to 10^1 and finds 10^-2 to 10^-1 best on most tasks).
The moments stay in float32 (float64 for a float64 model), two copies of
the model's floating tensors, and go into the checkpoint. Integer tensors
(BatchNorm's counters) take the round's mean as it is.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Mapping

import torch

from .aggregate import State, accumulator_dtype
from .base import check_positive, check_share
from .fedavg import FedAvg

__all__ = ["FedAdagrad", "FedAdam", "FedOpt", "FedYogi"]


@dataclass(eq=False)
class FedOpt(FedAvg):
    """FedAvg's mean, then an adaptive server step; subclasses say how ``v`` moves.

    Args:
        eta: the server's learning rate.
        beta1: the first moment's decay.
        tau: the adaptivity: how small a ``sqrt(v)`` still divides.
    """

    eta: float = 1e-2
    beta1: float = 0.9
    tau: float = 1e-3
    _moments: dict[str, tuple[torch.Tensor, torch.Tensor]] = field(
        default_factory=dict, init=False, repr=False
    )

    def __post_init__(self) -> None:
        super().__post_init__()
        check_positive("eta", self.eta)
        check_share("beta1", self.beta1)
        check_positive("tau", self.tau)

    def next_state(
        self, round: int, current: State, combined: dict[str, torch.Tensor]
    ) -> dict[str, torch.Tensor]:
        new = {}
        for name, tensor in current.items():
            if not tensor.is_floating_point():
                new[name] = combined[name]
                continue
            start = tensor.detach().to(dtype=accumulator_dtype(tensor.dtype), copy=True)
            delta = combined[name].to(start.dtype) - start
            if name not in self._moments:
                self._moments[name] = (
                    torch.zeros_like(start),
                    torch.full_like(start, self.tau**2),
                )
            first, second = self._moments[name]
            first.mul_(self.beta1).add_(delta, alpha=1 - self.beta1)
            self._second_moment(second, delta.square_())
            step = first / second.sqrt().add_(self.tau)
            new[name] = start.add_(step, alpha=self.eta).to(tensor.dtype)
        return new

    def _second_moment(self, v: torch.Tensor, delta_squared: torch.Tensor) -> None:
        """Move ``v`` in place, given ``Δ²``."""
        raise NotImplementedError

    def state_dict(self) -> dict[str, torch.Tensor]:
        state = {}
        for name, (first, second) in self._moments.items():
            state[f"m.{name}"], state[f"v.{name}"] = first, second
        return state

    def load_state_dict(self, state: Mapping[str, torch.Tensor]) -> None:
        self._moments = {
            name.removeprefix("m."): (value.clone(), state["v." + name.removeprefix("m.")].clone())
            for name, value in state.items()
            if name.startswith("m.")
        }


@dataclass(eq=False)
class FedAdagrad(FedOpt):
    """FedOpt with Adagrad's ``v``: the sum of every round's ``Δ²``."""

    def _second_moment(self, v: torch.Tensor, delta_squared: torch.Tensor) -> None:
        v.add_(delta_squared)


@dataclass(eq=False)
class FedAdam(FedOpt):
    """FedOpt with Adam's ``v``: an exponential mean of ``Δ²``.

    Args:
        beta2: the second moment's decay.
    """

    beta2: float = 0.99

    def __post_init__(self) -> None:
        super().__post_init__()
        check_share("beta2", self.beta2)

    def _second_moment(self, v: torch.Tensor, delta_squared: torch.Tensor) -> None:
        v.mul_(self.beta2).add_(delta_squared, alpha=1 - self.beta2)


@dataclass(eq=False)
class FedYogi(FedOpt):
    """FedOpt with Yogi's ``v``, which grows and shrinks by at most ``(1 - beta2) Δ²``:
    steadier than Adam's when ``Δ²`` swings (Zaheer et al. 2018).

    Args:
        beta2: how fast ``v`` follows ``Δ²``.
    """

    beta2: float = 0.99

    def __post_init__(self) -> None:
        super().__post_init__()
        check_share("beta2", self.beta2)

    def _second_moment(self, v: torch.Tensor, delta_squared: torch.Tensor) -> None:
        v.sub_(delta_squared * torch.sign(v - delta_squared), alpha=1 - self.beta2)
