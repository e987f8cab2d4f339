"""A participant's side of a task: consent, verify, then train each round.

The same runtime serves ``fedmagic join`` on a server and a notebook that
joins a task. Raw data never leaves the node: only the state returned by
the scheduler's ``state_dict()`` is sent back.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import threading
import time
import traceback
from dataclasses import dataclass
from typing import Any, Callable

from ..errors import (
    ConnectionLost,
    DataNotFound,
    ProtocolError,
    RelayRefused,
    SecureAggregationError,
    TaskDefinitionError,
    TaskFailed,
    VerificationFailed,
)
from ..strategies import FedAvg, rebuild
from ..strategies.guarantees import private_training, secure_aggregation
from ..wire.codec import Frame, Kind, StateReader
from ..wire.frames import INITIATOR
from ..wire.messages import (
    Aggregate,
    Evaluate,
    Evaluated,
    Failed,
    Finish,
    LeftOut,
    Progress,
    Round,
    Secure,
    Status,
    Trained,
    Upload,
    parse,
)
from ..wire.transport import Transport
from .dp_sgd import PrivateOptimizer
from .elected import AggregatorRoom
from .scheduler import Scheduler, test_metrics
from .secure_round import SecureParty
from .task import TaskPackage

__all__ = ["JoinOutcome", "ParticipantRuntime", "describe_failure"]

log = logging.getLogger("fedmagic")

Consent = Callable[[TaskPackage], bool]

#: Seconds a verified node keeps trying to get back to its task after losing the relay.
RECONNECT_WINDOW = 60.0


@dataclass
class JoinOutcome:
    """How a participant's part in a task ended."""

    task_id: str
    node: str
    ok: bool
    reason: str
    rounds: int = 0


