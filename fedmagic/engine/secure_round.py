"""A round under secure aggregation, over the relay: the initiator's side and a participant's.

The strategy plans the round (:class:`~fedmagic.strategies.secure.SecureRoundPlan`)
and SecAgg+'s sans-I/O classes say what each message holds; this module
moves those messages as ``secure`` frames under the round's deadlines::

    initiator (SecureRound)                       participant (SecureParty)
    setup: nodes, nonce, scale      ->
                                    <-            advertise: public keys
    keys: neighbours' public keys   ->            (training meanwhile)
                                    <-            share: sealed shares
    shares: shares sealed for it    ->
                                    <-            its masked update, as a state, once trained
    unmask: who survived            ->
                                    <-            reveal: shares of the masks to take off

Setting up the keys overlaps training, so a round costs about two round
trips more than in the clear. A node that leaves, fails or misses a stage's
deadline is out of the round from there: before its upload, its masks are
taken off with its mask key, rebuilt from shares; after, its update is in
the sum. A node that sends what the stage does not allow is refused, and
the round goes on without it. Fewer than ``t`` left fails the round, naming
``t`` and who dropped.
"""

from __future__ import annotations

import asyncio
import contextlib
import functools
import logging
import math
import secrets
from dataclasses import dataclass, field
from typing import Any, Awaitable, Callable, Mapping

import numpy as np
import torch

from ..errors import (
    CodecError,
    ConfigurationError,
    ConnectionLost,
    ProtocolError,
    SecureAggregationError,
    UnsupportedTensor,
)
from ..strategies.secagg import SecAggClient
from ..strategies.secure import RoundSettings, SecureRoundPlan, round_settings
from ..wire.codec import Frame, Kind, StateReader
from ..wire.messages import Secure
from .policy import RoundPolicy
from .roster import Participant
from .state import NodeStatus, size_text
from .uploads import strike

__all__ = ["SecureParty", "SecureRound", "masked_update"]

log = logging.getLogger("fedmagic")

#: What the initiator waits for from participants at each stage, and what it calls it.
_STAGES = {
    "advertise": "public keys",
    "share": "sealed shares",
    "masked": "masked update",
    "reveal": "shares to unmask the sum",
}


