"""How updates combine, as pure functions over state dicts.

McMahan et al., "Communication-Efficient Learning of Deep Networks from
Decentralized Data" (2017): the new global model is the mean of the
participants' models, weighted by how many samples each trained on.

Policy for dtypes: floating and complex tensors are averaged in at least
float32 (float64 stays float64) and cast back; integer tensors (BatchNorm's
``num_batches_tracked``, say) are averaged in float64 and rounded half to
even; ``torch.bool`` tensors are refused, because a mean of flags is not a
flag.
"""

from __future__ import annotations

import cmath
import math
from dataclasses import dataclass, field
from typing import Callable, ClassVar, Iterable, Mapping, Protocol, Sequence

import torch

from ..errors import AggregationError, UnsupportedTensor
from ..wire.codec import DTYPES

__all__ = [
    "Fold",
    "KeptUpdates",
    "Partial",
    "WeightedMean",
    "accumulator_dtype",
    "check_sums",
    "check_state",
    "coordinate_median",
    "krum_scores",
    "multi_krum",
    "non_finite",
    "trimmed_mean",
    "weighted_mean",
]

State = Mapping[str, torch.Tensor]


def check_state(state: object) -> None:
    """Refuse, before round 1, a ``state_dict()`` FedAvg cannot average.

    Raises:
        UnsupportedTensor: for a value that is not a dense tensor of a
            dtype that can travel and be averaged.
    """
    if not isinstance(state, Mapping):
        raise UnsupportedTensor(
            None,
            f"a {type(state).__name__}, not a mapping",
            "state_dict() must return a dict of name -> tensor",
        )
    for name, value in state.items():
        if not isinstance(name, str):
            raise UnsupportedTensor(
                name,
                f"stored under a key of type {type(name).__name__}",
                "state dict keys travel as strings; rename it",
            )
        if not isinstance(value, torch.Tensor):
            raise UnsupportedTensor(
                name,
                f"a value of type {type(value).__name__}, not a tensor",
                "only tensors are averaged; keep other values out "
                "of state_dict() or turn them into tensors",
            )
        if value.dtype == torch.bool:
            raise UnsupportedTensor(
                name,
                "a torch.bool tensor",
                "FedAvg cannot average flags (the mean of True and "
                "False is no bool). Return it as a float or integer "
                "tensor from state_dict() and convert it back in "
                "load_state_dict(), or leave it out",
            )
        if value.layout != torch.strided:
            raise UnsupportedTensor(
                name,
                f"a {value.layout} tensor",
                "only dense tensors travel; call .to_dense() in state_dict()",
            )
        if value.dtype not in DTYPES.values():
            raise UnsupportedTensor(
                name, f"a {value.dtype} tensor", f"supported dtypes are {', '.join(DTYPES)}"
            )


def non_finite(state: State) -> list[str]:
    """Names of the floating tensors holding NaN or infinity."""
    return [
        name
        for name, tensor in state.items()
        if (tensor.is_floating_point() or tensor.is_complex()) and not _all_finite(tensor)
    ]


def _all_finite(tensor: torch.Tensor, block: int = 1 << 20) -> bool:
    tensor = tensor.detach()
    # NaN or infinity anywhere makes the sum NaN or infinite, so a finite sum proves every
    # element finite, in one pass that allocates nothing: a sixth of the time of looking
    # at each element of a small model. Only a sum that overflowed needs that look.
    if tensor.element_size() > 1 and cmath.isfinite(tensor.sum().item()):
        return True
    # Block by block: torch.isfinite on a whole tensor allocates about twice its size.
    flat = tensor.reshape(-1)
    return all(bool(torch.isfinite(_checkable(part)).all()) for part in flat.split(block))


def _checkable(tensor: torch.Tensor) -> torch.Tensor:
    # torch.isfinite is not implemented for the float8 dtypes; float32 keeps NaN and inf
    return tensor.float() if tensor.is_floating_point() and tensor.element_size() == 1 else tensor


def accumulator_dtype(dtype: torch.dtype) -> torch.dtype:
    """The dtype a tensor of ``dtype`` is summed in: float32 or better, float64 for integers."""
    if dtype in (torch.float64, torch.complex128, torch.complex64):
        return dtype
    if dtype.is_floating_point:
        return torch.float32
    return torch.float64


