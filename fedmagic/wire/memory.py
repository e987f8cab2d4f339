"""The relay's routing between coroutines of one process: a transport without sockets.

``MemoryRelay`` does what :mod:`fedmagic.wire.relay` does for a task (welcomes,
join tokens, allowed nodes, sessions, ``to`` and ``from``, a peer joining or
leaving, a task closing, a restart) over queues, so the round loop and the
participant runtime run unchanged, in milliseconds, without processes or
ports. Every frame is serialized and parsed on its way, as on the wire, so
what the engine sends is checked the same way; the relay's own limits (rates,
queues, connections) are the websocket relay's business and are not here.
"""

from __future__ import annotations

import asyncio
import secrets
import time
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any, Sequence

from ..errors import ConnectionLost, RelayRefused
from .frames import INITIATOR, PROTOCOL_VERSION, Frame, Kind
from .messages import Refusal
from .transport import Transport

if TYPE_CHECKING:
    pass

__all__ = ["MemoryLink", "MemoryRelay"]

#: How often a join waiting for its task looks again.
POLL = 0.005


@dataclass(eq=False)
class _Task:
    task_id: str
    join_token: str
    initiator: MemoryLink
    allowed_nodes: frozenset[str] | None
    participants: dict[str, MemoryLink] = field(default_factory=dict)


class MemoryRelay:
    """A relay in this process; parties open links to it as they would to a real one."""

    url = "memory://relay"

    def __init__(self) -> None:
        self._tasks: dict[str, _Task] = {}

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
        accepted: str | None = None,
    ) -> MemoryLink:
        """Say hello, as :meth:`fedmagic.wire.link.Link.open` does.

        Raises:
            RelayRefused: with the relay's code and message for the same refusal.
        """
        hello: dict[str, Any] = {
            "role": role,
            "task": task,
            "token": token,
            "node": node,
            "session": session,
            "allowed_nodes": allowed_nodes,
            "accepted": accepted,
        }
        if role == "initiator":
            return self._open_initiator(hello)
        deadline = time.monotonic() + wait
        while task not in self._tasks:
            if time.monotonic() >= deadline:
                raise RelayRefused(
                    Refusal.UNKNOWN_TASK,
                    f"no task {task!r} on this relay; check the "
                    "task id, or wait for the initiator to launch it",
                    self.url,
                )
            await asyncio.sleep(POLL)
        return self._open_participant(hello)

    def restart(self) -> None:
        """Drop every connection and forget every task, as a relay that restarts does."""
        tasks, self._tasks = self._tasks, {}
        for task in tasks.values():
            task.initiator._end("the relay restarted")
            for participant in task.participants.values():
                participant._end("the relay restarted")

    def _open_initiator(self, hello: dict[str, Any]) -> MemoryLink:
        task_id = hello["task"]
        if task_id in self._tasks:
            raise RelayRefused(
                Refusal.TASK_EXISTS,
                f"task {task_id!r} is already running on this "
                "relay; stop it first or pick another task id",
                self.url,
            )
        allowed = hello["allowed_nodes"]
        link = MemoryLink(
            self, hello, Frame({"t": Kind.WELCOME, "task": task_id, "protocol": PROTOCOL_VERSION})
        )
        self._tasks[task_id] = _Task(
            task_id, hello["token"], link, None if allowed is None else frozenset(allowed)
        )
        return link

    def _open_participant(self, hello: dict[str, Any]) -> MemoryLink:
        task_id, node = hello["task"], hello["node"]
        task = self._tasks[task_id]
        if hello["token"] != task.join_token:
            raise RelayRefused(
                Refusal.JOIN_TOKEN,
                f"wrong join token for task {task_id!r}; copy the "
                "join line the task's author shared",
                self.url,
            )
        if task.allowed_nodes is not None and node not in task.allowed_nodes:
            raise RelayRefused(
                Refusal.NODE_NOT_ALLOWED,
                f"task {task_id!r} admits only the nodes "
                f"its author named, and {node!r} is not one of them",
                self.url,
            )
        stale = task.participants.get(node)
        if stale is not None and hello["session"] != stale.session:
            raise RelayRefused(
                Refusal.NODE_TAKEN,
                f"the name {node!r} is in use by a connected node "
                f"of task {task_id!r}; pick another --node name",
                self.url,
            )
        session = hello["session"] or secrets.token_hex(16)
        link = MemoryLink(
            self,
            hello,
            Frame(
                {
                    "t": Kind.WELCOME,
                    "task": task_id,
                    "node": node,
                    "session": session,
                    "protocol": PROTOCOL_VERSION,
                }
            ),
        )
        if stale is not None:
            self._leave(task, stale, "replaced by a reconnect of the same node")
        task.participants[node] = link
        joined = {"t": Kind.PEER_JOINED, "from": node}
        if hello["accepted"] is not None:
            joined["accepted"] = hello["accepted"]
        task.initiator._inbox.put_nowait(Frame(joined))
        return link

    def _route(self, sender: MemoryLink, frame: Frame) -> None:
        task = self._tasks.get(sender._hello["task"])
        if task is None or not sender._open:
            raise ConnectionLost(self.url, "the connection is closed")
        header = {key: value for key, value in frame.header.items() if key != "to"}
        if sender is task.initiator:
            to = frame.header.get("to")
            targets = (
                list(task.participants.values())
                if to == "*"
                else [task.participants[node] for node in to or () if node in task.participants]
            )
            header["from"] = INITIATOR
        else:
            to = frame.header.get("to")
            targets = [
                task.initiator if node == INITIATOR else task.participants[node]
                for node in (to if isinstance(to, list) else [INITIATOR])
                if node == INITIATOR or node in task.participants
            ]
            header["from"] = sender._hello["node"]
        copied = Frame.parse(Frame(header, frame.payload).serialize())  # as the wire would
        for target in targets:
            target._inbox.put_nowait(copied)

    def _close(self, link: MemoryLink) -> None:
        task = self._tasks.get(link._hello["task"])
        if task is not None and link is task.initiator:
            del self._tasks[task.task_id]
            closed = Frame({"t": Kind.TASK_CLOSED, "task": task.task_id})
            for participant in task.participants.values():
                participant._inbox.put_nowait(closed)
                participant._end("task closed")
        elif task is not None and task.participants.get(link._hello["node"]) is link:
            self._leave(task, link, "closed")
        link._end("closed")

    def _leave(self, task: _Task, link: MemoryLink, why: str) -> None:
        del task.participants[link._hello["node"]]
        task.initiator._inbox.put_nowait(Frame({"t": Kind.PEER_LEFT, "from": link._hello["node"]}))
        link._end(why)


class MemoryLink(Transport):
    """One party's connection to a :class:`MemoryRelay`."""

    def __init__(self, relay: MemoryRelay, hello: dict[str, Any], welcome: Frame) -> None:
        self.url = relay.url
        self.welcome = welcome
        self._relay = relay
        self._hello = hello
        self._inbox: asyncio.Queue[Frame | str] = asyncio.Queue()
        self._open = True

    async def send(self, frame: Frame) -> None:
        self._relay._route(self, frame)

    async def recv(self) -> Frame:
        item = await self._inbox.get()
        if isinstance(item, str):
            self._inbox.put_nowait(item)  # closed it stays
            raise ConnectionLost(self.url, item)
        return item

    async def close(self) -> None:
        if self._open:
            self._relay._close(self)

    async def _hello_again(self, hello: dict[str, Any], wait: float) -> MemoryLink:
        return await self._relay.open(wait=wait, **hello)

    def _end(self, why: str) -> None:
        if self._open:
            self._open = False
            self._inbox.put_nowait(why)
