"""A task run with many virtual participants on this machine: the same scheduler, unchanged.

:class:`Simulation` shares the task's training set out among ``participants``
virtual participants (:mod:`fedmagic.partition`), says what each holds, and
runs the task's rounds as the relay path does, on the same strategy seam:
who takes part (``sample``), what each is told (``config``), how updates
weigh and fold, the server step (``next_state``), the history row
(``record``). Workers (:class:`~fedmagic.engine.virtual.VirtualParticipants`)
each fold their virtual participants' updates into one partial sum, which
the round merges.

The ``local`` engine runs one worker in this process; ``dask`` runs one a
core on a Dask cluster it starts, or on the user's cluster at ``address``
(:mod:`~fedmagic.engine.dask_workers`). Secure aggregation is refused: its
protocol among virtual participants of one process would hide nothing from
anyone. Strategies that keep every update (median, Krum) get them all, within
``update_memory``, or are refused before round 1.
"""

from __future__ import annotations

import logging
import time
from pathlib import Path
from typing import Any, Callable, Mapping, Protocol, Sequence

from ..errors import ConfigurationError, NotEnoughParticipants
from ..partition import Partition, labels_of, partition
from ..strategies import Strategy, resolve
from ..strategies.base import layers
from ..strategies.secure import SecureAggregation
from .checkpoint import Checkpoint
from .progress import RoundProgress
from .rounds import TaskResult
from .scheduler import Scheduler, test_metrics
from .simulation_options import ENGINES, resources_text
from .state import NodeStatus, metrics_text, size_text
from .task import TaskPackage
from .virtual import Outcome, VirtualParticipants, WorkerRound

__all__ = ["Simulation"]

log = logging.getLogger("fedmagic")


class Workers(Protocol):
    """Where a simulation's virtual participants train: one partial sum a worker a round."""

    def run_round(
        self,
        number: int,
        global_state: Mapping[str, Any],
        nodes: Sequence[str],
        configs: Mapping[str, dict[str, Any]],
        progress: Callable[[list[Outcome]], None] | None = None,
    ) -> list[WorkerRound]: ...

    def close(self) -> None: ...