@dataclass
class Partial:
    """What a fold took in so far, to merge into another fold of the same round.

    Where many updates are folded apart (a simulation worker folding its
    virtual participants, say) and then brought together: a running sum
    travels as its sums, its total weight and its count, one model's worth
    however many it holds; a fold that keeps updates whole sends them all.
    """

    #: The running sums, by tensor name (empty for a fold that keeps updates).
    sums: dict[str, torch.Tensor] = field(default_factory=dict)
    weight: float = 0.0
    count: int = 0
    #: The updates a keeping fold holds, with their weights.
    kept: list[tuple[State, float]] = field(default_factory=list)


class Fold(Protocol):
    """A round's updates on their way to one state: what the round loop folds each into.

    A fold is made once per task and reset each round, so its memory is
    reused from round to round. Folds of the same round merge: ``partial()``
    of one, ``merge()`` into another, gives what one fold of all their
    updates would.
    """

    #: Whether it holds the updates' own tensors (so their buffers cannot be reused).
    keeps: ClassVar[bool]

    @property
    def count(self) -> int:
        """Updates added this round."""
        ...

    def add(self, state: State, weight: float) -> None: ...

    def combine(self) -> dict[str, torch.Tensor]:
        """The round's result; the fold is empty afterwards."""
        ...

    def reset(self) -> None: ...

    def shares_memory_with(self, state: State) -> bool: ...

    def partial(self) -> Partial:
        """What it took in so far, in new tensors; the fold is empty afterwards."""
        ...

    def merge(self, partial: Partial) -> None:
        """Take in another fold's ``partial()`` of the same round."""
        ...


class WeightedMean:
    """A running weighted mean of state dicts.

    Memory stays one accumulator per tensor however many updates are added,
    so an aggregator can fold updates in as they arrive. The caller's tensors
    are never modified.
    """

    keeps: ClassVar[bool] = False

    def __init__(self, reference: State) -> None:
        self._dtypes = {name: tensor.dtype for name, tensor in reference.items()}
        self._sums = {
            name: torch.zeros(tensor.shape, dtype=accumulator_dtype(tensor.dtype))
            for name, tensor in reference.items()
        }
        self.total_weight = 0.0
        self.count = 0

    def add(self, state: State, weight: float) -> None:
        """Fold one state in; ``state`` must have the reference's names and shapes.

        Raises:
            AggregationError: for a weight that is not positive and finite, or a
                state whose names or shapes differ from the reference's; nothing
                is added then.
        """
        if not (weight > 0 and math.isfinite(weight)):
            raise AggregationError(
                f"weight must be positive and finite (the number of "
                f"samples behind the update), got {weight!r}"
            )
        if set(state) != set(self._sums):
            raise AggregationError(
                f"the update's tensors differ from the reference's: "
                f"{sorted(set(state) ^ set(self._sums))}"
            )
        for name, total in self._sums.items():
            if state[name].shape != total.shape:
                raise AggregationError(
                    f"tensor {name!r} has shape {tuple(state[name].shape)}, "
                    f"the reference has {tuple(total.shape)}"
                )
        for name, total in self._sums.items():
            # detach: an input that requires grad must not grow a graph across updates
            total.add_(state[name].detach().to(device="cpu", dtype=total.dtype), alpha=weight)
        self.total_weight += weight
        self.count += 1

    def result(self) -> dict[str, torch.Tensor]:
        """The mean so far, in new tensors of the reference's dtypes.

        Raises:
            AggregationError: if nothing has been added.
        """
        self._check_not_empty()
        return {
            name: self._cast(name, total / self.total_weight) for name, total in self._sums.items()
        }

    def combine(self) -> dict[str, torch.Tensor]:
        """The mean, computed inside the accumulators: no new memory where dtypes match.

        The returned tensors are the accumulators themselves wherever the
        reference's dtype is the accumulator's (float32 and float64 models), so
        they change on ``reset()``; use ``result()`` to keep a mean around.

        Raises:
            AggregationError: if nothing has been added.
        """
        self._check_not_empty()
        mean = {}
        for name, total in self._sums.items():
            total.div_(self.total_weight)
            mean[name] = self._cast(name, total)
        self.total_weight, self.count = 0.0, 0
        return mean

    def shares_memory_with(self, state: State) -> bool:
        """Whether any tensor of ``state`` lives in this mean's accumulators."""
        mine = {total.untyped_storage().data_ptr() for total in self._sums.values()}
        return any(tensor.untyped_storage().data_ptr() in mine for tensor in state.values())

    def reset(self) -> None:
        """Start a new mean, keeping the accumulators' memory."""
        for total in self._sums.values():
            total.zero_()
        self.total_weight, self.count = 0.0, 0

    def partial(self) -> Partial:
        taken = Partial(
            {name: total.clone() for name, total in self._sums.items()},
            self.total_weight,
            self.count,
        )
        self.reset()
        return taken

    def merge(self, partial: Partial) -> None:
        """Add another mean's weighted sums in.

        Raises:
            AggregationError: for sums whose names or shapes differ from the reference's.
        """
        if partial.count == 0:
            return
        check_sums(partial.sums, self._sums)
        for name, total in self._sums.items():
            total.add_(partial.sums[name].to(dtype=total.dtype))
        self.total_weight += partial.weight
        self.count += partial.count

    def _check_not_empty(self) -> None:
        if self.count == 0:
            raise AggregationError("no update was added in this round")

    def _cast(self, name: str, value: torch.Tensor) -> torch.Tensor:
        return _cast_back(value, self._dtypes[name])


