"""Many virtual participants in one worker: the task's own scheduler, run as each in turn.

A simulation packs its virtual participants onto workers. Each worker builds
the task's scheduler once from its source, as ``fedmagic join`` does, loads
the whole training set once through the task's own ``make_train_dataloader()``
and gives each virtual participant its share of it (a ``Subset`` in a loader
made like the task's). Each round it trains each of its selected virtual
participants from the round's global model and folds their updates into one
partial sum (:class:`~fedmagic.strategies.aggregate.Partial`): one message a
round, not one per participant.

Virtual participants keep nothing between rounds, as Flower's simulated
clients do: the optimizer's state (momentum) is cleared before each one
trains, so thousands of them cost one model's memory, not one each.
"""

from __future__ import annotations

import time
import traceback
from dataclasses import dataclass, field
from typing import Any, Callable, Mapping, Sequence

import torch
from torch.utils.data import DataLoader, RandomSampler, Subset

from ..strategies import Strategy
from ..strategies.aggregate import Partial, non_finite
from .participant import describe_failure
from .scheduler import Scheduler
from .state import NodeStatus
from .task import TaskPackage

__all__ = ["Outcome", "VirtualParticipants", "WorkerRound", "share_loader"]


def share_loader(loader: DataLoader, indices: Sequence[int]) -> DataLoader:
    """A loader like ``loader`` (batch size, shuffling, last batch, collation) over only the
    examples at ``indices`` of its dataset."""
    return DataLoader(
        Subset(loader.dataset, list(indices)),
        batch_size=loader.batch_size,
        # a sampler refuses to shuffle nothing; an empty share is never trained on
        shuffle=isinstance(loader.sampler, RandomSampler) and len(indices) > 0,
        drop_last=loader.drop_last,
        collate_fn=loader.collate_fn,
    )


@dataclass(frozen=True)
class Outcome:
    """What became of one virtual participant in a round."""

    node: str
    status: NodeStatus
    samples: int
    seconds: float
    #: Why it failed or was refused; "" when its update was folded in.
    detail: str = ""
    traceback: str = ""


@dataclass
class WorkerRound:
    """One worker's round: its virtual participants' updates, folded, and what became of each."""

    partial: Partial
    outcomes: list[Outcome] = field(default_factory=list)


class VirtualParticipants:
    """One worker's virtual participants.

    Args:
        package: the task, as its participants receive it.
        shares: each virtual participant's examples, as indices into the task's training set.
        strategy: the task's strategy (its weights and its fold).
    """

    def __init__(
        self, package: TaskPackage, shares: Mapping[str, Sequence[int]], strategy: Strategy
    ) -> None:
        self.scheduler: Scheduler = package.build_scheduler()
        self.scheduler._setup(package.task_id)
        whole = self.scheduler.make_train_dataloader()
        self.loaders = {node: share_loader(whole, indices) for node, indices in shares.items()}
        self.strategy = strategy

    def run_round(
        self,
        number: int,
        global_state: Mapping[str, torch.Tensor],
        nodes: Sequence[str],
        configs: Mapping[str, dict[str, Any]] | None = None,
        epochs: int | None = None,
        progress: Callable[[Outcome], None] | None = None,
    ) -> WorkerRound:
        """Train each of ``nodes`` from ``global_state`` and fold their updates.

        A virtual participant whose ``train()`` raises is reported failed, and one whose
        update holds NaN or has no weight refused; the others' updates are folded all the same.
        ``progress`` hears of each outcome as it comes.
        """
        scheduler = self.scheduler
        epochs = epochs or scheduler.merge_epochs
        fold = self.strategy.fold(global_state)
        outcomes: list[Outcome] = []

        def record(outcome: Outcome) -> None:
            outcomes.append(outcome)
            if progress is not None:
                progress(outcome)

        for node in nodes:
            loader = self.loaders[node]
            samples = len(loader.dataset)  # type: ignore[arg-type]
            if samples == 0:
                why = "its share of the training set is empty, so it has nothing to train on"
                record(Outcome(node, NodeStatus.REFUSED, 0, 0.0, why))
                continue
            started = time.perf_counter()
            # The task's own train() calls make_train_dataloader(): it gets this share
            scheduler.make_train_dataloader = _giving(loader)  # type: ignore[method-assign]
            scheduler.round_config = dict((configs or {}).get(node) or {})
            scheduler.global_state = dict(global_state)
            _clear_optimizer(scheduler)
            try:
                scheduler.load_state_dict(dict(global_state))
                for _ in range(epochs):
                    scheduler.train()
                update = scheduler.state_dict()
            except Exception as exc:
                record(
                    Outcome(
                        node,
                        NodeStatus.FAILED,
                        samples,
                        time.perf_counter() - started,
                        f"train() failed: {describe_failure(exc)}",
                        traceback.format_exc(),
                    )
                )
                continue
            weight = self.strategy.weight(samples)
            bad = non_finite(update)
            why = (
                f"non-finite values (NaN or infinity) in {', '.join(bad)}"
                if bad
                else f"the strategy gives its {samples} samples no weight"
                if weight <= 0
                else ""
            )
            if not why:
                kept = {name: t.detach().clone() for name, t in update.items()}
                fold.add(kept if fold.keeps else update, weight)
            status = NodeStatus.REFUSED if why else NodeStatus.UPLOADED
            record(Outcome(node, status, samples, time.perf_counter() - started, why))
        return WorkerRound(fold.partial(), outcomes)


def _giving(loader: DataLoader) -> Callable[[], DataLoader]:
    return lambda: loader


def _clear_optimizer(scheduler: Scheduler) -> None:
    """Forget what the last virtual participant's optimizer learned (momentum, Adam's moments)."""
    optimizer = getattr(scheduler, "optimizer", None)
    if isinstance(optimizer, torch.optim.Optimizer):
        optimizer.state.clear()