class Simulation:
    """A task's rounds with ``participants`` virtual participants.

    Args:
        scheduler: the author's scheduler, as for ``launch_task``; its
            ``make_train_dataloader()`` gives the whole training set to share out.
        participants: how many virtual participants.
        partition: ``iid``, ``dirichlet`` or ``by-label`` (see :mod:`fedmagic.partition`).
        alpha: Dirichlet's concentration; ``seed``: the partition's.
        per_round: how many take part each round, drawn by the strategy; None: all.
        strategy: as ``launch_task`` takes it.
        engine: where the workers run: ``dask`` (a Dask cluster's workers) or
            ``local`` (one worker, in this process: quick to start, for small runs).
        address: with ``dask``, a running Dask scheduler's address; None starts one
            worker a core on this machine (``workers`` of them, if given).
        resources: with ``dask``, what each worker's round asks of it, e.g. ``{"GPU": 1}``.
        update_memory: the most bytes of updates a strategy that keeps every
            update (median, Krum) may hold in a round.
        on_event: called with every event line.
        on_progress: called with the round's :class:`~fedmagic.engine.progress.RoundProgress`
            as outcomes come (a few times a second at most) and once it is accounted for.

    Raises:
        ConfigurationError: for a strategy or parameter a simulation cannot run with.
    """

    def __init__(
        self,
        scheduler: Scheduler,
        participants: int,
        *,
        task_id: str,
        partition: str = "iid",
        alpha: float = 0.5,
        seed: int = 0,
        per_round: int | None = None,
        strategy: Strategy | str | None = None,
        engine: str = "dask",
        address: str | None = None,
        workers: int | None = None,
        resources: dict[str, float] | None = None,
        update_memory: int = 1 << 30,
        on_event: Callable[[str], None] | None = None,
        on_progress: Callable[[RoundProgress], None] | None = None,
    ) -> None:
        self.scheduler = scheduler
        self.task_id = task_id
        self.strategy = resolve(strategy)
        if any(isinstance(layer, SecureAggregation) for layer in layers(self.strategy)):
            raise ConfigurationError(
                "strategy",
                str(self.strategy),
                "secure aggregation among virtual participants of one process would hide "
                "nothing from anyone, so a simulation does not pretend to run it: simulate "
                "the strategy it wraps, and measure what the protocol costs with "
                "benchmarks/privacy.py",
            )
        if engine not in ENGINES:
            raise ConfigurationError("engine", engine, f"choose one of {', '.join(ENGINES)}")
        if engine != "dask" and (address, workers, resources) != (None, None, None):
            raise ConfigurationError(
                "engine", engine, "address, workers and resources are for engine='dask'"
            )
        self.engine, self.address, self.workers, self.resources = (
            engine,
            address,
            workers,
            resources,
        )
        self.update_memory = update_memory
        self.participants = participants
        self.per_round = participants if per_round is None else per_round
        self.on_event = on_event
        self.on_progress = on_progress
        #: The round running or last run.
        self.progress: RoundProgress | None = None
        #: Workers there are (once started).
        self.worker_count = 0
        self._stop_asked = False
        self.scheme, self.alpha, self.seed = partition, alpha, seed
        self.history: list[dict[str, Any]] = []
        self.outcomes: dict[str, Outcome] = {}

    def request_stop(self) -> None:
        """End the run after the current round; its checkpoint is kept."""
        self._stop_asked = True

    def describe(self) -> dict[str, Any]:
        """What a display says of it: how many, how shared out, where, and the round so far."""
        return {
            "participants": self.participants,
            "per_round": self.per_round,
            "partition": self.scheme
            + (f" (alpha {self.alpha:g})" if self.scheme == "dirichlet" else ""),
            "engine": self.engine,
            "workers": self.worker_count,
            "round": None if self.progress is None else self.progress.summary(),
        }

    def share_out(self) -> Partition:
        """Each virtual participant's share of the training set, before anything runs."""
        dataset = self.scheduler.make_train_dataloader().dataset
        return partition(
            labels_of(dataset),
            self.participants,
            scheme=self.scheme,
            alpha=self.alpha,
            seed=self.seed,
            min_size=0 if self.scheme == "dirichlet" else 1,
        )

    def run(self) -> TaskResult:
        """Run the task to its end, and say how it went."""
        scheduler, strategy = self.scheduler, self.strategy
        scheduler._setup(self.task_id)
        strategy.check(min(scheduler.min_clients, self.per_round), self.per_round)
        package = TaskPackage.from_scheduler(scheduler, self.task_id, strategy=strategy.describe())
        shares = self.share_out()
        self._event(shares.summary(rows=5))
        nodes = [f"virtual-{index + 1}" for index in range(self.participants)]
        self._check_memory(scheduler.state_dict())
        indices = {node: shares.shares[i].tolist() for i, node in enumerate(nodes)}
        workers = self._start(package, indices)
        try:
            return self._rounds(nodes, workers, package)
        finally:
            workers.close()

    def _start(self, package: TaskPackage, indices: dict[str, list[int]]) -> Workers:
        if self.engine == "local":
            self.worker_count = 1
            return _InProcess(VirtualParticipants(package, indices, self.strategy))
        from .dask_workers import DaskWorkers

        started = time.perf_counter()
        workers = DaskWorkers(
            package,
            indices,
            self.strategy,
            address=self.address,
            workers=self.workers,
            resources=self.resources,
        )
        where = self.address or "this machine"
        self.worker_count = count = len(workers.addresses())
        having = resources_text(self.resources)
        self._event(
            f"Dask cluster on {where}: {count} worker{'' if count == 1 else 's'}"
            + (f" with {having}" if having else "")
            + f", ready in {time.perf_counter() - started:.1f} s"
        )
        return workers

    def _check_memory(self, state: dict[str, Any]) -> None:
        state_bytes = sum(t.nelement() * t.element_size() for t in state.values())
        need = self.strategy.round_memory(self.per_round, state_bytes)
        if need > self.update_memory:
            raise ConfigurationError(
                "update_memory",
                self.update_memory,
                f"{type(self.strategy).__name__} holds every update of a round at once: "
                f"{self.per_round} updates of {size_text(state_bytes)} need {size_text(need)}; "
                "simulate fewer a round (per_round), raise update_memory, or choose a "
                "strategy that folds updates, such as FedAvg",
            )

    def _rounds(self, nodes: list[str], workers: Workers, package: TaskPackage) -> TaskResult:
        scheduler, strategy = self.scheduler, self.strategy
        name = scheduler.name
        assert name is not None, "the scheduler was set up, which names the task"
        # Beside the task's own checkpoint, never over it: a simulation is not the task's run
        checkpoint = Checkpoint((Path("models") / f"{name}-simulated").absolute())
        reason = "finished"
        while True:
            number = scheduler.current_round + 1
            why = strategy.stop_before(number) or ("its author" if self._stop_asked else None)
            if why is not None:
                reason = f"stopped before round {number} by {why}"
                self._event(f"task {self.task_id!r} {reason}")
                break
            self._round(number, nodes, workers, checkpoint, package)
            if scheduler.is_task_finished():
                break
        self._event(f"task {self.task_id!r} {reason} after round {scheduler.current_round}")
        return TaskResult(
            self.task_id, name, scheduler.current_round, self.history, checkpoint.directory
        )

    def _round(
        self,
        number: int,
        nodes: list[str],
        workers: Workers,
        checkpoint: Checkpoint,
        package: TaskPackage,
    ) -> None:
        scheduler, strategy = self.scheduler, self.strategy
        started = time.perf_counter()
        selected = strategy.sample(number, nodes, self.per_round)
        global_state = scheduler.state_dict()
        strategy.begin(number, global_state)
        configs = {node: strategy.config(number, node) for node in selected}
        fold = strategy.fold(global_state)
        outcomes: list[Outcome] = []
        self.progress = RoundProgress(number, len(selected))
        heard = self._hearing(self.progress)  # a widget reads self.progress as it moves
        for done in workers.run_round(number, global_state, selected, configs, heard):
            fold.merge(done.partial)
            outcomes += done.outcomes
        place = {node: index for index, node in enumerate(selected)}
        outcomes.sort(key=lambda outcome: place[outcome.node])  # as drawn, not as workers ended
        self.progress = RoundProgress(number, len(selected), finished=True)
        self.progress.add(outcomes)
        if self.on_progress is not None:
            self.on_progress(self.progress)
        for outcome in outcomes:
            self.outcomes[outcome.node] = outcome
        self._say_who_was_left_out(number, outcomes)
        needed = scheduler.min_clients if strategy.applies_min_clients else 0
        if fold.count < needed or (fold.count == 0 and strategy.applies_min_clients):
            raise NotEnoughParticipants(self.task_id, fold.count, needed, round=number)
        combined = fold.combine()  # DP's clipped sum of none is zeros, which it noises
        scheduler.load_state_dict(strategy.next_state(number, global_state, combined))
        scheduler.current_round = number
        finished = scheduler.is_task_finished()
        folded = [o for o in outcomes if o.status == NodeStatus.UPLOADED]
        row: dict[str, Any] = {
            "round": number,
            "participants": len(folded),
            "samples": sum(o.samples for o in folded),
        }
        row.update(strategy.record(number))
        row["tested"] = tested = scheduler._tests_after(number, finished)
        row["train_seconds"] = max((o.seconds for o in folded), default=None)
        if tested:
            row.update(test_metrics(scheduler.test()))
        row["seconds"] = time.perf_counter() - started
        self.history.append(row)
        checkpoint.save(
            scheduler.state_dict(),
            number,
            self.history,
            self.task_id,
            package.code_hash,
            finished,
            strategy,
        )
        shown = metrics_text(row)
        self._event(
            f"round {number}/{scheduler.max_rounds or '?'}: averaged {row['participants']} of "
            f"{len(selected)} virtual participants' updates in {row['seconds']:.2f} s"
            + (f"; {shown}" if shown else "")
        )

    def _hearing(self, progress: RoundProgress) -> Callable[[list[Outcome]], None]:
        """What takes outcomes mid-round: counted at once, shown at most ten times a second."""
        shown = 0.0

        def heard(outcomes: list[Outcome]) -> None:
            nonlocal shown
            progress.add(outcomes)
            if self.on_progress is not None and time.monotonic() - shown >= 0.1:
                shown = time.monotonic()
                self.on_progress(progress)

        return heard

    def _say_who_was_left_out(self, number: int, outcomes: list[Outcome]) -> None:
        """One warning for each reason, naming a few: not thousands of lines."""
        by_reason: dict[str, list[str]] = {}
        for outcome in outcomes:
            if outcome.status != NodeStatus.UPLOADED:
                by_reason.setdefault(outcome.detail, []).append(outcome.node)
        for why, nodes in by_reason.items():
            if len(nodes) == 1:
                self._event(f"round {number}: {nodes[0]}: {why}", logging.WARNING)
                continue
            named = ", ".join(nodes[:3]) + (f" and {len(nodes) - 3} more" if len(nodes) > 3 else "")
            self._event(
                f"round {number}: {len(nodes)} virtual participants ({named}): {why}",
                logging.WARNING,
            )

    def _event(self, text: str, level: int = logging.INFO) -> None:
        log.log(level, text, extra={"event": True})
        if self.on_event is not None:
            self.on_event(text)


class _InProcess:
    """The ``local`` engine: one worker, this process."""

    def __init__(self, participants: VirtualParticipants) -> None:
        self.participants = participants

    def run_round(
        self,
        number: int,
        global_state: Mapping[str, Any],
        nodes: Sequence[str],
        configs: Mapping[str, dict[str, Any]],
        progress: Callable[[list[Outcome]], None] | None = None,
    ) -> list[WorkerRound]:
        heard = (lambda outcome: progress([outcome])) if progress is not None else None
        return [self.participants.run_round(number, global_state, nodes, configs, None, heard)]

    def close(self) -> None:
        pass