def _cast_back(value: torch.Tensor, dtype: torch.dtype) -> torch.Tensor:
    """An accumulator's value in the model's dtype; integers rounded half to even."""
    if not (dtype.is_floating_point or dtype.is_complex):
        value = torch.round(value)
    return value.to(dtype)


def weighted_mean(updates: Iterable[tuple[State, float]]) -> dict[str, torch.Tensor]:
    """FedAvg of ``(state, weight)`` pairs; all states must share names and shapes.

    Raises:
        AggregationError: for no updates, updates whose names or shapes differ,
            or a weight that is not positive.
    """
    mean: WeightedMean | None = None
    names: set[str] = set()
    for state, weight in updates:
        if mean is None:
            mean, names = WeightedMean(state), set(state)
        elif set(state) != names:
            raise AggregationError(f"updates differ in their tensors: {sorted(names ^ set(state))}")
        mean.add(state, weight)
    if mean is None:
        raise AggregationError("no update was given")
    return mean.result()


def coordinate_median(states: Sequence[State]) -> dict[str, torch.Tensor]:
    """Each coordinate's median across the updates (unweighted).

    Robust to a minority of arbitrary updates (Yin et al., "Byzantine-Robust
    Distributed Learning", 2018): one node sending zeros or huge values cannot
    drag a coordinate past its honest neighbours. With an even count, the mean
    of the two middle values.

    Raises:
        AggregationError: for no updates, or updates whose names or shapes differ.
    """

    def median(stacked: torch.Tensor) -> torch.Tensor:
        ordered, count = stacked.sort(dim=0).values, stacked.shape[0]
        if count % 2:
            return ordered[count // 2]
        return (ordered[count // 2 - 1] + ordered[count // 2]) / 2

    return _coordinate_wise(states, median)


def trimmed_mean(states: Sequence[State], trim: float) -> dict[str, torch.Tensor]:
    """Each coordinate's mean after dropping its ``trim`` share of highest and lowest values.

    ``floor(trim * len(states))`` values go from each end, so three updates
    with ``trim=0.1`` give the plain mean, and ten drop one from each end.

    Raises:
        AggregationError: for no updates, updates whose names or shapes differ,
            or a ``trim`` that would leave nothing (it must be in [0, 0.5)).
    """
    if not 0 <= trim < 0.5:
        raise AggregationError(f"trim must be in [0, 0.5), got {trim!r}")
    cut = math.floor(trim * len(states))
    return _coordinate_wise(
        states, lambda stacked: stacked.sort(dim=0).values[cut : stacked.shape[0] - cut].mean(0)
    )


def _coordinate_wise(
    states: Sequence[State], reduce: Callable[[torch.Tensor], torch.Tensor]
) -> dict[str, torch.Tensor]:
    """Reduce each tensor over the updates, one tensor at a time to bound the memory used."""
    if not states:
        raise AggregationError("no update was given")
    _check_alike(states)
    reference = states[0]
    result = {}
    for name, tensor in reference.items():
        accumulator = accumulator_dtype(tensor.dtype)
        stacked = torch.stack(
            [state[name].detach().to(device="cpu", dtype=accumulator) for state in states]
        )
        if stacked.is_complex():  # real and imaginary parts each on their own
            value = torch.view_as_complex(reduce(torch.view_as_real(stacked)).contiguous())
        else:
            value = reduce(stacked)
        result[name] = _cast_back(value, tensor.dtype)
    return result


class KeptUpdates:
    """A round's updates held whole, for rules that need them all at once (median, Krum).

    Memory grows with the round: one copy of the model per update, which is
    why strategies that keep updates state what a round needs and the round
    loop holds them to the upload memory budget.
    """

    keeps: ClassVar[bool] = True

    def __init__(
        self, reduce: Callable[[Sequence[State], Sequence[float]], dict[str, torch.Tensor]]
    ):
        self._reduce = reduce
        self._states: list[State] = []
        self._weights: list[float] = []

    @property
    def count(self) -> int:
        return len(self._states)

    def add(self, state: State, weight: float) -> None:
        self._states.append(state)
        self._weights.append(weight)

    def combine(self) -> dict[str, torch.Tensor]:
        """The reduced round, in new tensors; the updates are let go.

        Raises:
            AggregationError: if nothing has been added.
        """
        if not self._states:
            raise AggregationError("no update was added in this round")
        try:
            return self._reduce(self._states, self._weights)
        finally:
            self.reset()

    def reset(self) -> None:
        self._states, self._weights = [], []

    def shares_memory_with(self, state: State) -> bool:
        return False  # each round's updates are new tensors, let go once combined

    def partial(self) -> Partial:
        taken = Partial(
            weight=sum(self._weights),
            count=self.count,
            kept=list(zip(self._states, self._weights, strict=True)),
        )
        self.reset()
        return taken

    def merge(self, partial: Partial) -> None:
        for state, weight in partial.kept:
            self.add(state, weight)


def check_sums(sums: State, reference: State) -> None:
    if set(sums) != set(reference):
        raise AggregationError(
            f"a partial sum's tensors differ from the reference's: "
            f"{sorted(set(sums) ^ set(reference))}"
        )
    for name, total in reference.items():
        if sums[name].shape != total.shape:
            raise AggregationError(
                f"a partial sum's tensor {name!r} has shape {tuple(sums[name].shape)}, the "
                f"reference has {tuple(total.shape)}"
            )


def krum_scores(states: Sequence[State], f: int) -> list[float]:
    """Each update's Krum score: the sum of squared distances to its ``n - f - 2`` nearest.

    Blanchard et al., "Machine Learning with Adversaries: Byzantine Tolerant
    Gradient Descent" (2017): an update among honest ones sits close to many
    others, so a low score marks it as trustworthy with up to ``f`` arbitrary
    updates in the round. Distances are summed tensor by tensor in float64,
    so no flattened copy of a whole model is made.

    Raises:
        AggregationError: if there are not more than ``2 f + 2`` updates.
    """
    count = len(states)
    if count <= 2 * f + 2:
        raise AggregationError(
            f"Krum with f={f} needs more than 2f+2={2 * f + 2} updates, got {count}"
        )
    _check_alike(states)
    distances = torch.zeros(count, count, dtype=torch.float64)
    for name in states[0]:
        stacked = torch.stack(
            [
                state[name].detach().to(device="cpu", dtype=torch.float64).reshape(-1)
                for state in states
            ]
        )
        distances += torch.cdist(stacked, stacked, compute_mode="donot_use_mm_for_euclid_dist") ** 2
    nearest = count - f - 2
    scores = []
    for index in range(count):
        others = torch.cat([distances[index, :index], distances[index, index + 1 :]])
        scores.append(float(others.sort().values[:nearest].sum()))
    return scores


def multi_krum(states: Sequence[State], f: int, keep: int) -> dict[str, torch.Tensor]:
    """The plain mean of the ``keep`` updates with the lowest Krum scores (Krum: ``keep=1``).

    El Mhamdi et al., "The Hidden Vulnerability of Distributed Learning in
    Byzantium" (2018), average the ``m`` best-scored updates; ties go to the
    earlier update.

    Raises:
        AggregationError: as :func:`krum_scores`, or for ``keep`` outside 1..n.
    """
    scores = krum_scores(states, f)
    if not 1 <= keep <= len(states):
        raise AggregationError(f"Multi-Krum keeps 1 to {len(states)} updates, not {keep}")
    chosen = sorted(range(len(states)), key=lambda index: (scores[index], index))[:keep]
    if keep == 1:
        return {name: tensor.detach().clone() for name, tensor in states[chosen[0]].items()}
    return weighted_mean((states[index], 1.0) for index in chosen)


def _check_alike(states: Sequence[State]) -> None:
    reference = states[0]
    for state in states[1:]:
        if set(state) != set(reference):
            raise AggregationError(
                f"updates differ in their tensors: {sorted(set(reference) ^ set(state))}"
            )
        for name, tensor in reference.items():
            if state[name].shape != tensor.shape:
                raise AggregationError(
                    f"tensor {name!r} has shape {tuple(state[name].shape)} "
                    f"in one update and {tuple(tensor.shape)} in another"
                )