@dataclass(eq=False)
class SecureRound:
    """The initiator's side of a secure round: each stage's messages in, the server's out.

    Args:
        owed: the round's nodes still in it.
        stage_seconds: how long a stage waits for each node's message, beyond training.
    """

    number: int
    plan: SecureRoundPlan
    owed: set[str]
    participants: dict[str, Participant]
    policy: RoundPolicy
    train_deadline: float
    calculation_timeout: float
    event: Callable[[str, int], None]
    stage_seconds: float
    #: Samples behind the updates in the sum.
    samples: int = 0
    #: What the sum stands for, once revealed (the wrapped strategy's fold's result).
    combined: dict[str, torch.Tensor] | None = None
    _stage: str = "advertise"
    _deadline: float = 0.0
    _received: dict[str, Any] = field(default_factory=dict)
    _readers: dict[str, StateReader] = field(default_factory=dict)
    _bytes_in: dict[str, int] = field(default_factory=dict)
    _revealed_nodes: tuple[str, ...] = ()

    @property
    def count(self) -> int:
        """Updates in the revealed sum (0 before it is)."""
        return len(self._revealed_nodes)

    @functools.cached_property
    def masked_bytes(self) -> int:
        template = self.plan.masked_template()["masked"]
        return template.numel() * template.element_size()

    # What nodes say.

    def trained(self, participant: Participant) -> None:
        if participant.status == NodeStatus.TRAINING and participant.node in self.owed:
            participant.status = NodeStatus.TRAINED
            participant.epoch = participant.epochs

    def secure(self, node: str, message: Secure) -> None:
        """A stage message from ``node``: kept for the stage, or the node is refused."""
        if message.round != self.number or node not in self.owed:
            log.debug(
                "ignored a secure %s from %r: not of round %d", message.stage, node, self.number
            )
            return
        if message.stage == "abort":
            reason = message.body.get("reason")
            self._refuse(node, f"gave up on the secure round: {reason}")
        elif message.stage != self._stage or self._stage == "masked":
            self._refuse(
                node,
                f"sent its secure {message.stage!r} while the round waits for "
                f"{_STAGES[self._stage]}",
            )
        elif node not in self._received:
            self._received[node] = message.body

    def feed(self, node: str, frame: Frame) -> None:
        """A frame of ``node``'s masked update."""
        if (
            node not in self.owed
            or frame.header.get("round") != self.number
            or (self._stage != "masked" or node in self._received)
        ):
            log.debug("ignored state data %s from %r", frame, node)
            return
        reader = self._readers.get(node)
        if reader is None:
            reader = self._readers[node] = StateReader(self.plan.masked_template())
            self.participants[node].status = NodeStatus.UPLOADING
        try:
            if frame.kind == Kind.STATE:
                reader.feed(frame)
                self._bytes_in[node] = self._bytes_in.get(node, 0) + frame.payload_size
            else:
                masked = reader.finish(frame)["masked"]
                del self._readers[node]
                # Into the server's running sum now: the round holds one vector, not n
                self.plan.server.receive_masked(node, {"masked": masked.numpy()})
                self._received[node] = {}
                self.participants[node].status = NodeStatus.UPLOADED
        except ProtocolError as refused:
            self._refuse(node, refused.what)
        except CodecError as exc:
            self._refuse(
                node,
                f"its masked update is not {self.plan.masked_template()['masked'].numel()} "
                f"words of {self.plan.settings.parameters.modulus_bits} bits: {exc}",
            )

    def leave(self, node: str, why: str) -> None:
        """``node`` is out of the round (it left, failed or came back anew); what it sent
        for the stage under way still counts, as SecAgg+ expects of a node that drops."""
        if node in self.owed:
            self.owed.discard(node)
            self._readers.pop(node, None)
            log.debug("round %d: %s %s", self.number, node, why)

    def progress(self, node: str) -> tuple[int, int]:
        if node in self._readers:
            return self._bytes_in.get(node, 0), self.masked_bytes
        return 0, 0

    # The stages.

    async def open(self, send: Callable[[Frame], Awaitable[None]]) -> None:
        """Tell each node the round is secure, before the round itself: a participant then
        has its side of the round set up before it could be asked for its update."""
        for node in sorted(self.owed):
            await send(Secure(self.number, "setup", self.plan.setup(node)).to_frame(to=[node]))

    async def collect(
        self,
        changed: asyncio.Event,
        check: Callable[[], None],
        send: Callable[[Frame], Awaitable[None]],
    ) -> None:
        """Run the round's stages to its revealed sum, or fail it.

        Raises:
            SecureAggregationError: if fewer than ``t`` nodes are left at a stage, naming
                ``t`` and who dropped.
        """
        server, plan = self.plan.server, self.plan
        loop = asyncio.get_running_loop()
        await self._gather("advertise", loop.time() + self.stage_seconds, changed, check)
        await self._answer("keys", await self._apply(server.route_keys), send)
        await self._gather("share", loop.time() + self.stage_seconds, changed, check)
        await self._answer("shares", await self._apply(server.route_shares), send)
        upload = self.policy.upload_seconds(self.masked_bytes)
        await self._gather("masked", max(self.train_deadline, loop.time()) + upload, changed, check)
        await self._answer("unmask", await self._apply(lambda _: server.request_unmasking()), send)
        await self._gather("reveal", loop.time() + self.stage_seconds, changed, check)
        revealed = await self._apply(server.finish)
        self.combined = plan.combined(revealed)
        self._revealed_nodes = revealed.nodes
        if server.dropped:
            self.event(
                f"round {self.number}: the secure sum of {len(revealed.nodes)} updates was "
                f"revealed without "
                + "; ".join(f"{node}, which left {when}" for node, when in server.dropped.items()),
                logging.INFO,
            )
        for node in revealed.nodes:
            participant = self.participants[node]
            if participant.status == NodeStatus.UPLOADED:
                participant.strikes = 0
            participant.rounds += 1
            self.samples += participant.samples

    async def _gather(
        self, stage: str, deadline: float, changed: asyncio.Event, check: Callable[[], None]
    ) -> None:
        """Wait until every node still in the round sent ``stage``'s message, or ``deadline``;
        the nodes that did not are out, and sit out the next round(s)."""
        self._stage, self._deadline, self._received = stage, deadline, {}
        loop = asyncio.get_running_loop()
        waits = deadline - loop.time()
        next_progress = loop.time() + self.policy.progress_every
        while True:
            changed.clear()
            check()
            now = loop.time()
            if stage == "masked" and now >= self.train_deadline:
                for node in sorted(self.owed):
                    if self.participants[node].status == NodeStatus.TRAINING:
                        self._strike(
                            node,
                            f"did not finish training within "
                            f"{self.calculation_timeout:g} s (calculation_timeout)",
                        )
            if self.owed <= set(self._received):
                return
            if now >= deadline:
                for node in sorted(self.owed - set(self._received)):
                    self._strike(
                        node,
                        f"did not send its {_STAGES[stage]} for the secure "
                        f"round within {waits:.0f} s",
                    )
                return
            if now >= next_progress:
                self.event(f"round {self.number}: {self.waiting_for(now)}", logging.INFO)
                next_progress = now + self.policy.progress_every
            wake = [deadline, next_progress]
            if stage == "masked" and now < self.train_deadline:
                wake.append(self.train_deadline)
            try:
                await asyncio.wait_for(changed.wait(), max(min(wake) - now, 0))
            except asyncio.TimeoutError:
                pass

    async def _apply(self, step: Callable[[Mapping[str, Any]], Any]) -> Any:
        """Hand the stage's messages to the server (on a worker thread: unmasking expands a
        vector per node); a node whose message it refuses is out, and the rest are handed
        over again without it."""
        while True:
            messages = dict(self._received)
            try:
                return await asyncio.to_thread(step, messages)
            except ProtocolError as refused:
                if refused.peer not in messages:
                    raise
                self._refuse(refused.peer, refused.what)

    async def _answer(
        self, stage: str, outgoing: Mapping[str, Any], send: Callable[[Frame], Awaitable[None]]
    ) -> None:
        for node, body in sorted(outgoing.items()):
            if node in self.owed:
                await send(Secure(self.number, stage, body).to_frame(to=[node]))

    def waiting_for(self, now: float) -> str:
        missing = sorted(self.owed - set(self._received))
        parts = []
        for node in missing:
            participant = self.participants[node]
            if node in self._readers:
                parts.append(
                    f"{node} (uploading: {size_text(self._bytes_in.get(node, 0))} of "
                    f"{size_text(self.masked_bytes)})"
                )
            elif participant.status == NodeStatus.TRAINING:
                parts.append(f"{node} (training, {max(self.train_deadline - now, 0):.0f} s left)")
            else:
                parts.append(node)
        left = max(self._deadline - now, 0)
        return (
            f"secure aggregation waits for the {_STAGES[self._stage]} of "
            f"{', '.join(parts)} ({left:.0f} s left)"
        )

    def _refuse(self, node: str, why: str) -> None:
        participant = self.participants[node]
        participant.status, participant.detail = NodeStatus.REFUSED, why
        self._received.pop(node, None)
        self.leave(node, "refused")
        self.event(f"round {self.number}: {node} refused: {why}", logging.WARNING)

    def _strike(self, node: str, why: str) -> None:
        self.leave(node, why)
        self.event(strike(self.participants[node], self.number, why), logging.WARNING)


