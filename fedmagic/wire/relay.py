"""The websocket relay: one initiator and its participants per task.

Every party dials out to the relay, so nobody needs an open port but the
relay's operator. The relay authenticates each connection (a relay token for
initiators, the task's join token for participants), stamps the sender on
every frame it forwards so nobody can speak for another, fans one upload
from the initiator out to many participants, and keeps tasks apart. It
reads only headers; payloads pass through untouched, and it never imports
torch.

It is meant to face the open internet, so every resource a stranger can make
it hold is bounded (``RelayLimits``): connections (from the open-file limit),
joins waiting for a task that has not started (per address and overall, well
below the connection cap, so a flood of them leaves room for real tasks),
bytes and frames per second per connection (a fast sender is read slower),
and bytes queued for each connection (one that does not keep up is dropped
as too slow instead of holding up the others).

Who may join and who hears what is the :class:`~fedmagic.wire.routing.Router`'s
to decide, the same one the in-memory relay drives; ``Relay.handle`` serves
connections to it within those limits, ``serve_relay`` runs it, and
``EmbeddedRelay`` runs it on a thread of its own inside another program.
"""

from __future__ import annotations

import asyncio
import collections
import logging
import secrets
import ssl as ssl_module
import time
from dataclasses import dataclass, field
from typing import Any, AsyncIterator, cast

from websockets.asyncio.server import Server, ServerConnection, serve
from websockets.exceptions import ConnectionClosed
from websockets.exceptions import ProtocolError as WebSocketProtocolError

from ..background import BackgroundLoop
from ..errors import CodecError
from .frames import INITIATOR, Frame, Kind
from .messages import Refusal
from .routing import DEFAULT_LIMITS, Refused, RelayLimits, Router, Send, Task

try:
    import resource
except ImportError:  # Windows: no open-file limit to read or raise
    resource = None  # type: ignore[assignment]

__all__ = [
    "DEFAULT_PORT",
    "EmbeddedRelay",
    "Relay",
    "RelayLimits",
    "connection_cap",
    "new_token",
    "raise_open_file_limit",
    "serve_relay",
]

DEFAULT_PORT = 8765


def new_token() -> str:
    """A fresh join token: hex, so a command line never reads it as an option ("-x...")."""
    return secrets.token_hex(16)


GOING_AWAY = 1001
POLICY_VIOLATION = 1008
NORMAL_CLOSURE = 1000
MAX_CLOSE_REASON_BYTES = 120
#: Open files a relay keeps for itself and for refusing connections over its cap.
FD_RESERVE = 64
#: What "no limit" on open files stands for.
MAX_OPEN_FILES = 1 << 20
#: Frames whose payload is at least this big go out as two fragments, the new
#: header and a view of the payload as received, instead of being copied together.
FRAGMENT_BYTES = 64 << 10
#: Seconds between log lines about refusals that come in floods (a full relay's).
FLOOD_LOG_PERIOD = 10.0

log = logging.getLogger("fedmagic.relay")


#: How many connections may wait to be accepted (the kernel caps it at net.core.somaxconn).
LISTEN_BACKLOG = 4096


