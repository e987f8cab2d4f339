"""A round aggregated by one of its participants (``is_centralized=False``).

Each such round the initiator elects one of the round's participants, in
turn by name (:func:`elect`), and tells it whose updates to collect
(``Aggregate``). The others send their update to it through the relay
instead of to the initiator; it checks and folds them exactly as the
initiator would (:class:`~fedmagic.engine.uploads.RoundUploads`, with the
task's strategy rebuilt by name) and sends the initiator their combination
and what became of each (``Aggregated``). The initiator never holds one
node's update; it applies the strategy's server step, tests and checkpoints.

Taking turns, rather than the fastest node as the reference platform does,
spreads what any one node sees of its peers' updates, and asks nothing a
node could claim falsely to get elected. An elected node that vanishes, or
misses its deadline, costs the round a re-run with the next in turn.
"""

from __future__ import annotations

import asyncio
import logging
from dataclasses import dataclass, field
from typing import Any, Awaitable, Callable, Sequence

import torch

from ..errors import CodecError, ProtocolError
from ..strategies import Strategy
from ..strategies.aggregate import State
from ..wire.codec import Frame, Kind, StateReader
from ..wire.messages import (
    Aggregate,
    Aggregated,
    Failed,
    LeftOut,
    Trained,
    Upload,
    parse,
    sender,
)
from ..wire.transport import Transport
from .policy import RoundPolicy
from .roster import Participant
from .state import NodeStatus
from .uploads import RoundUploads

__all__ = ["AggregatorRoom", "DelegatedRound", "elect"]

log = logging.getLogger("fedmagic")

#: What an elected aggregator reports of a node, and the initiator takes over.
REPORTED = (NodeStatus.UPLOADED, NodeStatus.REFUSED, NodeStatus.TIMED_OUT)


def elect(number: int, selected: Sequence[str], attempt: int = 0) -> str:
    """The node that aggregates round ``number``: the round's participants take turns by name;
    each re-run of a round (``attempt``) passes the turn on."""
    ordered = sorted(selected)
    return ordered[(number - 1 + attempt) % len(ordered)]


@dataclass(eq=False)
class DelegatedRound:
    """The initiator's side of a round an elected participant aggregates.

    It waits for the aggregator's ``Aggregated`` and the combined state that
    follows, tells it of nodes that leave meanwhile, and gives up on it at
    ``deadline`` (``lost`` then says why).
    """

    number: int
    aggregator: str
    global_state: State
    owed: set[str]
    participants: dict[str, Participant]
    deadline: float
    outcome: Aggregated | None = None
    combined: dict[str, torch.Tensor] | None = None
    #: Why the aggregator is lost to this round, once it is.
    lost: str | None = None
    _reader: StateReader | None = None
    _left: list[tuple[str, str]] = field(default_factory=list)

    @property
    def count(self) -> int:
        return self.outcome.count if self.outcome is not None else 0

    @property
    def samples(self) -> int:
        return self.outcome.samples if self.outcome is not None else 0

    def trained(self, participant: Participant) -> None:
        if participant.status == NodeStatus.TRAINING and participant.node in self.owed:
            participant.status, participant.epoch = NodeStatus.TRAINED, participant.epochs

    def leave(self, node: str, why: str) -> None:
        if node == self.aggregator:
            self.lost = f"{node}, elected to aggregate round {self.number}, {why}"
        elif node in self.owed:
            self.owed.discard(node)
            self._left.append((node, why))

    def progress(self, node: str) -> tuple[int, int]:
        return (0, 0)  # updates go to the aggregator: the initiator does not see them come

    def aggregated(self, node: str, message: Aggregated) -> None:
        if node != self.aggregator or message.round != self.number or self.outcome is not None:
            log.debug("ignored %s from %r", message, node)
            return
        self.outcome = message
        if message.count > 0:
            self._reader = StateReader(self.global_state)

    def feed(self, node: str, frame: Frame) -> None:
        """A frame of the combined state, from the aggregator."""
        if node != self.aggregator or self._reader is None or self.combined is not None:
            log.debug("ignored state data %s from %r", frame, node)
            return
        if frame.header.get("round") != self.number:
            return
        try:
            if frame.kind == Kind.STATE:
                self._reader.feed(frame)
            else:
                self.combined = self._reader.finish(frame)
        except CodecError as exc:
            self.lost = (
                f"{node}, elected to aggregate round {self.number}, sent a broken state: {exc}"
            )

    @property
    def done(self) -> bool:
        return self.lost is not None or (
            self.outcome is not None and (self.outcome.count == 0 or self.combined is not None)
        )

    async def collect(
        self,
        changed: asyncio.Event,
        check: Callable[[], None],
        send: Callable[[Frame], Awaitable[None]],
    ) -> None:
        """Wait for the aggregator's answer, or its loss, or the deadline."""
        loop = asyncio.get_running_loop()
        while True:
            changed.clear()
            check()
            while self._left:
                node, why = self._left.pop(0)
                await send(LeftOut(self.number, node, why).to_frame(to=[self.aggregator]))
            if self.done:
                return
            remaining = self.deadline - loop.time()
            if remaining <= 0:
                self.lost = (
                    f"{self.aggregator}, elected to aggregate round {self.number}, did not send "
                    "the round's combined updates in time (calculation_timeout and two uploads)"
                )
                return
            try:
                await asyncio.wait_for(changed.wait(), remaining)
            except asyncio.TimeoutError:
                pass

    def settle(self) -> list[tuple[Participant, NodeStatus, str]]:
        """Take over what the aggregator says of each node; the nodes it reports."""
        assert self.outcome is not None, "only an answered round is settled"
        reported = []
        for node, said in self.outcome.outcomes.items():
            participant = self.participants.get(node)
            if participant is None or node not in self.owed or not _is_outcome(said):
                continue
            status, detail = NodeStatus(said[0]), said[1]
            reported.append((participant, status, detail))
        return reported


