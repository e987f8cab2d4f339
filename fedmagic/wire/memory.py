"""The relay's routing between coroutines of one process: a transport without sockets.

``MemoryRelay`` drives the same :class:`~fedmagic.wire.routing.Router` as the
websocket relay (hellos, welcomes, join tokens, allowed nodes, sessions,
``to`` and ``from``, a peer joining or leaving, a task closing) over queues,
so the round loop and the participant runtime run unchanged, in
milliseconds, without processes or ports; ``restart`` drops everything as a
relay that restarts does. Every frame is serialized and parsed on its way,
as on the wire. The limits of connections (rates, queues, descriptors) are
the websocket relay's business and are not here.
"""

from __future__ import annotations

import asyncio
import time
from typing import Any, Sequence

from ..errors import CodecError, ConnectionLost, RelayRefused
from .frames import INITIATOR, Frame, Kind
from .routing import DEFAULT_LIMITS, Refused, RelayLimits, Router, Send, Task, hello_header
from .transport import Transport

__all__ = ["MemoryLink", "MemoryRelay"]

#: How often a join waiting for its task looks again.
POLL = 0.005


class MemoryRelay:
    """A relay in this process; parties open links to it as they would to a real one.

    Args:
        limits: those of tasks and joins (participants per task, say) apply here too.
    """

    url = "memory://relay"

    def __init__(self, limits: RelayLimits = DEFAULT_LIMITS) -> None:
        self.limits = limits
        self.router: Router[MemoryLink] = Router(limits=limits)

    async def open(
        self,
        *,
        role: str,
        task: str,
        token: str,
        node: str | None = None,
        wait: float = 0.0,
        session: str | None = None,
        allowed_nodes: Sequence[str] | None = None,
    ) -> MemoryLink:
        """Say hello, as :meth:`fedmagic.wire.link.Link.open` does.

        Raises:
            RelayRefused: with the relay's code and message for the same refusal.
        """
        said = hello_header(
            role=role,
            task=task,
            token=token,
            node=node,
            session=session,
            allowed_nodes=allowed_nodes,
        )
        return await self._connect(said, wait)

    def restart(self) -> None:
        """Drop every connection and forget every task, as a relay that restarts does."""
        tasks = list(self.router.tasks.values())
        self.router = Router(limits=self.limits)
        for task in tasks:
            task.initiator._end("the relay restarted")
            for participant in task.participants.values():
                participant._end("the relay restarted")

    async def _connect(self, said: dict[str, Any], wait: float) -> MemoryLink:
        try:
            header = self.router.read_hello(Frame(said).serialize())
            if header["role"] == "initiator":
                return await self._open_task(said, header)
            return await self._join(said, header, time.monotonic() + wait)
        except Refused as refusal:
            raise RelayRefused(refusal.code, refusal.message, self.url) from None

    async def _open_task(self, said: dict[str, Any], header: dict[str, Any]) -> MemoryLink:
        self.router.admit_initiator(header)
        link = MemoryLink(self, said, INITIATOR)
        task, welcome = self.router.open_task(header, link)
        return await link._welcomed(task, welcome)

    async def _join(
        self, said: dict[str, Any], header: dict[str, Any], deadline: float
    ) -> MemoryLink:
        task_id = header["task"]
        while (task := self.router.tasks.get(task_id)) is None:
            if time.monotonic() >= deadline:
                raise self.router.unknown_task(task_id)
            await asyncio.sleep(POLL)
        session = self.router.admit_participant(task, header)
        link = MemoryLink(self, said, header["node"])
        stale, sends = self.router.join(task, link, session, header)
        if stale is not None:
            stale._end("replaced by a reconnect of the same node")
        return await link._welcomed(task, sends)

    def _route(self, sender: MemoryLink, frame: Frame) -> None:
        task = sender._task
        if task is None or not sender._open:
            raise ConnectionLost(self.url, "the connection is closed")
        try:
            copied, targets = self.router.route(task, sender, frame.serialize())
        except (Refused, CodecError) as exc:  # refused as the relay refuses: said, then closed
            code = exc.code if isinstance(exc, Refused) else "malformed"
            message = exc.message if isinstance(exc, Refused) else str(exc)
            sender._inbox.put_nowait(Frame({"t": Kind.ERROR, "code": code, "message": message}))
            self._close(sender)
            return
        for target in targets:
            target._inbox.put_nowait(copied)

    def _close(self, link: MemoryLink) -> None:
        task = link._task
        if task is not None and link is task.initiator:
            for participant, closed in self.router.close_task(task):
                participant._inbox.put_nowait(closed)
                participant._end("task closed")
        elif task is not None:
            _deliver(self.router.leave(task, link))
        link._end("closed")


class MemoryLink(Transport):
    """One party's connection to a :class:`MemoryRelay`."""

    def __init__(self, relay: MemoryRelay, hello: dict[str, Any], name: str) -> None:
        self.url = relay.url
        self.name = name
        self.welcome = Frame({"t": Kind.HELLO})
        self._relay = relay
        self._hello = hello
        self._task: Task[MemoryLink] | None = None
        self._inbox: asyncio.Queue[Frame | str] = asyncio.Queue()
        self._open = True

    async def send(self, frame: Frame) -> None:
        self._relay._route(self, frame)

    async def recv(self) -> Frame:
        item = await self._inbox.get()
        if isinstance(item, str):
            self._inbox.put_nowait(item)  # closed it stays
            raise ConnectionLost(self.url, item)
        if item.kind == Kind.ERROR:
            header = item.header
            raise RelayRefused(str(header.get("code")), str(header.get("message")), self.url)
        return item

    async def close(self) -> None:
        if self._open:
            self._relay._close(self)

    async def _hello_again(self, hello: dict[str, Any], wait: float) -> MemoryLink:
        return await self._relay._connect(hello, wait)

    async def _welcomed(self, task: Task[MemoryLink], sends: list[Send[MemoryLink]]) -> MemoryLink:
        """Deliver the router's frames for this opening, then read the welcome, as a Link does."""
        self._task = task
        _deliver(sends)
        self.welcome = await self.recv()
        return self

    def _end(self, why: str) -> None:
        if self._open:
            self._open = False
            self._inbox.put_nowait(why)


def _deliver(sends: list[Send[MemoryLink]]) -> None:
    for link, frame in sends:
        link._inbox.put_nowait(frame)
