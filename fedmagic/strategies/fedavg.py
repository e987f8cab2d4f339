"""FedAvg and the strategies that keep its running mean: FedProx and FedAvgM.

FedAvg (McMahan et al. 2017, "Communication-Efficient Learning of Deep
Networks from Decentralized Data"): the next model is the participants'
models averaged, weighted by their training samples. Each update is folded
into one running sum as it arrives, so a round holds a few copies of the
model however many take part.
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field
from typing import Any, Mapping

import torch
from torch import nn

from ..errors import ConfigurationError, TaskDefinitionError
from .aggregate import State, accumulator_dtype
from .base import Strategy, check_positive, check_share

__all__ = ["FedAvg", "FedAvgM", "FedProx", "over_share", "proximal_term"]


@dataclass(eq=False)
class FedAvg(Strategy):
    """Federated averaging: the sample-weighted mean of the round's models.

    Args:
        weighted: weight each update by its samples; False: the plain mean.
        max_weight_share: the largest share of a round's weight one node may
            carry; a node over it sits that round out, so one inflated sample
            count cannot steer the model. None: no cap.
    """

    weighted: bool = True
    max_weight_share: float | None = None

    def __post_init__(self) -> None:
        if not isinstance(self.weighted, bool):
            raise ConfigurationError("weighted", self.weighted, "must be True or False")
        share = self.max_weight_share
        if share is not None and not (
            isinstance(share, (int, float))
            and not isinstance(share, bool)
            and math.isfinite(share)
            and 0 < share <= 1
        ):
            raise ConfigurationError(
                "max_weight_share",
                share,
                "must be a share above 0 and at most 1 (0.5: no node "
                "carries more than half a round's weight), or None",
            )

    def check(self, min_clients: int, max_clients: int) -> None:
        share = self.max_weight_share
        if share is not None and self.weighted and share * min_clients < 1:
            raise ConfigurationError(
                "max_weight_share",
                share,
                f"cannot be met by a round of min_clients="
                f"{min_clients}: some node always carries at least 1/{min_clients} of the "
                f"weight; raise it to {1 / min_clients:.3g} or more",
            )

    def exclude(self, round: int, samples: Mapping[str, int]) -> dict[str, str]:
        share = self.max_weight_share
        if share is None or not self.weighted:
            return {}
        return {
            node: (
                f"its {samples[node]} samples would be {part:.0%} of round {round}'s "
                f"weight, over max_weight_share={share:g}"
            )
            for node, part in over_share(dict(samples), share).items()
        }

    def weight(self, samples: int) -> float:
        return float(samples) if self.weighted else 1.0


@dataclass(eq=False)
class FedProx(FedAvg):
    """FedAvg whose participants keep near the global model: for non-IID data.

    Li et al. 2020, "Federated Optimization in Heterogeneous Networks": each
    participant minimises its loss plus ``mu / 2 * ||w - w_global||^2``. The
    participant receives ``mu`` with each round, and its ``train()`` adds
    ``self.proximal_term()`` to its loss (zero under any other strategy, so
    one ``train()`` serves all of them).

    Args:
        mu: the proximal term's weight; 0 is FedAvg (the paper tries 0.001 to 1).
    """

    mu: float = 0.01

    def __post_init__(self) -> None:
        super().__post_init__()
        check_share("mu", self.mu, below=float("inf"))

    def config(self, round: int, node: str) -> dict[str, Any]:
        return {"mu": float(self.mu)}


@dataclass(eq=False)
class FedAvgM(FedAvg):
    """FedAvg with server momentum (Hsu et al. 2019, "Measuring the Effects of
    Non-Identical Data Distribution for Federated Visual Classification").

    With Δ the round's mean minus the current model: ``v = momentum * v + Δ``,
    then ``x = x + server_lr * v``. ``server_lr=1, momentum=0`` is FedAvg.

    Args:
        server_lr: the server's step size.
        momentum: how much of the last step carries on (the paper uses 0.9).
    """

    server_lr: float = 1.0
    momentum: float = 0.9
    _velocity: dict[str, torch.Tensor] = field(default_factory=dict, init=False, repr=False)

    def __post_init__(self) -> None:
        super().__post_init__()
        check_positive("server_lr", self.server_lr)
        check_share("momentum", self.momentum)

    def next_state(
        self, round: int, current: State, combined: dict[str, torch.Tensor]
    ) -> dict[str, torch.Tensor]:
        new = {}
        for name, tensor in current.items():
            if not tensor.is_floating_point():  # counters take the mean as it is
                new[name] = combined[name]
                continue
            start = tensor.detach().to(dtype=accumulator_dtype(tensor.dtype), copy=True)
            delta = combined[name].to(start.dtype) - start
            velocity = self._velocity.get(name)
            if velocity is None:
                velocity = self._velocity[name] = torch.zeros_like(start)
            velocity.mul_(self.momentum).add_(delta)
            new[name] = start.add_(velocity, alpha=self.server_lr).to(tensor.dtype)
        return new

    def state_dict(self) -> dict[str, torch.Tensor]:
        return {f"velocity.{name}": value for name, value in self._velocity.items()}

    def load_state_dict(self, state: Mapping[str, torch.Tensor]) -> None:
        self._velocity = {
            name.removeprefix("velocity."): value.clone()
            for name, value in state.items()
            if name.startswith("velocity.")
        }


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


def proximal_term(model: nn.Module, reference: State, mu: float) -> torch.Tensor:
    """FedProx's ``mu / 2 * ||w - w_ref||^2`` over the model's trainable parameters.

    Parameters are matched to ``reference`` (the global state as received)
    by name, so ``state_dict()`` must use the model's own names, as
    ``self.model.state_dict()`` does.

    Raises:
        TaskDefinitionError: if no parameter of the model is in ``reference``.
    """
    terms = [
        (parameter - reference[name].to(parameter.device, parameter.dtype)).pow(2).sum()
        for name, parameter in model.named_parameters()
        if parameter.requires_grad and name in reference
    ]
    if not terms:
        raise TaskDefinitionError(
            type(model).__name__,
            "has no parameter named as in the task's state_dict()",
            "proximal_term() compares the model's parameters with the global state by name: "
            "return self.model.state_dict() from state_dict()",
        )
    return mu / 2 * torch.stack(terms).sum()