class ParticipantRuntime:
    """Takes part in one task over an open link.

    Args:
        link: a participant's connection to the task (a websocket ``Link``, or a
            ``MemoryLink`` of the in-memory relay).
        node: this node's name.
        consent: shown the task's package; returns whether to run it.
        on_event: called with ``(kind, details)`` as the task goes on, for
            progress displays.
        reconnect_window: once its data is verified, a node that loses the
            relay (or whose initiator's connection drops) keeps trying to
            get back this many seconds, keeping its model and its consent;
            0 gives up at once.
    """

    def __init__(
        self,
        link: Transport,
        node: str,
        consent: Consent,
        on_event: Callable[[str, dict[str, Any]], None] | None = None,
        reconnect_window: float = RECONNECT_WINDOW,
    ) -> None:
        self.link = link
        self.node = node
        self.consent = consent
        self.on_event = on_event or (lambda kind, details: None)
        self.reconnect_window = reconnect_window
        self.scheduler: Scheduler | None = None
        self.samples = 0
        #: Examples of its own test data, to evaluate the global model on (0: none).
        self.test_samples = 0
        self.rounds = 0
        #: DP-SGD, where the task's strategy trains privately: what it spent is in ``epsilon``.
        self.private: PrivateOptimizer | None = None
        #: The code hash this node consented to and verified its data for.
        self.accepted: str | None = None
        # Reused every round: fresh pages for a large model cost more than the copy.
        self._inbox: dict[str, Any] = {}
        #: Frames from the initiator, as the link's reader takes them (and what ended it).
        self._frames: asyncio.Queue[Frame | Exception] = asyncio.Queue()
        self._reader: asyncio.Task[None] | None = None
        #: With is_centralized=False: the node aggregating the current round, if not the
        #: initiator; and the round this node aggregates, if it was elected.
        self._aggregator: str | None = None
        self._room: AggregatorRoom | None = None
        self._room_task: asyncio.Task[None] | None = None
        self._strategy: dict[str, Any] = FedAvg().describe()
        #: The secure round this node is in, where the task's strategy aggregates securely.
        self._party: SecureParty | None = None

    async def run(self) -> JoinOutcome:
        """Take part until the task ends, and say how it ended.

        The task's own failures (declined, verification, ``train()``, the task
        failing) come back in the outcome.

        Raises:
            FedMagicError: if the connection or the initiator breaks down.
        """
        task_id = str(self.link.welcome.header.get("task"))
        try:
            frame = await self._next()
            if frame.kind != Kind.TASK:
                raise ProtocolError("initiator", f"expected the task's code, got {frame.kind!r}")
            package = TaskPackage.from_header(frame.header)
            self._strategy = package.strategy or self._strategy
            self.on_event("task", {"package": package})
            if not await asyncio.to_thread(self.consent, package):
                await self._status(Status("declined", detail="the data owner did not consent"))
                return JoinOutcome(task_id, self.node, False, "consent refused")
            try:
                scheduler, self.samples = await asyncio.to_thread(self._prepare, package)
            except Exception as exc:
                failure = describe_failure(exc)
                await self._status(
                    Status("verified", ok=False, detail=failure, traceback=traceback.format_exc())
                )
                return JoinOutcome(
                    task_id, self.node, False, f"data verification failed: {failure}"
                )
            self.scheduler = scheduler
            self.accepted = package.code_hash
            self.on_event("verified", {"samples": self.samples, "max_rounds": scheduler.max_rounds})
            try:
                await self._say_verified()
            except ConnectionLost:
                pass  # reading the next frame finds the link down, and reconnects
            return await self._rounds(task_id)
        finally:
            self._stop_reading()
            await self.link.close()

    def _prepare(self, package: TaskPackage) -> tuple[Scheduler, int]:
        scheduler = package.build_scheduler()
        scheduler._setup(package.task_id)
        verify_data(package, self.node)
        scheduler.validate_context()
        if not scheduler._context_validated:
            raise TaskDefinitionError(
                type(scheduler).__name__,
                "validate_context() did not call the parent's",
                "call super().validate_context() first in your validate_context()",
            )
        dataset = getattr(scheduler.make_train_dataloader(), "dataset", None)
        samples = len(dataset) if dataset is not None else 0
        self.test_samples = _test_samples(scheduler)
        dp_sgd = private_training(package.strategy)
        if dp_sgd is not None:  # before round 1: a model it cannot train fails verification
            self.private = PrivateOptimizer(scheduler, dp_sgd)
        return scheduler, samples

    async def _rounds(self, task_id: str) -> JoinOutcome:
        trained: int | None = None  # the round whose update awaits the initiator's request
        while True:
            try:
                frame = await self._next()
            except _Rejoined:
                trained = None  # the initiator runs the round it was in again
                continue
            if frame.kind == Kind.TASK:  # after a reconnect, code other than consented to
                detail = (
                    "the task's code changed while this node was away; join again to "
                    "review the new code"
                )
                await self._status(Status("declined", detail=detail))
                return JoinOutcome(task_id, self.node, False, detail, self.rounds)
            match parse(frame):
                case Finish(ok=ok, reason=reason):
                    self.on_event("finished", {"ok": ok, "reason": reason})
                    return JoinOutcome(task_id, self.node, ok, reason, self.rounds)
                case Round(
                    round=number, epochs=epochs, upload=upload, config=config, aggregator=chosen
                ):
                    # A new round also drops an update the initiator gave up on (too late).
                    trained = None
                    self._aggregator = chosen
                    try:
                        failure = await self._train(number, epochs, config or {})
                    except _Rejoined:
                        continue
                    if failure is not None:
                        return JoinOutcome(task_id, self.node, False, failure, self.rounds)
                    trained = number
                    if upload:  # room for every update: no request comes
                        await self._upload(number)
                        trained = None
                case Upload(round=number) if number == trained:
                    await self._upload(number)
                    trained = None
                case Evaluate(round=number):
                    try:
                        await self._evaluate(number)
                    except _Rejoined:
                        continue
                case _:
                    raise ProtocolError(
                        "initiator",
                        f"expected a round, an upload request or the end of the task, got {frame}",
                    )

    @property
    def _scheduler(self) -> Scheduler:
        """The task's scheduler, which rounds need: built once this node verified its data."""
        if self.scheduler is None:
            raise RuntimeError("the task's scheduler is not built before its data is verified")
        return self.scheduler

    def _to(self) -> dict[str, Any]:
        """Where this round's update goes, and what it says of its training: the initiator,
        or the round's elected aggregator (the initiator hears the rest)."""
        return {} if self._aggregator is None else {"to": [self._aggregator]}

    def _told(self) -> list[str] | None:
        return None if self._aggregator is None else [INITIATOR, self._aggregator]

    async def _upload(self, round: int) -> None:
        update = await asyncio.to_thread(self._scheduler.state_dict)
        party = self._party
        if secure_aggregation(self._strategy) is not None and (
            party is None or party.round != round
        ):
            log.warning(
                "round %d: not uploading: the task this node consented to aggregates securely, "
                "and the initiator asked for the update without setting up a secure round",
                round,
            )
            return
        if party is not None:
            start = self._scheduler.global_state
            assert start is not None, "a round's training keeps the global state it began from"
            masked = await party.masked(update, start)
            if masked is None:  # the round moved on, or this node gave up on it (and said why)
                return
            update = masked
        try:
            await self.link.send_state(update, round=round, **self._to())
        except ConnectionLost:
            return  # the task may have ended meanwhile: the next frame read says how
        self.rounds += 1
        self.on_event("uploaded", {"round": round})

    async def _train(self, round: int, epochs: int | None, config: dict[str, Any]) -> str | None:
        """Load the global weights, train, report; the failure's text if ``train()`` raised.

        ``config`` is what the task's strategy tells this node for the round:
        the scheduler's ``round_config`` while it trains, beside the global
        state as received (``global_state``, which FedProx's term compares with).
        """
        scheduler = self._scheduler
        epochs = epochs or scheduler.merge_epochs
        self.on_event("round", {"round": round, "epochs": epochs})
        state = await self._receive_state(round)
        scheduler.round_config, scheduler.global_state = config, state
        started = time.perf_counter()
        try:
            await asyncio.to_thread(scheduler.load_state_dict, state)
            for epoch in range(1, epochs + 1):
                await asyncio.to_thread(scheduler.train)
                self.on_event("epoch", {"round": round, "epoch": epoch, "epochs": epochs})
                if epoch < epochs:  # the last one is said by Trained
                    with contextlib.suppress(ConnectionLost):
                        await self.link.send(Progress(round, epoch, epochs).to_frame())
        except Exception as exc:
            with contextlib.suppress(ConnectionLost):  # the failure is this node's to report
                failed = Failed(round, "train()", describe_failure(exc), traceback.format_exc())
                await self.link.send(failed.to_frame(to=self._told()))
            return f"train() failed: {describe_failure(exc)}"
        seconds = time.perf_counter() - started
        epsilon = None if self.private is None else self.private.epsilon
        trained = Trained(round, self.samples, seconds, epsilon)
        try:
            await self.link.send(trained.to_frame(to=self._told()))
        except ConnectionLost:
            pass  # the task may have ended meanwhile: the next frame read says how

        self.on_event("trained", {"round": round, "seconds": seconds, "epsilon": epsilon})
        return None

    async def _evaluate(self, round: int) -> None:
        """Test the global model of ``round`` on this node's own data, and say how it did."""
        scheduler = self._scheduler
        state = await self._receive_state(round)
        try:
            await asyncio.to_thread(scheduler.load_state_dict, state)
            metrics = test_metrics(await asyncio.to_thread(scheduler.test))
            evaluated = Evaluated(round, self.test_samples, metrics)
        except Exception as exc:
            evaluated = Evaluated(round, 0, {}, error=describe_failure(exc))
        self.on_event("evaluated", {"round": round, "metrics": evaluated.metrics})
        with contextlib.suppress(ConnectionLost):  # the next frame read says how it goes on
            await self.link.send(evaluated.to_frame())

    async def _receive_state(self, round: int) -> dict[str, Any]:
        reader = StateReader(self._scheduler.state_dict(), out=self._inbox)
        while True:
            frame = await self._next()
            if frame.kind not in (Kind.STATE, Kind.STATE_END) or frame.header.get("round") != round:
                raise ProtocolError("initiator", f"expected round {round}'s weights, got {frame}")
            if frame.kind == Kind.STATE_END:
                return reader.finish(frame)
            reader.feed(frame)

    async def _next(self) -> Frame:
        """The next frame from the initiator (or an upload request from the round's aggregator).

        Raises:
            _Rejoined: the link was lost and is back: what was under way is void.
            TaskFailed: the initiator left and did not come back.
        """
        if self._reader is None:
            self._frames = asyncio.Queue()
            self._reader = asyncio.create_task(self._read(self.link, self._frames))
        item = await self._frames.get()
        if isinstance(item, ConnectionLost):
            await self._reconnect(item, str(item))
            raise _Rejoined from None
        if isinstance(item, Exception):
            raise item
        frame = item
        if frame.kind == Kind.TASK_CLOSED:
            # Its connection dropped without a word: it may be coming back.
            gone = TaskFailed(
                str(frame.header.get("task")), "the initiator left the task without finishing it"
            )
            await self._reconnect(gone, "the initiator's connection to the relay dropped")
            raise _Rejoined
        return frame

    async def _read(self, link: Transport, frames: asyncio.Queue[Frame | Exception]) -> None:
        """Read the link all the time, training or not: frames for the round this node
        aggregates go to it as they come; the rest wait in ``frames`` for the rounds."""
        try:
            while True:
                frame = await link.recv()
                if not self._for_room(frame):
                    frames.put_nowait(frame)
        except Exception as exc:  # the link is done: the rounds hear why
            frames.put_nowait(exc)

    def _for_room(self, frame: Frame) -> bool:
        """Take a frame of the round this node was elected to aggregate; whether it was one."""
        origin = frame.header.get("from")
        if origin == INITIATOR and frame.kind == Kind.SECURE:
            self._on_secure(frame)
            return True
        if origin == INITIATOR and frame.kind in (Kind.ROUND, Kind.FINISH):
            self._end_party(f"the initiator moved on ({frame.kind})", frame.header.get("round"))
        if origin == INITIATOR and frame.kind == Kind.AGGREGATE:
            self._open_room(frame)
            return True
        if origin == INITIATOR and frame.kind == Kind.LEFT_OUT:
            message = parse(frame)
            if self._room is not None and isinstance(message, LeftOut):
                self._room.left_out(message)
            return True
        if origin is None or origin == INITIATOR or frame.kind == Kind.UPLOAD:
            return False  # the initiator's, the relay's, or the aggregator's upload request
        if self._room is not None:
            self._room.receive(frame)
        else:
            log.debug("ignored %s from peer %r: this node aggregates no round", frame, origin)
        return True

    def _on_secure(self, frame: Frame) -> None:
        """A stage of a secure round: a setup starts this node's side of it."""
        try:
            message = parse(frame)
        except ProtocolError as malformed:
            log.warning("ignored a secure frame: %s", malformed)
            return
        assert isinstance(message, Secure)
        if message.stage != "setup":
            if self._party is not None and self._party.round == message.round:
                self._party.receive(message)
            else:
                log.debug("ignored a secure %s of round %d", message.stage, message.round)
            return
        self._end_party("a new secure round began")
        try:
            layer = secure_aggregation(self._strategy)
            if layer is None:
                raise ProtocolError(
                    "initiator",
                    "set up a secure round, but the task this node consented to does not "
                    "aggregate securely",
                )
            self._party = SecureParty(self.node, layer, message, self._send_secure)
        except (ProtocolError, SecureAggregationError) as refused:
            log.warning(
                "round %d: cannot take part in the secure round: %s", message.round, refused
            )
            gave_up = Secure(message.round, "abort", {"reason": str(refused)})
            asyncio.ensure_future(self._send_secure(gave_up.to_frame()))

    async def _send_secure(self, frame: Frame) -> None:
        with contextlib.suppress(ConnectionLost):  # the next frame read finds out
            await self.link.send(frame)

    def _end_party(self, why: str, round: Any = None) -> None:
        """Stop this node's side of a secure round that is over (not the one ``round`` is)."""
        if self._party is not None and self._party.round != round:
            self._party.abandon(why)
            self._party = None

    def _open_room(self, frame: Frame) -> None:
        message = parse(frame)
        if not isinstance(message, Aggregate):
            return
        self._close_room()
        room = AggregatorRoom(
            message, self._scheduler.state_dict(), rebuild(self._strategy), self.link
        )
        log.info("elected to aggregate round %d of %d nodes", message.round, len(message.samples))
        self.on_event("aggregating", {"round": message.round})
        self._room, self._room_task = room, asyncio.create_task(self._aggregate(room))

    async def _aggregate(self, room: AggregatorRoom) -> None:
        try:
            await room.run()
        except ConnectionLost:
            pass  # the initiator runs the round again with another aggregator
        except Exception:
            log.exception("could not aggregate round %d", room.number)
        finally:
            if self._room is room:
                self._room = None

    def _close_room(self) -> None:
        if self._room_task is not None:
            self._room_task.cancel()
        self._room = self._room_task = None

    def _stop_reading(self) -> None:
        """Stop the link's reader and any round this node aggregates (the link is going)."""
        if self._reader is not None:
            self._reader.cancel()
            self._reader = None
        self._close_room()
        self._end_party("the link is going")

    async def _reconnect(self, failure: Exception, why: str) -> None:
        """Get back to the task within the reconnect window, or raise ``failure``."""
        self._stop_reading()
        if self.accepted is None or self.reconnect_window <= 0:
            raise failure
        window = self.reconnect_window
        self.on_event("reconnecting", {"why": why, "window": window})
        log.warning("%s; reconnecting for up to %g s", why, window)
        await self.link.close()
        try:
            self.link = await self.link.reopen(window, accepted=self.accepted)
        except RelayRefused as refusal:
            raise TaskFailed(
                str(self.link.welcome.header.get("task")),
                f"{why}, and the task did not come back within {window:g} s "
                f"(reconnect_window): {refusal}",
            ) from None
        log.info("back in the task; this node keeps its model and its consent")
        self.on_event("reconnected", {})
        try:
            await self._say_verified()
        except ConnectionLost:
            pass  # lost again: the next frame read finds out

    async def _say_verified(self) -> None:
        verified = Status("verified", ok=True, samples=self.samples, test_samples=self.test_samples)
        await self._status(verified)

    async def _status(self, status: Status) -> None:
        await self.link.send(status.to_frame())


