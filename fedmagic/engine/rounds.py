"""The initiator's side of a task: gather participants, run rounds, average.

Each round the global weights fan out once through the relay to the
selected participants. Each trains, says so, and uploads its update, several
at once within a memory budget (with room for every update, they send it
straight after training, with no request in between). The aggregator checks
each update (names, dtypes, shapes, finite values) and hands it to the
task's strategy (:mod:`fedmagic.strategies`) as it completes: FedAvg folds it
into a running weighted mean, so memory stays at a few copies of the model
however many participants there are. Who takes part, what each is told with
the round and what the round's updates become are the strategy's answers;
this loop asks nothing else about aggregation.

No party can stretch a round: training has ``calculation_timeout``, each
upload a whole-upload deadline, and a node that misses either sits out the
next round(s). Who may take part and how much weight they carry follow the
task's :class:`~fedmagic.engine.policy.RoundPolicy`.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import random
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, AsyncIterator, Callable

import torch

from ..errors import (
    ConnectionLost,
    NotEnoughParticipants,
    ProtocolError,
    RelayRefused,
    RemoteError,
    SecureAggregationError,
    TaskFailed,
    UpdateRejected,
)
from ..strategies import FedAvg, Strategy
from ..strategies.aggregate import Fold
from ..wire.codec import Frame, Kind
from ..wire.link import WELCOME_TIMEOUT
from ..wire.messages import (
    Aggregate,
    Aggregated,
    Evaluate,
    Evaluated,
    Failed,
    Finish,
    Message,
    PeerJoined,
    PeerLeft,
    Progress,
    Round,
    Secure,
    Status,
    Trained,
    Upload,
    parse,
    sender,
)
from ..wire.transport import Transport
from .checkpoint import Checkpoint
from .elected import DelegatedRound, elect
from .export import TORCHSCRIPT, RunReport, example_input, export_torchscript, write_report
from .policy import RoundPolicy
from .roster import Participant
from .scheduler import Scheduler, test_metrics
from .secure_round import SecureRound
from .state import (
    FEDERATED,
    NodeStatus,
    ParticipantState,
    last_metrics,
    metrics_text,
    size_text,
)
from .task import TaskPackage
from .uploads import RoundUploads, strike

#: Where a node stands while a round is under way, before its update is in.
_IN_ROUND = (NodeStatus.TRAINING, NodeStatus.TRAINED, NodeStatus.UPLOADING)

__all__ = ["Aggregator", "Participant", "TaskResult"]

log = logging.getLogger("fedmagic")


@dataclass
class TaskResult:
    """How a task ended: its history, last metrics and checkpoint."""

    task_id: str
    name: str
    rounds: int
    history: list[dict[str, Any]]
    checkpoint: Path
    participants: dict[str, Participant] = field(default_factory=dict)

    @property
    def metrics(self) -> dict[str, Any]:
        """The last tested round's metrics."""
        return last_metrics(self.history)


