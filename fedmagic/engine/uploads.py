"""One round's updates on their way in, within the initiator's memory budget.

A selected node trains, says so, and uploads: straight away when the budget
has room for every update, else when a slot frees. Each upload has one
whole-upload deadline and training has ``calculation_timeout``; a node that
misses either sits out the next round(s). Each complete update is checked
(the codec already held it to the global state's names, dtypes and shapes;
here: finite values, a weight) and handed to the strategy's fold as it
completes, and its buffer goes back for the next upload to fill.
"""

from __future__ import annotations

import asyncio
import collections
import logging
from dataclasses import dataclass, field
from typing import Awaitable, Callable

import torch

from ..errors import CodecError, UpdateRejected
from ..strategies import Strategy
from ..strategies.aggregate import Fold, non_finite
from ..wire.codec import Frame, Kind, StateReader
from .policy import RoundPolicy, sit_out_rounds
from .roster import Participant
from .state import NodeStatus, size_text

__all__ = ["RoundUploads", "strike"]

log = logging.getLogger("fedmagic")


@dataclass(eq=False)
class _Upload:
    """One node's update on its way in."""

    node: str
    reader: StateReader
    deadline: float
    #: None once given back for the next upload to fill.
    buffer: dict[str, torch.Tensor] | None
    received: int = 0
    state: dict[str, torch.Tensor] | None = None
    error: str | None = None