def _is_outcome(said: Any) -> bool:
    return (
        isinstance(said, list)
        and len(said) == 2
        and said[0] in {str(status) for status in REPORTED}
        and isinstance(said[1], str)
    )


class AggregatorRoom:
    """A participant's side of a round it was elected to aggregate.

    Made from the initiator's ``Aggregate``, it takes the round's updates its
    peers send (``receive``) while this node trains its own, folds each with
    the task's strategy, and sends the initiator the combination (``run``).
    """

    def __init__(
        self,
        message: Aggregate,
        reference: dict[str, torch.Tensor],
        strategy: Strategy,
        link: Transport,
    ) -> None:
        self.number = message.round
        self.link = link
        samples = {node: int(count) for node, count in message.samples.items()}
        self.participants = {
            node: Participant(node, NodeStatus.TRAINING, count) for node, count in samples.items()
        }
        self.fold = strategy.fold(reference)
        self.fold.reset()
        loop = asyncio.get_running_loop()
        self.uploads = RoundUploads(
            self.number,
            reference,
            set(samples),
            self.participants,
            RoundPolicy(upload_timeout=message.upload_seconds),
            strategy,
            self.fold,
            slots=message.slots,
            train_deadline=loop.time() + message.calculation_timeout,
            calculation_timeout=message.calculation_timeout,
            buffers=[],
            event=lambda text, level: log.log(level, "as aggregator: %s", text),
        )
        self._changed = asyncio.Event()

    def receive(self, frame: Frame) -> None:
        """A peer's frame for this round: its update, or that it trained or failed."""
        node = sender(frame)
        participant = self.participants.get(node)
        if participant is None:
            log.debug(
                "as aggregator: ignored %s from %r, not in round %d", frame, node, self.number
            )
            return
        if frame.kind in (Kind.STATE, Kind.STATE_END):
            self.uploads.feed(node, frame)
        else:
            try:
                message = parse(frame)
            except ProtocolError as exc:
                log.warning("as aggregator: ignored a frame: %s", exc)
                return
            match message:
                case Trained(round=number) if number == self.number:
                    self.uploads.trained(participant)
                case Failed():
                    self.uploads.leave(node, "failed")
        self._changed.set()

    def left_out(self, message: LeftOut) -> None:
        if message.round == self.number:
            self.uploads.leave(message.left, message.reason)
            self._changed.set()

    async def run(self) -> None:
        """Collect the round's updates, then send the initiator their combination."""

        async def grant(nodes: list[str]) -> None:
            await self.link.send(Upload(self.number).to_frame(to=nodes))

        await self.uploads.collect(self._changed, lambda: None, grant)
        outcomes = {
            node: [str(p.status), p.detail]
            for node, p in self.participants.items()
            if p.status in REPORTED
        }
        count = self.fold.count
        combined = await asyncio.to_thread(self.fold.combine) if count else None
        log.info("as aggregator of round %d: folded %d updates", self.number, count)
        await self.link.send(
            Aggregated(self.number, outcomes, self.uploads.samples, count).to_frame()
        )
        if combined is not None:
            await self.link.send_state(combined, round=self.number)