class Aggregator:
    """Runs one task's rounds over a link to the relay.

    Args:
        scheduler: the author's scheduler, already set up.
        package: the task's code, sent to each participant that joins.
        link: an initiator's connection to the task (a websocket ``Link``, or a
            ``MemoryLink`` of the in-memory relay).
        policy: deadlines, plausible sample counts and the upload memory budget.
        strategy: who takes part and how their updates combine; FedAvg by default.
        on_event: called with every event line, for displays.
        reconnect_window: when the relay connection drops, keep trying this
            many seconds to get it back, then run the round it was in again
            with the participants that come back (they keep their consent);
            0 fails the task at once.
    """

    def __init__(
        self,
        scheduler: Scheduler,
        package: TaskPackage,
        link: Transport,
        *,
        checkpoint: Checkpoint,
        policy: RoundPolicy | None = None,
        strategy: Strategy | None = None,
        history: list[dict[str, Any]] | None = None,
        on_event: Callable[[str], None] | None = None,
        reconnect_window: float = 0.0,
    ) -> None:
        self.scheduler = scheduler
        self.package = package
        self.link = link
        self.checkpoint = checkpoint
        self.policy = policy or RoundPolicy()
        self.strategy = strategy or FedAvg()
        self.history = history or []
        self.on_event = on_event
        self.reconnect_window = reconnect_window
        self.participants: dict[str, Participant] = {}
        self._task_header = package.to_header()
        self._current: RoundUploads | DelegatedRound | SecureRound | None = None
        #: Rounds run again after their elected aggregator was lost: how many times.
        self._attempts: dict[int, int] = {}
        #: While participants evaluate a round's model: each one's answer, None until it comes.
        self._evaluations: dict[str, Evaluated | None] | None = None
        self._test_seconds = 0.0
        # Reused from round to round: buffers for incoming updates, and the strategy's fold.
        self._buffers: list[dict[str, torch.Tensor]] = []
        self._fold: Fold | None = None
        self._changed = asyncio.Event()
        self._lost: BaseException | None = None
        # Counts relay connections lost; ``_connected`` once the newest is back.
        self._epoch = 0
        self._connected = True
        self._started = time.time()
        #: Set (from any thread) to end the task cleanly after the current round.
        self.stop_requested = False

    @property
    def task_id(self) -> str:
        return self.package.task_id

    def request_stop(self) -> None:
        """End the task after the current round, or now while it waits for participants.

        Call it on the task's loop (``TaskRun.stop`` does).
        """
        self.stop_requested = True
        self._changed.set()

    def states(self) -> tuple[ParticipantState, ...]:
        """Every participant as displays show it, uploads in progress included."""
        current = self._current
        if current is None:
            return tuple(p.state() for p in list(self.participants.values()))
        return tuple(
            participant.state(*current.progress(node))
            for node, participant in list(self.participants.items())
        )

    async def run(self) -> TaskResult:
        """Gather, run rounds until ``is_task_finished()``, and tell everyone.

        Raises:
            TaskFailed: if the task cannot go on; participants are told too.
        """
        self._started = time.time()
        outcome = "ended"  # said by how it ends
        reader = asyncio.create_task(self._read_frames())
        try:
            try:
                await self._gather()
                while True:
                    epoch = self._epoch
                    upcoming = self.scheduler.current_round + 1
                    why = self.strategy.stop_before(upcoming)
                    if why is not None:
                        reason = f"stopped before round {upcoming} by {why}"
                        self._event(f"task {self.task_id!r} {reason}", logging.WARNING)
                        break
                    try:
                        await self._run_round(upcoming)
                    except _Interrupted:
                        await self._rejoin(self.scheduler.current_round + 1, epoch)
                        continue
                    except _Reelect:
                        continue
                    if self.scheduler.is_task_finished():
                        reason = "finished"
                        break
                    if self.stop_requested:
                        raise _Stopped
            except _Stopped:
                done = self.scheduler.current_round
                reason = (
                    f"stopped by its author after round {done}"
                    if done
                    else "stopped by its author before round 1"
                )
                self._event(f"task {self.task_id!r} {reason}")
            await self._tell_all(Finish(True, reason))
            outcome = reason
        except BaseException as exc:
            reason = exc.reason if isinstance(exc, TaskFailed) else str(exc) or type(exc).__name__
            if isinstance(exc, asyncio.CancelledError):
                reason = "stopped by the task's author"
            if isinstance(exc, TaskFailed) and self.scheduler.current_round > 0:
                exc.checkpoint = str(self.checkpoint.directory)
                exc.saved_round = self.scheduler.current_round
            await self._tell_all(Finish(False, reason))
            outcome = f"failed: {reason}"
            raise
        finally:
            reader.cancel()
            await self.link.close()
            await self._leave_for_use(outcome)
        if reason == "finished":  # a stop said so already
            self._event(
                f"task {self.task_id!r} finished after round {self.scheduler.current_round}"
            )
        name = self.scheduler.name
        assert name is not None, "the scheduler was set up, which names the task"
        return TaskResult(
            self.task_id,
            name,
            self.scheduler.current_round,
            self.history,
            self.checkpoint.directory,
            self.participants,
        )

    async def _leave_for_use(self, outcome: str) -> None:
        """Beside the checkpoint, once a round is in it: the model as TorchScript, and a report."""
        if self.scheduler.current_round == 0:
            return
        try:
            await asyncio.to_thread(self._write_for_use, outcome)
        except Exception:  # the task's own ending must not be lost to a report
            log.exception("could not write the report of task %r", self.task_id)

    def _write_for_use(self, outcome: str) -> None:
        scheduler, directory = self.scheduler, self.checkpoint.directory
        assert scheduler.model is not None and scheduler.name is not None, "the task was set up"
        try:
            example = example_input(scheduler.make_test_dataloader())
        except Exception:
            example = None
        why = export_torchscript(scheduler.model, example, directory / TORCHSCRIPT)
        if why is not None:
            self._event(f"{TORCHSCRIPT} not written: the model {why}")
        report = RunReport(
            self.task_id,
            scheduler.name,
            self.strategy.describe(),
            scheduler.current_round,
            outcome,
            self._started,
            time.time(),
            {
                node: {"status": str(p.status), "samples": p.samples, "rounds": p.rounds}
                | ({} if p.epsilon is None else {"epsilon": p.epsilon})
                for node, p in self.participants.items()
            },
            self.history,
            None if why else TORCHSCRIPT,
            why,
        )
        write_report(directory, report)

    # Gathering.

    async def _gather(self) -> None:
        need, most = self.scheduler.min_clients, self.scheduler.max_clients
        self._event(f"waiting for {need} to {most} participants to join and verify their data")
        loop = asyncio.get_running_loop()
        if not await self._wait_until(
            lambda: self._count_available() >= need,
            loop.time() + self.policy.join_timeout,
            stoppable=True,
        ):
            raise NotEnoughParticipants(
                self.task_id, self._count_available(), need, waited=self.policy.join_timeout
            )
        await self._wait_until(
            lambda: self._count_available() >= most,
            loop.time() + self.policy.join_grace,
            stoppable=True,
        )

    def _count_available(self) -> int:
        return sum(p.status.available for p in self.participants.values())

    # One round.

    async def _run_round(self, number: int) -> None:
        scheduler = self.scheduler
        started = time.perf_counter()
        loop = asyncio.get_running_loop()
        if self._count_available() < scheduler.min_clients:
            self._event(f"round {number}: waiting for participants")
            await self._wait_until(
                lambda: self._count_available() >= scheduler.min_clients,
                loop.time() + self.policy.join_timeout,
                stoppable=True,
            )
        selected = self._select(number)
        needed = scheduler.min_clients if self.strategy.applies_min_clients else 0
        if len(selected) < needed:
            raise NotEnoughParticipants(
                self.task_id, len(selected), scheduler.min_clients, waited=self.policy.join_timeout
            )
        global_state = scheduler.state_dict()
        self.strategy.begin(number, global_state)
        weights = {node: self.strategy.weight(self.participants[node].samples) for node in selected}
        plan = self.strategy.protect(number, global_state, weights) if selected else None
        state_bytes = sum(t.numel() * t.element_size() for t in global_state.values())
        keep = self.strategy.keeps_updates
        if keep:
            selected = self._within_memory(number, selected, state_bytes)
        slots = len(selected) if keep else self.policy.upload_slots(state_bytes)
        current: RoundUploads | DelegatedRound | SecureRound
        if plan is not None:  # the updates travel masked, and only their sum is revealed
            aggregator = None
            slots = len(selected)
            current = SecureRound(
                number,
                plan,
                set(selected),
                self.participants,
                self.policy,
                train_deadline=loop.time() + scheduler.calculation_timeout,
                calculation_timeout=scheduler.calculation_timeout,
                event=self._event,
                stage_seconds=self.policy.upload_seconds(0),
            )
        elif scheduler.is_centralized:
            aggregator = None
            if self._fold is None:
                self._fold = self.strategy.fold(global_state)
            fold = self._fold
            fold.reset()
            current = RoundUploads(
                number,
                global_state,
                set(selected),
                self.participants,
                self.policy,
                self.strategy,
                fold,
                slots=slots,
                train_deadline=loop.time() + scheduler.calculation_timeout,
                calculation_timeout=scheduler.calculation_timeout,
                buffers=self._buffers,
                event=self._event,
            )
        else:
            aggregator = elect(number, selected, self._attempts.get(number, 0))
            upload_seconds = self.policy.upload_seconds(state_bytes)
            current = DelegatedRound(
                number,
                aggregator,
                global_state,
                set(selected),
                self.participants,
                deadline=loop.time() + scheduler.calculation_timeout + 2 * upload_seconds,
            )
        epoch = self._epoch
        for node in selected:
            participant = self.participants[node]
            participant.status, participant.round = NodeStatus.TRAINING, number
            participant.epoch, participant.epochs = 0, scheduler.merge_epochs
        self._event(
            f"round {number}: training on {', '.join(selected)}"
            + (f"; {aggregator} aggregates" if aggregator else "")
        )
        async with self._link_lost_interrupts():
            if aggregator is not None:  # told first, so it is ready for the first update
                samples = {node: self.participants[node].samples for node in selected}
                aggregate = Aggregate(
                    number, samples, slots, upload_seconds, scheduler.calculation_timeout
                )
                await self.link.send(aggregate.to_frame(to=[aggregator]))
            if isinstance(current, SecureRound):
                await current.open(self.link.send)
            upload_now = slots >= len(selected)
            for config, nodes in self._configs(number, selected):
                message = Round(number, scheduler.merge_epochs, upload_now, config, aggregator)
                await self.link.send(message.to_frame(to=nodes))
            if selected:  # a random draw may give none: the round is then the strategy's alone
                await self.link.send_state(global_state, to=selected, round=number)

        self._current = current

        def check() -> None:
            self._check_lost()
            if self._epoch != epoch:
                raise _Interrupted

        async def grant(nodes: list[str]) -> None:
            async with self._link_lost_interrupts():
                await self.link.send(Upload(number).to_frame(to=nodes))

        async def send(frame: Frame) -> None:
            async with self._link_lost_interrupts():
                await self.link.send(frame)

        try:
            if isinstance(current, RoundUploads):
                await current.collect(self._changed, check, grant)
            else:
                await current.collect(self._changed, check, send)
        except SecureAggregationError as failed:
            raise TaskFailed(self.task_id, str(failed), number) from None
        finally:
            self._current = None

        if isinstance(current, DelegatedRound):
            self._settle(current, selected)
        contributions = current.count
        if contributions < needed:
            if isinstance(current, RoundUploads):
                fold.reset()
            raise NotEnoughParticipants(
                self.task_id, contributions, scheduler.min_clients, round=number
            )
        if isinstance(current, (DelegatedRound, SecureRound)):
            combined = current.combined  # what the elected aggregator sent, or the secure sum
        else:
            combined = await asyncio.to_thread(fold.combine)
        assert combined is not None, "a round with contributions has their combination"
        new_state = await asyncio.to_thread(
            self.strategy.next_state, number, global_state, combined
        )
        await asyncio.to_thread(scheduler.load_state_dict, new_state)
        if isinstance(current, RoundUploads) and fold.shares_memory_with(scheduler.state_dict()):
            self._fold = None  # the scheduler kept the fold's tensors: next round gets new ones
        del new_state, combined
        scheduler.current_round = number
        finished = scheduler.is_task_finished()
        row: dict[str, Any] = {
            "round": number,
            "participants": contributions,
            "samples": current.samples,
        }
        if aggregator is not None:
            row["aggregator"] = aggregator
        row.update(self.strategy.record(number))
        row["tested"] = tested = scheduler._tests_after(number, finished)
        chosen = [self.participants[node] for node in selected]
        trained = [
            p.train_seconds
            for p in chosen
            if p.status == NodeStatus.UPLOADED and p.train_seconds is not None
        ]
        row["train_seconds"] = max(trained, default=None)
        if tested:
            own = asyncio.ensure_future(asyncio.to_thread(self._test))
            try:
                federated = await self._evaluate_on_participants(number)
            finally:
                row.update(await own)  # the initiator's own test, meanwhile
            row["test_seconds"] = self._test_seconds
            row.update(federated)
        row["seconds"] = round_seconds = time.perf_counter() - started
        self.history.append(row)
        await asyncio.to_thread(
            self.checkpoint.save,
            scheduler.state_dict(),
            number,
            self.history,
            self.task_id,
            self.package.code_hash,
            finished,
            self.strategy,
        )
        shown = metrics_text(row)
        self._event(
            f"round {number}/{scheduler.max_rounds or '?'}: averaged {contributions} "
            f"updates in {round_seconds:.2f} s"
            + (f", aggregated by {aggregator}" if aggregator else "")
            + (f"; {shown}" if shown else "")
        )

    def _select(self, number: int) -> list[str]:
        """This round's participants: rested nodes first, none the strategy leaves out."""
        scheduler = self.scheduler
        available = [p for p in self.participants.values() if p.status.available]
        excluded = self.strategy.exclude(number, {p.node: p.samples for p in available})
        for node, why in excluded.items():
            participant = self.participants[node]
            participant.status, participant.detail = NodeStatus.REFUSED, why
            self._event(f"round {number}: {node} left out: {why}", logging.WARNING)
        available = [p for p in available if p.node not in excluded]
        rested = [p.node for p in available if p.sits_out_until < number]
        resting = [p.node for p in available if p.sits_out_until >= number]
        selected = self.strategy.sample(number, rested, scheduler.max_clients)
        # A strategy that draws at random (Poisson, for privacy) takes the draw as it fell
        if self.strategy.applies_min_clients and len(selected) < scheduler.min_clients and resting:
            back = random.sample(resting, min(len(resting), scheduler.min_clients - len(selected)))
            self._event(
                f"round {number}: taking {', '.join(back)} back early, since too few "
                "others are available for min_clients",
                logging.WARNING,
            )
            selected += back
        return selected

    def _within_memory(self, number: int, selected: list[str], state_bytes: int) -> list[str]:
        """As many of ``selected`` as a strategy that keeps every update can hold in memory."""
        fit = self.policy.keepable(self.strategy, len(selected), state_bytes)
        if fit >= len(selected):
            return selected
        need = self.strategy.round_memory(len(selected), state_bytes)
        self._event(
            f"round {number}: {type(self.strategy).__name__} holds every update at once, and "
            f"{len(selected)} updates of {size_text(state_bytes)} need {size_text(need)}, over "
            f"upload_memory={self.policy.upload_memory}: this round takes {fit} of them",
            logging.WARNING,
        )
        return selected[:fit]

    def _configs(self, number: int, selected: list[str]) -> list[tuple[dict | None, list[str]]]:
        """The strategy's config for each node, as few groups of nodes as configs differ."""
        groups: dict[str, tuple[dict | None, list[str]]] = {}
        for node in selected:
            config = self.strategy.config(number, node) or None
            key = repr(sorted(config.items())) if config else ""
            groups.setdefault(key, (config, []))[1].append(node)
        return list(groups.values())

    def _test(self) -> dict[str, Any]:
        started = time.perf_counter()
        try:
            return test_metrics(self.scheduler.test())
        finally:
            self._test_seconds = time.perf_counter() - started

    async def _evaluate_on_participants(self, number: int) -> dict[str, Any]:
        """Federated evaluation: participants with test data of their own test the round's
        model on it, and the strategy combines what they say, as ``federated_*`` metrics.

        Nodes that do not answer within ``calculation_timeout`` are left out of it.
        """
        nodes = [
            p.node
            for p in self.participants.values()
            if p.test_samples > 0 and p.status in (NodeStatus.READY, NodeStatus.UPLOADED)
        ]
        if not nodes or not self.policy.federated_evaluation:
            return {}
        pending = self._evaluations = {node: None for node in nodes}
        epoch, loop = self._epoch, asyncio.get_running_loop()
        try:
            await self.link.send(Evaluate(number).to_frame(to=nodes))
            await self.link.send_state(self.scheduler.state_dict(), to=nodes, round=number)
            await self._wait_until(
                lambda: self._epoch != epoch or all(v is not None for v in pending.values()),
                loop.time() + self.scheduler.calculation_timeout,
            )
        except ConnectionLost:
            pass  # the reader reconnects; this round's evaluation is what is lost
        finally:
            self._evaluations = None
        results = []
        for node, evaluated in pending.items():
            participant = self.participants.get(node)
            if evaluated is None or participant is None:
                self._event(
                    f"round {number}: {node} did not report how the model does on its own "
                    f"data within {self.scheduler.calculation_timeout:g} s "
                    "(calculation_timeout); it is left out of the federated evaluation",
                    logging.WARNING,
                )
            elif evaluated.error:
                self._event(
                    f"round {number}: {node}'s test() failed on its own data: {evaluated.error}",
                    logging.WARNING,
                )
            else:
                participant.evaluation = dict(evaluated.metrics)
                results.append((evaluated.examples, evaluated.metrics))
        if not results:
            return {}
        combined = self.strategy.evaluate(results)
        return {f"{FEDERATED}{name}": value for name, value in combined.items()}

    def _settle(self, current: DelegatedRound, selected: list[str]) -> None:
        """After a round an elected node aggregated: take over what it says of each node,
        or, if it was lost, run the round again with the next in turn.

        Raises:
            _Reelect: if the aggregator left, failed or missed its deadline.
        """
        number = current.number
        if current.lost is not None:
            aggregator = self.participants.get(current.aggregator)
            if aggregator is not None and not aggregator.status.ended:
                missed = strike(aggregator, number, "did not aggregate in time")
                self._event(missed, logging.WARNING)
            for node in selected:
                participant = self.participants.get(node)
                if participant is not None and participant.status in _IN_ROUND:
                    participant.status = NodeStatus.READY
            self._attempts[number] = self._attempts.get(number, 0) + 1
            self._event(
                f"round {number}: {current.lost}; the round runs again with another aggregator",
                logging.WARNING,
            )
            raise _Reelect
        for participant, status, detail in current.settle():
            participant.status, participant.detail = status, detail
            if status == NodeStatus.UPLOADED:
                participant.strikes = 0
                participant.rounds += 1
            elif status == NodeStatus.REFUSED:
                self._event(str(UpdateRejected(participant.node, number, detail)), logging.WARNING)
            else:  # it missed a deadline
                self._event(strike(participant, number, detail), logging.WARNING)

    # Frames from the relay.

    async def _read_frames(self) -> None:
        try:
            while True:
                try:
                    frame = await self.link.recv()
                except ConnectionLost as lost:
                    if self.reconnect_window <= 0:
                        raise
                    await self._reconnect(lost)
                    continue
                await self._dispatch(frame)
                self._changed.set()
        except asyncio.CancelledError:
            raise
        except BaseException as exc:
            self._lost = exc
            self._changed.set()

    async def _reconnect(self, lost: ConnectionLost) -> None:
        """Get a new relay connection within the window; participants come back on their own.

        Raises:
            ConnectionLost: if no relay took the task back within the window.
        """
        window = self.reconnect_window
        self._epoch += 1
        self._connected = False
        for participant in self.participants.values():
            if not participant.status.ended:
                participant.status = NodeStatus.RECONNECTING
                participant.detail = "lost with the relay connection"
        self._changed.set()
        self._event(
            f"{lost}; reconnecting for up to {window:g} s (reconnect_window)", logging.WARNING
        )
        await self.link.close()
        try:
            self.link = await self.link.reopen(window)
        except RelayRefused as refusal:
            raise ConnectionLost(
                lost.url,
                f"{lost.detail}, and no relay took the task back "
                f"within {window:g} s (reconnect_window): "
                f"{refusal.message}",
            ) from None
        self._connected = True
        self._changed.set()
        self._event(
            "reconnected to the relay; participants come back on their own, without "
            "consenting again"
        )

    async def _rejoin(self, number: int, epoch: int) -> None:
        """After a lost relay connection: wait for it, then for the participants to come back."""
        self._event(
            f"round {number}: the relay connection was lost; the round runs again "
            "once participants are back",
            logging.WARNING,
        )
        loop = asyncio.get_running_loop()
        # The reader gives up within the window (and the hello's answer time).
        await self._wait_until(
            lambda: self._epoch > epoch and self._connected,
            loop.time() + self.reconnect_window + WELCOME_TIMEOUT,
        )
        back = loop.time() + self.reconnect_window
        await self._wait_until(lambda: self._count_available() >= self.scheduler.min_clients, back)
        # The others get a short grace, as when a task gathers.
        await self._wait_until(
            lambda: (
                not any(
                    p.status in (NodeStatus.RECONNECTING, NodeStatus.JOINED)
                    for p in self.participants.values()
                )
            ),
            min(back, loop.time() + self.policy.join_grace),
        )
        for participant in self.participants.values():
            if participant.status == NodeStatus.RECONNECTING:
                participant.status = NodeStatus.DROPPED
                participant.detail = "not back since the relay connection was lost"

    @contextlib.asynccontextmanager
    async def _link_lost_interrupts(self) -> AsyncIterator[None]:
        """A send that finds the relay gone voids the round, when it may reconnect."""
        try:
            yield
        except ConnectionLost:
            if self.reconnect_window <= 0:
                raise
            raise _Interrupted from None

    async def _dispatch(self, frame: Frame) -> None:
        node = sender(frame)
        if frame.kind == Kind.STATE or frame.kind == Kind.STATE_END:
            self._on_state(node, frame)
            return
        try:
            message = parse(frame)
        except ProtocolError as exc:
            log.warning("ignored a frame: %s", exc)
            return
        if isinstance(message, PeerJoined):
            await self._on_joined(message)
            return
        participant = self.participants.get(node)
        if participant is None:
            log.warning("ignored a %s frame from unknown node %r", frame.kind, node)
            return
        participant.last_seen = time.time()
        match message:
            case PeerLeft():
                if not participant.status.ended:  # a refusal already said why it is out
                    participant.status = NodeStatus.DROPPED
                self._leave_round(node, "left")
                if self._evaluations is not None:
                    self._evaluations.pop(node, None)
                self._event(f"{node} left", logging.WARNING)
            case Status():
                self._on_status(participant, message)
            case Progress(round=number, epoch=epoch, epochs=epochs):
                if number == participant.round and participant.status == NodeStatus.TRAINING:
                    participant.epoch, participant.epochs = epoch, epochs
            case Trained():
                self._on_trained(participant, message)
            case Secure():
                if isinstance(self._current, SecureRound):
                    self._current.secure(node, message)
            case Aggregated():
                if isinstance(self._current, DelegatedRound):
                    self._current.aggregated(node, message)
            case Evaluated():
                pending = self._evaluations
                if (
                    pending is not None
                    and node in pending
                    and message.round == self.scheduler.current_round
                ):
                    pending[node] = message
            case Failed():
                participant.status = NodeStatus.FAILED
                self._leave_round(node, "failed")
                error = RemoteError(node, message.during, message.error, message.traceback)
                participant.detail, participant.traceback = error.error, error.traceback
                self._event(str(error), logging.ERROR)
            case _:
                log.warning("ignored an unexpected %s frame from %r", frame.kind, node)

    async def _on_joined(self, message: PeerJoined) -> None:
        node = message.node
        known = self.participants.get(node)
        if known is not None:
            self._leave_round(node, "reconnected; its work in this round is lost")
        if message.accepted == self.package.code_hash:
            # It consented to this very code: it only says again that its data is verified.
            back = self.participants[node] = known or Participant(node)
            back.status, back.detail = NodeStatus.JOINED, ""
            self._event(f"{node} is back, with its consent to this code")
            return
        self.participants[node] = Participant(node)
        self._event(f"{node} joined; sending it the task's code")
        with contextlib.suppress(ConnectionLost):  # the next read finds the relay gone
            await self.link.send(Frame({**self._task_header, "to": [node]}))

    def _leave_round(self, node: str, why: str) -> None:
        if self._current is not None:
            self._current.leave(node, why)

    def _on_status(self, participant: Participant, status: Status) -> None:
        node = participant.node
        if status.stage == "declined":
            participant.status = NodeStatus.DECLINED
            participant.detail = status.detail or "consent refused"
            self._event(f"{node} declined the task's code: {participant.detail}", logging.WARNING)
        elif status.stage == "verified" and status.ok:
            samples, limit = status.samples or 0, self.policy.max_samples
            if samples > limit:
                participant.status = NodeStatus.UNVERIFIED
                participant.detail = (
                    f"reported {samples} training samples, over max_samples="
                    f"{limit}: implausible, so its update would outweigh "
                    "everyone's; raise max_samples if the count is real"
                )
                self._event(f"{node} refused: {participant.detail}", logging.WARNING)
                return
            participant.samples = max(samples, 0)
            participant.test_samples = max(status.test_samples or 0, 0)
            participant.status = NodeStatus.READY
            self._event(f"{node} verified its data: {participant.samples} training samples")
        elif status.stage == "verified":
            participant.status, participant.detail = NodeStatus.UNVERIFIED, status.detail
            participant.traceback = trace = status.traceback
            self._event(
                f"{node} failed data verification: {status.detail}"
                + (f"\n{trace.rstrip()}" if trace else ""),
                logging.WARNING,
            )

    def _on_trained(self, participant: Participant, trained: Trained) -> None:
        participant.train_seconds = trained.seconds
        if trained.epsilon is not None:
            participant.epsilon = trained.epsilon
        if self._current is not None and trained.round == self._current.number:
            self._current.trained(participant)

    def _on_state(self, node: str, frame: Frame) -> None:
        if node in self.participants:
            self.participants[node].last_seen = time.time()
        if self._current is not None:
            self._current.feed(node, frame)

    # Helpers.

    async def _wait_until(
        self, predicate: Callable[[], bool], deadline: float, stoppable: bool = False
    ) -> bool:
        """Wait for ``predicate()`` until ``deadline``; whether it came true.

        Raises:
            _Stopped: if ``stoppable`` and the author asked to stop meanwhile.
        """
        loop = asyncio.get_running_loop()
        while not predicate():
            self._check_lost()
            if stoppable and self.stop_requested:
                raise _Stopped
            remaining = deadline - loop.time()
            if remaining <= 0:
                return False
            self._changed.clear()
            try:
                await asyncio.wait_for(self._changed.wait(), remaining)
            except asyncio.TimeoutError:
                pass
        return True

    def _check_lost(self) -> None:
        if self._lost is not None:
            number = self._current.number if self._current else None
            raise TaskFailed(self.task_id, str(self._lost), number) from self._lost

    async def _tell_all(self, message: Message) -> None:
        if self._lost is None:
            try:
                await self.link.send(message.to_frame(to="*"))
            except ConnectionLost:
                pass

    def _event(self, text: str, level: int = logging.INFO) -> None:
        log.log(level, text, extra={"event": True})
        if self.on_event is not None:
            self.on_event(text)


class _Interrupted(Exception):
    """The relay connection was lost in a round; it runs again once participants are back."""


class _Reelect(Exception):
    """The round's elected aggregator was lost; the round runs again with another."""


class _Stopped(Exception):
    """The author asked to stop while the task waited for participants."""