@dataclass(eq=False)
class RoundUploads:
    """The updates one round waits for, and what it does with each as it arrives.

    Args:
        number: the round.
        owed: the selected nodes, whose updates the round waits for.
        slots: how many updates may be received at once.
        buffers: the task's pool of update buffers, reused from round to round.
        event: says a line in the task's log.
    """

    number: int
    global_state: dict[str, torch.Tensor]
    owed: set[str]
    participants: dict[str, Participant]
    policy: RoundPolicy
    strategy: Strategy
    fold: Fold
    slots: int
    train_deadline: float
    calculation_timeout: float
    buffers: list[dict[str, torch.Tensor]]
    event: Callable[[str, int], None]
    state_bytes: int = field(init=False)
    upload_seconds: float = field(init=False)
    #: Nodes that trained and wait for room to upload.
    queued: collections.deque[str] = field(default_factory=collections.deque)
    uploads: dict[str, _Upload] = field(default_factory=dict)
    #: Uploads complete (or broken), to fold in or refuse, in arrival order.
    arrived: collections.deque[_Upload] = field(default_factory=collections.deque)
    #: Samples behind the updates folded in.
    samples: int = 0

    def __post_init__(self) -> None:
        self.state_bytes = sum(t.numel() * t.element_size() for t in self.global_state.values())
        self.upload_seconds = self.policy.upload_seconds(self.state_bytes)

    @property
    def count(self) -> int:
        """Updates folded in so far."""
        return self.fold.count

    @property
    def upload_now(self) -> bool:
        """Whether there is room for every update: nodes upload unasked, straight after training."""
        return self.slots >= len(self.owed)

    # What nodes say.

    def trained(self, participant: Participant) -> None:
        """A node of this round finished training: let it upload now, or queue it for room."""
        if participant.status != NodeStatus.TRAINING or participant.node not in self.owed:
            return  # late: the round gave up on it, and it may be picked again
        participant.status = NodeStatus.TRAINED
        participant.epoch = participant.epochs
        if self.upload_now:
            self._open(participant.node)
        else:
            self.queued.append(participant.node)

    def feed(self, node: str, frame: Frame) -> None:
        """A frame of ``node``'s update; anything nothing asked for is ignored."""
        upload = self.uploads.get(node)
        if (
            upload is None
            or upload.state is not None
            or upload.error is not None
            or frame.header.get("round") != self.number
        ):
            # The rest of a refused, late or unrequested update: nothing asked for it.
            log.debug("ignored state data %s from %r", frame, node)
            return
        try:
            if frame.kind == Kind.STATE:
                upload.reader.feed(frame)
                upload.received += frame.payload_size
            else:
                upload.state = upload.reader.finish(frame)
        except CodecError as exc:
            upload.error = str(exc)
        if upload.state is not None or upload.error is not None:
            self.arrived.append(upload)

    def leave(self, node: str, why: str) -> None:
        """``node`` is out of the round (it left, failed or came back anew)."""
        if node not in self.owed:
            return
        self.owed.discard(node)
        upload = self.uploads.pop(node, None)
        if upload is not None:
            self._release(upload)
        log.debug("round %d: %s %s", self.number, node, why)

    def progress(self, node: str) -> tuple[int, int]:
        """Bytes of ``node``'s update in so far, of how many (0, 0 when it is not uploading)."""
        upload = self.uploads.get(node)
        return (upload.received, self.state_bytes) if upload is not None else (0, 0)

    # Collecting.

    async def collect(
        self,
        changed: asyncio.Event,
        check: Callable[[], None],
        grant: Callable[[list[str]], Awaitable[None]],
    ) -> None:
        """Wait for every owed update, its deadlines, or its node's departure.

        Args:
            changed: set whenever a frame arrived.
            check: raises when the round cannot go on (the relay connection lost).
            grant: tells nodes there is room for their update now.
        """
        loop = asyncio.get_running_loop()
        next_progress = loop.time() + self.policy.progress_every
        try:
            while True:
                # Cleared first: whatever arrives while this pass awaits wakes the next one.
                changed.clear()
                check()
                while self.arrived:
                    await self._check_and_fold(self.arrived.popleft())
                granted = self._grant()
                if granted:
                    await grant(granted)
                now = loop.time()
                self._expire(now)
                if not self.owed and not self.arrived:
                    return
                if now >= next_progress:
                    self.event(f"round {self.number}: {self.waiting_for(now)}", logging.INFO)
                    next_progress = now + self.policy.progress_every
                wake = [next_progress, *(upload.deadline for upload in self.uploads.values())]
                if any(self.participants[n].status == NodeStatus.TRAINING for n in self.owed):
                    wake.append(self.train_deadline)
                try:
                    await asyncio.wait_for(changed.wait(), max(min(wake) - now, 0))
                except asyncio.TimeoutError:
                    pass
        finally:
            for upload in self.uploads.values():
                self._release(upload)

    def waiting_for(self, now: float) -> str:
        """Whom the round waits for, and how far each got."""
        parts = []
        for node in sorted(self.owed):
            participant, upload = self.participants[node], self.uploads.get(node)
            if upload is not None:
                share = upload.received / self.state_bytes if self.state_bytes else 1
                parts.append(
                    f"{node} (uploading: {share:.0%} of {size_text(self.state_bytes)}, "
                    f"{max(upload.deadline - now, 0):.0f} s left)"
                )
            elif participant.status == NodeStatus.TRAINING:
                parts.append(f"{node} (training, {max(self.train_deadline - now, 0):.0f} s left)")
            else:
                parts.append(f"{node} ({participant.status})")
        return "waiting for " + ", ".join(parts) if parts else "folding in the last updates"

    def _grant(self) -> list[str]:
        """Open uploads for queued nodes while the memory budget has room; whom to tell."""
        granted = []
        while self.queued and len(self.uploads) < self.slots:
            node = self.queued.popleft()
            if node in self.owed and self.participants[node].status == NodeStatus.TRAINED:
                self._open(node)
                granted.append(node)
        return granted

    def _open(self, node: str) -> None:
        # Kept updates need memory of their own; folded ones give their buffer back.
        keeps = self.strategy.keeps_updates
        buffer = {} if keeps or not self.buffers else self.buffers.pop()
        deadline = asyncio.get_running_loop().time() + self.upload_seconds
        reader = StateReader(self.global_state, out=buffer)
        self.uploads[node] = _Upload(node, reader, deadline, buffer)
        self.participants[node].status = NodeStatus.UPLOADING

    def _expire(self, now: float) -> None:
        """Leave out the nodes past a deadline; they sit out the next round(s)."""
        for node in list(self.owed):
            participant = self.participants[node]
            upload = self.uploads.get(node)
            if participant.status == NodeStatus.TRAINING and now >= self.train_deadline:
                self._strike(
                    participant,
                    f"did not finish training within "
                    f"{self.calculation_timeout:g} s (calculation_timeout)",
                )
            elif upload is not None and upload.state is None and now >= upload.deadline:
                del self.uploads[node]
                self._release(upload)
                self._strike(
                    participant,
                    f"sent {size_text(upload.received)} of its "
                    f"{size_text(self.state_bytes)} update within "
                    f"{self.upload_seconds:g} s (upload_timeout)",
                )

    def _strike(self, participant: Participant, why: str) -> None:
        self.owed.discard(participant.node)
        self.event(strike(participant, self.number, why), logging.WARNING)

    async def _check_and_fold(self, upload: _Upload) -> None:
        """Check a complete update and fold it in, or refuse it and say why."""
        participant = self.participants[upload.node]
        self.uploads.pop(upload.node, None)
        self.owed.discard(upload.node)
        try:
            if upload.error is None:
                weight = self.strategy.weight(participant.samples)
                if weight <= 0:
                    upload.error = "it reported no training samples, so it has no weight"
                else:
                    upload.error = await asyncio.to_thread(self._add, upload, weight)
        finally:
            self._release(upload)
        if upload.error is not None:
            participant.status, participant.detail = NodeStatus.REFUSED, upload.error
            self.event(str(UpdateRejected(upload.node, self.number, upload.error)), logging.WARNING)
            return
        participant.status, participant.strikes = NodeStatus.UPLOADED, 0
        participant.rounds += 1
        self.samples += participant.samples

    def _add(self, upload: _Upload, weight: float) -> str | None:
        """Fold one update in (on a worker thread); why it was refused, or None."""
        state = upload.state
        assert state is not None, "only complete updates are folded in"
        bad = non_finite(state)
        if bad:
            return f"non-finite values (NaN or infinity) in {', '.join(bad)}"
        self.fold.add(state, weight)
        return None

    def _release(self, upload: _Upload) -> None:
        """Give an upload's buffer back, for the next upload to fill."""
        if not self.strategy.keeps_updates and upload.buffer is not None:
            self.buffers.append(upload.buffer)
            upload.buffer = None


def strike(participant: Participant, number: int, why: str) -> str:
    """Mark a node that missed a deadline of round ``number``: it sits out the next round(s),
    twice as many for each deadline missed in a row. What the task's log says of it."""
    participant.strikes += 1
    rounds = sit_out_rounds(participant.strikes)
    participant.sits_out_until = number + rounds
    participant.status, participant.detail = NodeStatus.TIMED_OUT, why
    sits = f"round {number + 1}" if rounds == 1 else f"rounds {number + 1}-{number + rounds}"
    return f"round {number}: {participant.node} {why}; it sits out {sits}"