class _Rejoined(Exception):
    """The link was lost and is back; the initiator runs the round it was in again."""


def verify_data(package: TaskPackage, node: str) -> bool:
    """Run the task's ``DatasetVerify`` on this node's data.

    Returns whether the task has one. What it logs as warnings while it runs
    (say, which files are missing) goes into the failure, so the task's author
    reads why and not only that it failed.

    Raises:
        VerificationFailed: if ``run()`` returned False; whatever ``run()`` raised.
    """
    verifier = package.build_verifier(node)
    if verifier is None:
        return False
    with _WarningsOfThisThread() as warnings:
        passed = verifier.run()
    if not passed:
        why = "; ".join(warnings.lines) or (
            "this node's data is missing or not in the form the task expects"
        )
        raise VerificationFailed(f"DatasetVerify.run() returned False: {why}")
    return True


class _WarningsOfThisThread(logging.Handler):
    """Collects the warnings ``fedmagic.logger`` gets from this thread while in use."""

    def __init__(self) -> None:
        super().__init__(logging.WARNING)
        self.lines: list[str] = []
        self._thread = threading.get_ident()

    def emit(self, record: logging.LogRecord) -> None:
        if record.thread == self._thread:
            self.lines.append(record.getMessage())

    def __enter__(self) -> _WarningsOfThisThread:
        logging.getLogger("fedmagic").addHandler(self)
        return self

    def __exit__(self, *exc_info: object) -> None:
        logging.getLogger("fedmagic").removeHandler(self)


def _test_samples(scheduler: Scheduler) -> int:
    """How many test examples this node has, to evaluate the global model on; 0 for none."""
    try:
        dataset: Any = scheduler.make_test_dataloader().dataset
        return len(dataset)
    except Exception:  # no test data here is no failure: the node only trains
        return 0


def describe_failure(exc: BaseException) -> str:
    """One line saying what went wrong, with a hint where fedmagic knows one."""
    text = f"{type(exc).__name__}: {exc}" if not isinstance(exc, VerificationFailed) else str(exc)
    chain = traceback.format_exception(exc)
    if any("download" in line.lower() for line in chain) and (
        "URLError" in "".join(chain) or "Error downloading" in "".join(chain)
    ):
        root = getattr(exc, "filename", None) or "the task's data directory"
        return str(DataNotFound(str(root), text))
    return text