def masked_update(
    trained: Mapping[str, torch.Tensor],
    start: Mapping[str, torch.Tensor],
    settings: RoundSettings,
    scale: float,
) -> dict[str, torch.Tensor]:
    """What a participant masks: its floating tensors minus the round's global ones, times
    ``scale``; under distributed DP, clipped to L2 norm ``C`` with its share of the noise."""
    update = {
        name: tensor.detach().cpu().to(torch.float64) - start[name].detach().cpu().double()
        for name, tensor in trained.items()
        if tensor.is_floating_point()
    }
    if settings.l2_clip is None:
        return {name: tensor.mul_(scale) for name, tensor in update.items()}
    norm = math.sqrt(sum(float(tensor.pow(2).sum()) for tensor in update.values()))
    factor = min(1.0, settings.l2_clip / norm) if norm > 0 else 1.0
    noise = torch.Generator().manual_seed(secrets.randbits(63))
    for tensor in update.values():
        tensor.mul_(factor)
        tensor.add_(
            torch.randn(tensor.shape, generator=noise, dtype=tensor.dtype), alpha=settings.noise_sd
        )
    return update


class SecureParty:
    """A participant's side of one secure round: the initiator's stage messages in order,
    its answers out, and its update masked once it is trained and the shares are in.

    Args:
        node: this participant.
        described: the task's strategy as the data owner consented to it, from
            which the round's parameters are derived (not taken from the initiator).
        setup: the round's ``setup`` message.
        send: sends a frame to the initiator.
    """

    def __init__(
        self,
        node: str,
        described: Mapping[str, Any],
        setup: Secure,
        send: Callable[[Frame], Awaitable[None]],
    ) -> None:
        self.round = setup.round
        self._send = send
        body = setup.body
        nodes, nonce, scale = body.get("nodes"), body.get("nonce"), body.get("scale")
        if not (isinstance(nodes, list) and all(isinstance(n, str) for n in nodes)):
            raise ProtocolError("initiator", "a secure setup's 'nodes' must be a list of names")
        if not (isinstance(scale, (int, float)) and not isinstance(scale, bool) and 0 < scale <= 1):
            raise ProtocolError(
                "initiator",
                f"a secure setup's 'scale' must be above 0 and at most 1, not {scale!r}",
            )
        if not isinstance(nonce, bytes):
            raise ProtocolError("initiator", "a secure setup's 'nonce' must be bytes")
        try:
            self.settings = round_settings(described, len(nodes))
        except ConfigurationError as refused:
            raise SecureAggregationError(
                node, f"a round of {len(nodes)} nodes: {refused}"
            ) from None
        self.scale = float(scale)
        self.client = SecAggClient(node, nodes, self.settings.parameters, nonce)
        #: The shares sealed for this node, once they come; None if the round went on without it.
        self._shares: asyncio.Future[Mapping[str, bytes] | None] = (
            asyncio.get_running_loop().create_future()
        )
        self._inbox: asyncio.Queue[Secure] = asyncio.Queue()
        self._task = asyncio.create_task(self._run())

    def receive(self, message: Secure) -> None:
        """A stage message of this round from the initiator."""
        self._inbox.put_nowait(message)

    def abandon(self, why: str) -> None:
        """The round moved on (a new round, the task's end, a lost link): stop waiting."""
        self._task.cancel()
        if not self._shares.done():
            self._shares.set_result(None)
        log.debug("round %d: the secure round went on without this node: %s", self.round, why)

    async def masked(
        self, trained: Mapping[str, torch.Tensor], start: Mapping[str, torch.Tensor]
    ) -> dict[str, torch.Tensor] | None:
        """This node's masked update to upload, once its shares are in; None when the round
        was abandoned or this node gave up on it (it said why)."""
        shares = await self._shares
        if shares is None:
            return None
        try:
            words = await asyncio.to_thread(self._mask, trained, start, shares)
        except (ProtocolError, SecureAggregationError, UnsupportedTensor) as failure:
            await self._abort(failure)  # a diverged (NaN) update is refused here, as in the clear
            return None
        return {"masked": torch.from_numpy(words)}

    def _mask(self, trained: Any, start: Any, shares: Mapping[str, bytes]) -> np.ndarray:
        update = masked_update(trained, start, self.settings, self.scale)
        masked = self.client.mask(update, shares)["masked"]
        return np.frombuffer(masked, dtype=self.settings.parameters.word).copy()

    async def _run(self) -> None:
        try:
            await self._say("advertise", self.client.advertise())
            while True:
                message = await self._inbox.get()
                if message.stage == "keys":
                    keys = message.body.get("neighbour_keys")
                    await self._say(
                        "share", self.client.share(keys if isinstance(keys, Mapping) else {})
                    )
                elif message.stage == "shares" and not self._shares.done():
                    shares = message.body.get("shares")
                    self._shares.set_result(shares if isinstance(shares, Mapping) else {})
                elif message.stage == "unmask":
                    survivors = message.body.get("survivors")
                    dropped = message.body.get("dropped")
                    await self._say(
                        "reveal",
                        self.client.unmask(
                            survivors if isinstance(survivors, list) else [],
                            dropped if isinstance(dropped, list) else [],
                        ),
                    )
                    return
                else:
                    raise ProtocolError("initiator", f"sent a secure {message.stage!r} out of turn")
        except (ProtocolError, SecureAggregationError) as failure:
            if not self._shares.done():
                self._shares.set_result(None)
            await self._abort(failure)

    async def _say(self, stage: str, body: dict[str, Any]) -> None:
        with contextlib.suppress(ConnectionLost):  # the runtime's next read finds out
            await self._send(Secure(self.round, stage, body).to_frame())

    async def _abort(self, failure: Exception) -> None:
        log.warning("round %d: gave up on the secure round: %s", self.round, failure)
        await self._say("abort", {"reason": str(failure)})