def connection_cap(open_files: int | None = None) -> int:
    """How many connections a relay serves with ``open_files`` descriptors.

    One descriptor per connection; the rest (at least ``FD_RESERVE``, an
    eighth of a large limit) keep the process working and let it answer
    "busy" to connections over the cap instead of failing to accept them.

    Args:
        open_files: default: this process's soft limit on open files.
    """
    if open_files is None:
        open_files = _open_file_limit()
    return max(open_files - max(FD_RESERVE, open_files // 8), 16)


def raise_open_file_limit() -> tuple[int, int] | None:
    """Raise this process's soft limit on open files to its hard limit, where allowed.

    The usual soft limit (1024) would cap a relay at a few hundred
    connections; only a process that uses no ``select()`` should do this.

    Returns:
        the soft limit before and after, or None where there is no such limit.
    """
    if resource is None:
        return None
    soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    target = MAX_OPEN_FILES if hard == resource.RLIM_INFINITY else hard
    if soft != resource.RLIM_INFINITY and soft < target:
        for attempt in (target, min(target, 10240)):  # macOS caps it below "unlimited"
            try:
                resource.setrlimit(resource.RLIMIT_NOFILE, (attempt, hard))
                break
            except (ValueError, OSError):
                continue
    return _limit(soft), _open_file_limit()


def _open_file_limit() -> int:
    if resource is None:
        return 1024
    return _limit(resource.getrlimit(resource.RLIMIT_NOFILE)[0])


def _limit(value: int) -> int:
    return MAX_OPEN_FILES if resource is not None and value == resource.RLIM_INFINITY else value


class _TooSlow(Exception):
    """A connection that does not take what is sent to it fast enough."""


class _TokenBucket:
    """A token bucket that may go into debt: the debt is the time to wait.

    Frames are counted with a burst of one second's worth; bytes with a burst
    of their own.
    """

    def __init__(self, rate: float, burst: float) -> None:
        self.rate = rate
        self.burst = burst
        self.tokens = float(burst)
        self.stamp = time.monotonic()

    def take(self, amount: float = 1) -> float:
        """Spend ``amount``; the seconds to wait before the bucket is out of debt."""
        now = time.monotonic()
        self.tokens = min(self.burst, self.tokens + (now - self.stamp) * self.rate) - amount
        self.stamp = now
        return -self.tokens / self.rate if self.tokens < 0 else 0.0


class _Outbox:
    """A connection's outgoing messages, written in order by a task of its own.

    Bounded in bytes: a sender waits while it is full, so one slow reader
    costs memory only up to ``max_bytes``. A connection that takes nothing
    for ``stall`` seconds while someone waits is too slow.
    """

    def __init__(self, connection: ServerConnection, max_bytes: int, stall: float) -> None:
        self.connection = connection
        self.max_bytes = max_bytes
        self.stall = stall
        self.queued = 0
        self.closed = False
        self._queue: collections.deque[tuple[Any, int]] = collections.deque()
        self._loop = asyncio.get_running_loop()
        self._progress = self._loop.time()
        self._wakeup: asyncio.Future[None] | None = None
        self._line: collections.deque[asyncio.Future[None]] = collections.deque()
        self._writer = asyncio.ensure_future(self._write())

    def force(self, message: Any, size: int = 0) -> None:
        """Queue whatever the queue holds: for the relay's own few, small frames."""
        if self.closed:
            return
        if not self._queue:
            self._progress = self._loop.time()  # an idle connection's clock starts now
        self._queue.append((message, size))
        self.queued += size
        if self._wakeup is not None and not self._wakeup.done():
            self._wakeup.set_result(None)

    def offer(self, message: Any, size: int) -> bool:
        """Queue if there is room (or the queue is empty); False if it is full."""
        if self.queued and self.queued + size > self.max_bytes:
            return False
        self.force(message, size)
        return True

    async def put(self, message: Any, size: int, sender: _Peer | None = None) -> None:
        """Queue, waiting for room; nothing if the connection or ``sender`` is gone.

        Senders wait in line: each message written wakes the first, and each
        that leaves the line wakes the next, so a queue that many wait for
        (the initiator's, while every participant uploads) wakes one at a time.

        Raises:
            _TooSlow: if the connection takes nothing for ``stall`` seconds meanwhile.
        """
        try:
            while not (
                self.closed
                or (sender is not None and not sender.active)
                or self.offer(message, size)
            ):
                if self._loop.time() >= self._progress + self.stall:
                    raise _TooSlow(
                        f"it took nothing for {self.stall:g} s while {_mib(self.queued)} "
                        "waited for it"
                    )
                await self._sent(self._progress + self.stall)
        finally:
            self._wake_next()

    async def drain(self, timeout: float) -> bool:
        """Wait until everything queued went out; False if it did not in time."""
        deadline = self._loop.time() + timeout
        try:
            while self._queue and not self.closed and self._loop.time() < deadline:
                await self._sent(deadline)
        finally:
            self._wake_next()
        return not self._queue

    async def _sent(self, deadline: float) -> None:
        """Wait in line until woken (a message went out, or the writer stopped), or
        ``deadline`` (loop time)."""
        woken = self._loop.create_future()
        self._line.append(woken)
        try:
            await asyncio.wait_for(woken, max(deadline - self._loop.time(), 0))
        except asyncio.TimeoutError:
            pass  # wait_for cancelled it: done, so the line passes over it

    def _wake_next(self) -> None:
        """Wake the first in line that still waits."""
        while self._line:
            waiter = self._line.popleft()
            if not waiter.done():
                waiter.set_result(None)
                return

    async def aclose(self) -> None:
        """Drop what is queued and stop writing; the connection may then be closed."""
        self.closed = True
        self._writer.cancel()
        await asyncio.gather(self._writer, return_exceptions=True)

    async def _write(self) -> None:
        try:
            while True:
                if not self._queue:
                    self._wakeup = self._loop.create_future()
                    await self._wakeup
                    continue
                message, size = self._queue[0]
                await self.connection.send(message)
                self._queue.popleft()
                self.queued -= size
                self._progress = self._loop.time()
                self._wake_next()
        except ConnectionClosed:
            pass
        finally:
            self.closed = True
            self._queue.clear()
            self.queued = 0
            while self._line:
                self._wake_next()


class _Peer:
    """One admitted connection: who it is and what waits to be written to it."""

    def __init__(
        self,
        connection: ServerConnection,
        name: str,
        limits: RelayLimits,
        session: str | None = None,
    ) -> None:
        self.connection = connection
        self.name = name
        self.address = _address(connection)
        self.session = session
        #: False once the relay no longer forwards for it (it left, was replaced or dropped).
        self.active = True
        self.throttled = False
        self.outbox = _Outbox(connection, limits.max_queue_bytes, limits.max_send_stall)


@dataclass(eq=False)
class _Waiting:
    """Participants held until a task starts, and the event that releases them."""

    event: asyncio.Event = field(default_factory=asyncio.Event)
    count: int = 0


class _QuietLog:
    """Logs the first of a burst of alike lines, then how many more came, once a ``period``."""

    def __init__(self, period: float) -> None:
        self.period = period
        self.quiet_until = 0.0
        self.skipped = 0
        self.last = ""

    def __call__(self, line: str) -> None:
        now = time.monotonic()
        if now >= self.quiet_until:
            log.info("%s", line)
            self.quiet_until = now + self.period
            return
        if not self.skipped:
            asyncio.get_running_loop().call_later(self.quiet_until - now, self._summary)
        self.skipped += 1
        self.last = line

    def _summary(self) -> None:
        log.info(
            "%d more like it in the last %g s, the last: %s", self.skipped, self.period, self.last
        )
        self.skipped = 0


class Relay:
    """Serves connections to a :class:`~fedmagic.wire.routing.Router`, within limits.

    The router decides who may join and who hears what; this class reads
    and writes the websockets, and bounds what each connection may make
    the relay hold.

    Args:
        token: if set, initiators must present it to create a task.
        limits: what clients may make the relay do.
    """

    def __init__(self, token: str | None = None, limits: RelayLimits = DEFAULT_LIMITS) -> None:
        self.router: Router[_Peer] = Router(token, limits)
        self.limits = limits
        self.max_connections = limits.max_connections or connection_cap()
        #: Beyond this, new TCP connections are cut at once: the descriptors
        #: between it and the open-file limit are the process's own.
        self.max_sockets = self.max_connections + max(FD_RESERVE // 2, self.max_connections // 16)
        self.max_waiting = max(min(limits.max_waiting, self.max_connections // 2), 1)
        #: Open TCP connections, counted from before their websocket handshake.
        self.connections = 0
        self.waiting = 0
        self._waiting: dict[str, _Waiting] = {}
        self._waiting_from: collections.Counter[str] = collections.Counter()
        self._background: set[asyncio.Task[None]] = set()
        self._flood_logs: dict[str, _QuietLog] = collections.defaultdict(
            lambda: _QuietLog(FLOOD_LOG_PERIOD)
        )

    @property
    def tasks(self) -> dict[str, Task[_Peer]]:
        """The tasks running here, by id."""
        return self.router.tasks

    def describe_limits(self) -> str:
        """The capacity limits, for the log of a relay that starts."""
        return (
            f"at most {self.max_connections} connections, {self.max_waiting} of them "
            f"joins waiting for a task that has not started "
            f"({self.limits.max_waiting_per_address} per address)"
        )

    async def handle(self, connection: ServerConnection) -> None:
        """Serve one connection from its hello to its close."""
        peer = _address(connection)
        try:
            if self.connections > self.max_connections:
                raise Refused(
                    Refusal.BUSY,
                    f"relay busy: it serves its limit of "
                    f"{self.max_connections} connections; try again later, or ask "
                    "its operator to raise the limit (ulimit -n, --max-connections)",
                    flood="connections",
                )
            try:
                data = await asyncio.wait_for(connection.recv(), self.limits.hello_timeout)
            except asyncio.TimeoutError:
                raise Refused(
                    Refusal.TIMEOUT, f"no hello within {self.limits.hello_timeout:g} s"
                ) from None
            hello = self.router.read_hello(data)
            if hello["role"] == "initiator":
                await self._serve_initiator(connection, hello)
            else:
                await self._serve_participant(connection, hello)
        except Refused as refusal:
            if refusal.flood is not None:
                self._flood_logs[refusal.flood](f"refused {peer}: {refusal.message}")
            else:
                log.info("refused %s: %s", peer, refusal.message)
            await _refuse(connection, refusal.code, refusal.message)
        except CodecError as exc:
            log.info("closing %s: %s", peer, exc)
            await _refuse(connection, "malformed", str(exc))
        except ConnectionClosed:
            pass

    async def _serve_initiator(self, connection: ServerConnection, hello: dict[str, Any]) -> None:
        self.router.admit_initiator(hello)
        initiator = _Peer(connection, INITIATOR, self.limits)
        task, welcome = self.router.open_task(hello, initiator)
        waiting = self._waiting.pop(task.task_id, None)
        if waiting is not None:
            waiting.event.set()
        log.info("task %r created by %s", task.task_id, initiator.address)
        try:
            _deliver(welcome)
            async for targets, message, size in self._incoming(task, initiator):
                await self._fan_out(task, targets, message, size)
        finally:
            initiator.active = False
            closing = self.router.close_task(task)
            log.info("task %r closed", task.task_id)
            await asyncio.gather(
                initiator.outbox.aclose(),
                *(self._close_task(participant, closed) for participant, closed in closing),
            )

    async def _serve_participant(self, connection: ServerConnection, hello: dict[str, Any]) -> None:
        task_id, node = hello["task"], hello["node"]
        address = connection.remote_address[0] if connection.remote_address else "?"
        task = self.tasks.get(task_id)
        if task is None:
            wait = self.router.join_wait(task_id, hello.get("wait"))
            if wait <= 0:
                raise self.router.unknown_task(task_id)
            if not await self._wait_for_task(connection, node, address, task_id, wait):
                return  # the participant hung up (or the relay is closing) while waiting
            task = self.tasks.get(task_id)
            if task is None:
                raise Refused(
                    Refusal.UNKNOWN_TASK, f"task {task_id!r} ended before it could be joined"
                )
        session = self.router.admit_participant(task, hello)
        peer = _Peer(connection, node, self.limits, session)
        stale, sends = self.router.join(task, peer, session, hello)
        if stale is not None:
            log.info(
                "%r reconnected to task %r from %s; closing its stale connection from %s",
                node,
                task_id,
                peer.address,
                stale.address,
            )
            stale.active = False
            self._spawn(_hang_up(stale, NORMAL_CLOSURE, "replaced by a reconnect of the same node"))
        log.info("%r joined task %r from %s", node, task_id, peer.address)
        try:
            _deliver(sends)  # its peer_left reaches the initiator before this peer_joined
            async for targets, message, size in self._incoming(task, peer):
                for target in targets:
                    await self._forward(task, peer, target, message, size)
        finally:
            self._remove(task, peer)
            peer.active = False
            await peer.outbox.aclose()

    async def _incoming(
        self, task: Task[_Peer], peer: _Peer
    ) -> AsyncIterator[tuple[list[_Peer], Any, int]]:
        """A client's frames to forward: limited, checked, stamped with the sender.

        Yields:
            who the frame goes to, the message to forward and its size.
        """
        frames = _TokenBucket(
            self.limits.max_frames_per_second, burst=self.limits.max_frames_per_second
        )
        volume = _TokenBucket(self.limits.max_bytes_per_second, burst=self.limits.burst_bytes)
        async for data in peer.connection:
            if frames.take() > 0:  # over the frame rate: refused, not slowed
                raise Refused(
                    Refusal.RATE,
                    f"more than {self.limits.max_frames_per_second:g} frames per second",
                )
            size = len(data)
            delay = volume.take(size)
            if delay > 0:
                if not peer.throttled:
                    peer.throttled = True
                    log.warning(
                        "throttling %s from %s: it sends more than %s per second; "
                        "reading it slower",
                        _name(peer),
                        peer.address,
                        _mib(self.limits.max_bytes_per_second),
                    )
                await asyncio.sleep(delay)
            if not peer.active:
                continue  # dropped, replaced or its task closed: read on until it closes
            frame, targets = self.router.route(task, peer, data)
            if frame.payload_size >= FRAGMENT_BYTES:
                message: Any = [frame.serialize_header(), frame.payload]
            else:
                message = frame.serialize()
            yield targets, message, size

    async def _fan_out(
        self, task: Task[_Peer], targets: list[_Peer], message: Any, size: int
    ) -> None:
        """Queue one frame for each target; drop those that take nothing.

        The same message (and payload view) goes into every queue, so a fan-out
        costs its bytes once. The initiator waits only while a queue is full,
        and at most ``max_send_stall`` seconds for a participant that takes
        nothing: then that one is dropped and the others go on.
        """
        full = [target for target in targets if not target.outbox.offer(message, size)]
        if not full:
            return
        outcomes = await asyncio.gather(
            *(target.outbox.put(message, size, sender=task.initiator) for target in full),
            return_exceptions=True,
        )
        for target, outcome in zip(full, outcomes, strict=True):
            if isinstance(outcome, _TooSlow):
                self._drop(task, target, f"too slow: {outcome}")
            elif isinstance(outcome, BaseException):
                raise outcome

    async def _forward(
        self, task: Task[_Peer], peer: _Peer, target: _Peer, message: Any, size: int
    ) -> None:
        """A participant's frame to one target, waiting while its queue is full.

        A target that takes nothing meanwhile is dropped; the initiator's
        handler then closes the task.
        """
        try:
            await target.outbox.put(message, size, sender=peer)
        except _TooSlow as exc:
            if target.active:
                self._drop(task, target, f"too slow: {exc}")

    def _drop(self, task: Task[_Peer], peer: _Peer, reason: str) -> None:
        """Disconnect a peer (participant or initiator) that holds others up."""
        log.warning(
            "dropping %s of task %r from %s: %s", _name(peer), task.task_id, peer.address, reason
        )
        self._remove(task, peer)
        peer.active = False
        self._spawn(_hang_up(peer, POLICY_VIOLATION, reason))

    def _remove(self, task: Task[_Peer], peer: _Peer) -> None:
        """Forget a participant and tell the initiator, once."""
        left = self.router.leave(task, peer)
        if left:
            peer.active = False
            _deliver(left)
            log.info("%r left task %r", peer.name, task.task_id)

    def _spawn(self, coroutine: Any) -> None:
        background = asyncio.ensure_future(coroutine)
        self._background.add(background)
        background.add_done_callback(self._background.discard)

    async def _close_task(self, participant: _Peer, closed: Frame) -> None:
        """Tell a participant its task is over once what was queued went out, then close."""
        participant.active = False
        participant.outbox.force(closed.serialize())
        await participant.outbox.drain(self.limits.max_send_stall)
        await _hang_up(participant, GOING_AWAY, "task closed")

    async def _wait_for_task(
        self, connection: ServerConnection, node: str, address: str, task_id: str, wait: float
    ) -> bool:
        """Hold a participant until its task starts; False if it hung up first.

        Raises:
            Refused: if the relay holds too many waiting joins (from that
                address or overall), or the task did not start within ``wait`` seconds.
        """
        if self.waiting >= self.max_waiting:
            raise Refused(
                Refusal.BUSY,
                f"relay busy: {self.waiting} joins already wait for tasks "
                "that have not started, its limit; start the task first, or try "
                "again later",
                flood="waiting",
            )
        if self._waiting_from[address] >= self.limits.max_waiting_per_address:
            raise Refused(
                Refusal.BUSY,
                f"relay busy: {self._waiting_from[address]} joins from "
                f"{address} already wait for tasks that have not started, its limit "
                "per address; start the task first, or ask the relay's operator to "
                "raise --max-waiting-per-address",
                flood="waiting from one address",
            )
        log.info("%r is waiting up to %g s for task %r", node, wait, task_id)
        waiting = self._waiting.setdefault(task_id, _Waiting())
        waiting.count += 1
        self.waiting += 1
        self._waiting_from[address] += 1
        created = asyncio.ensure_future(waiting.event.wait())
        closed = asyncio.ensure_future(connection.wait_closed())
        try:
            await asyncio.wait((created, closed), timeout=wait, return_when=asyncio.FIRST_COMPLETED)
        finally:
            created.cancel()
            closed.cancel()
            waiting.count -= 1
            self.waiting -= 1
            self._waiting_from[address] -= 1
            if not self._waiting_from[address]:
                del self._waiting_from[address]
            if not waiting.count and self._waiting.get(task_id) is waiting:
                del self._waiting[task_id]  # nobody waits: forget the task id
        if waiting.event.is_set():
            return True
        if closed.done() and not closed.cancelled():
            return False
        raise Refused(
            Refusal.UNKNOWN_TASK,
            f"task {task_id!r} did not start within {wait:g} s; "
            "start the task first, or join with a longer wait",
        )


def _counted_connections(relay: Relay) -> type[ServerConnection]:
    """Websocket connections that ``relay`` counts from their first TCP byte.

    Connections still in their handshake hold descriptors too; past
    ``relay.max_sockets`` new ones are cut at once, before they could
    exhaust the open-file limit.
    """

    class CountedConnection(ServerConnection):
        def connection_made(self, transport: asyncio.BaseTransport) -> None:
            super().connection_made(transport)
            relay.connections += 1
            if relay.connections > relay.max_sockets:
                # A stream's transport, as websockets' own connection_made assumes.
                cast(asyncio.Transport, transport).abort()  # too many even to say "busy"

        def connection_lost(self, exc: Exception | None) -> None:
            relay.connections -= 1
            super().connection_lost(exc)

    return CountedConnection


async def _hang_up(peer: _Peer, code: int, reason: str) -> None:
    """Stop writing to a peer and close it; cut it off if it does not answer in time.

    A peer that reads nothing never takes a close frame queued behind its
    data; its handler and its task would wait for it forever.
    """
    await peer.outbox.aclose()
    try:
        await asyncio.wait_for(
            peer.connection.close(code, _close_reason(reason)), peer.connection.close_timeout
        )
    except asyncio.TimeoutError:
        peer.connection.transport.abort()


async def _refuse(connection: ServerConnection, code: str, message: str) -> None:
    """Send an ``error`` frame, then close, discarding whatever the client still sends.

    Nothing reads a refused connection any more; with its incoming queue full
    websockets would stop reading, miss the client's close frame and hold both
    ends for ``close_timeout``.
    """
    try:
        await connection.send(
            Frame({"t": Kind.ERROR, "code": code, "message": message}).serialize()
        )
    except ConnectionClosed:
        return
    except WebSocketProtocolError:
        pass  # a message to it was cut off half-way: only the close frame may follow
    discard = asyncio.ensure_future(_discard(connection))
    try:
        await asyncio.wait_for(
            connection.close(POLICY_VIOLATION, _close_reason(message)), connection.close_timeout
        )
    except asyncio.TimeoutError:
        connection.transport.abort()
    finally:
        discard.cancel()


async def _discard(connection: ServerConnection) -> None:
    try:
        while True:
            await connection.recv()
    except ConnectionClosed:
        pass


def _close_reason(message: str) -> str:
    """``message`` cut to fit a close frame."""
    return message.encode()[:MAX_CLOSE_REASON_BYTES].decode(errors="ignore")


def _address(connection: ServerConnection) -> str:
    address = connection.remote_address
    return f"{address[0]}:{address[1]}" if address else "?"


def _deliver(sends: list[Send[_Peer]]) -> None:
    """Queue the router's few, small frames, whatever each queue holds."""
    for peer, frame in sends:
        peer.outbox.force(frame.serialize())


def _name(peer: _Peer) -> str:
    return "the initiator" if peer.name == INITIATOR else repr(peer.name)


def _mib(size: float) -> str:
    return f"{size / (1 << 20):.3g} MiB"


def _server_options(relay: Relay) -> dict[str, Any]:
    return {
        "compression": None,
        "max_size": relay.limits.max_frame_bytes,
        "max_queue": 4,
        "ping_interval": relay.limits.ping_interval,
        "ping_timeout": relay.limits.ping_timeout,
        "close_timeout": relay.limits.close_timeout,
        "write_limit": 4 << 20,
    }


def ssl_context(certfile: str | None, keyfile: str | None) -> ssl_module.SSLContext | None:
    """A server TLS context for ``wss://``, or None for plain ``ws://``."""
    if not certfile:
        return None
    context = ssl_module.SSLContext(ssl_module.PROTOCOL_TLS_SERVER)
    context.load_cert_chain(certfile, keyfile)
    return context


async def serve_relay(
    relay: Relay, host: str, port: int, *, ssl: ssl_module.SSLContext | None = None
) -> Server:
    """Start listening; the caller closes the returned server."""
    server = await serve(
        relay.handle,
        host,
        port,
        ssl=ssl,
        create_connection=_counted_connections(relay),
        # Connections not yet accepted: asyncio's default of 100 overflows when a thousand
        # participants join at once, and each overflowed one waits a second to try again.
        backlog=LISTEN_BACKLOG,
        **_server_options(relay),
    )
    log.info("relay limits: %s", relay.describe_limits())
    return server


class EmbeddedRelay:
    """A relay on a thread of its own, for a program that also runs a task.

    Its own thread and event loop keep it forwarding while the program's
    loop is busy, or blocked in user code.
    """

    def __init__(
        self, host: str = "127.0.0.1", port: int = DEFAULT_PORT, relay: Relay | None = None
    ) -> None:
        self.relay = relay or Relay()
        self.host = host
        self.port = port
        self._server: Server | None = None
        self._background = BackgroundLoop("fedmagic-relay")

    @property
    def url(self) -> str:
        return f"ws://{self.host}:{self.port}"

    def start(self) -> EmbeddedRelay:
        """Listen, or raise ``OSError`` (port in use, say) before returning."""
        self._background.start()
        try:
            self._server = self._background.submit(
                serve_relay(self.relay, self.host, self.port)
            ).result()
        except BaseException:
            self._background.stop()
            raise
        self.port = self._server.sockets[0].getsockname()[1]
        return self

    def stop(self) -> None:
        """Close every connection and the listening socket, then the thread."""
        if self._server is None:
            return
        server, self._server = self._server, None

        async def close() -> None:
            server.close()
            await server.wait_closed()
            await asyncio.gather(*self.relay._background, return_exceptions=True)

        self._background.submit(close()).result(timeout=30)
        self._background.stop()

    def __enter__(self) -> EmbeddedRelay:
        return self.start()

    def __exit__(self, *exc_info: object) -> None:
        self.stop()
