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

``Relay.handle`` is the whole server logic; ``serve_relay`` runs it, and
``EmbeddedRelay`` runs it on a thread of its own inside another program.
"""

from __future__ import annotations

import asyncio
import collections
import hmac
import logging
import math
import secrets
import ssl as ssl_module
import string
import time
from dataclasses import dataclass, field
from typing import Any, AsyncIterator, cast

from websockets.asyncio.server import Server, ServerConnection, serve
from websockets.exceptions import ConnectionClosed
from websockets.exceptions import ProtocolError as WebSocketProtocolError

from ..background import BackgroundLoop
from ..errors import CodecError
from .frames import CHUNK_BYTES, INITIATOR, MAX_HEADER_BYTES, PROTOCOL_VERSION, Frame, Kind
from .messages import Refusal

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
MAX_NAME_CHARS = 128
#: Kinds only the relay may send; a client sending one would speak for the relay.
RELAY_KINDS = frozenset(
    {Kind.HELLO, Kind.WELCOME, Kind.ERROR, Kind.PEER_JOINED, Kind.PEER_LEFT, Kind.TASK_CLOSED}
)
#: Open files a relay keeps for itself and for refusing connections over its cap.
FD_RESERVE = 64
#: What "no limit" on open files stands for.
MAX_OPEN_FILES = 1 << 20
#: Task ids remembered as having run here; joins for them may wait the longest.
SEEN_TASKS = 4096
#: Frames whose payload is at least this big go out as two fragments, the new
#: header and a view of the payload as received, instead of being copied together.
FRAGMENT_BYTES = 64 << 10
#: Seconds between log lines about refusals that come in floods (a full relay's).
FLOOD_LOG_PERIOD = 10.0

log = logging.getLogger("fedmagic.relay")


#: How many connections may wait to be accepted (the kernel caps it at net.core.somaxconn).
LISTEN_BACKLOG = 4096


@dataclass(frozen=True)
class RelayLimits:
    """What clients may make the relay do; each limit protects everyone else."""

    max_frame_bytes: int = CHUNK_BYTES + MAX_HEADER_BYTES + 1024
    #: Beyond this, a connection is refused ("rate"): no client needs so many frames.
    max_frames_per_second: float = 10000.0
    #: Bytes per second one connection may send after a burst of ``burst_bytes``;
    #: beyond it the relay reads that connection slower (TCP pushes back).
    max_bytes_per_second: float = float(512 << 20)
    burst_bytes: int = 256 << 20
    #: Bytes queued for one connection; whoever sends to it waits beyond this.
    max_queue_bytes: int = 8 << 20
    #: Seconds a connection may take nothing from its full queue, while a sender
    #: waits, before it is dropped as too slow (less than ``ping_timeout``: the
    #: waiting sender's pongs wait too).
    max_send_stall: float = 8.0
    #: Participants of one task (benchmarks/relay_scale.py ran 2,000 through one relay).
    max_participants: int = 4096
    max_tasks: int = 1024
    #: Open connections; None: the open-file limit less a reserve (``connection_cap``).
    max_connections: int | None = None
    #: Participants waiting for a task that has not started: overall (and never
    #: more than half of ``max_connections``), and from one IP address.
    max_waiting: int = 256
    max_waiting_per_address: int = 16
    hello_timeout: float = 10.0
    #: The longest a join waits for a task that ran on this relay before.
    max_join_wait: float = 3600.0
    #: The longest a join waits for a task id this relay has never seen; a
    #: ``Link`` that wants to wait longer asks again.
    max_unknown_task_wait: float = 30.0
    #: Seconds between pings, without a pong before a peer counts as gone, and
    #: for it to answer a close frame: a dead peer is noticed within their sum.
    ping_interval: float = 5.0
    ping_timeout: float = 12.0
    close_timeout: float = 3.0


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


class _Refusal(Exception):
    """Why a connection is refused; ``flood`` names refusals that come in floods."""

    def __init__(self, code: Refusal, message: str, flood: str | None = None) -> None:
        super().__init__(code, message)
        self.code = code
        self.message = message
        self.flood = flood


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
        self._room: list[asyncio.Future[None]] = []
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

        Raises:
            _TooSlow: if the connection takes nothing for ``stall`` seconds meanwhile.
        """
        while not (
            self.closed or (sender is not None and not sender.active) or self.offer(message, size)
        ):
            if self._loop.time() >= self._progress + self.stall:
                raise _TooSlow(
                    f"it took nothing for {self.stall:g} s while {_mib(self.queued)} waited for it"
                )
            await self._sent(self._progress + self.stall)

    async def drain(self, timeout: float) -> bool:
        """Wait until everything queued went out; False if it did not in time."""
        deadline = self._loop.time() + timeout
        while self._queue and not self.closed and self._loop.time() < deadline:
            await self._sent(deadline)
        return not self._queue

    async def _sent(self, deadline: float) -> None:
        """Wait until the writer sent a message (or stopped), or ``deadline`` (loop time)."""
        sent = self._loop.create_future()
        self._room.append(sent)
        try:
            await asyncio.wait_for(sent, max(deadline - self._loop.time(), 0))
        except asyncio.TimeoutError:
            pass
        finally:
            if sent in self._room:
                self._room.remove(sent)

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
                for room in self._room:
                    if not room.done():
                        room.set_result(None)
        except ConnectionClosed:
            pass
        finally:
            self.closed = True
            self._queue.clear()
            self.queued = 0
            for room in self._room:
                if not room.done():
                    room.set_result(None)


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
class _Task:
    task_id: str
    join_token: str
    initiator: _Peer
    allowed_nodes: frozenset[str] | None
    participants: dict[str, _Peer] = field(default_factory=dict)


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
    """Routes frames between each task's initiator and its participants.

    Args:
        token: if set, initiators must present it to create a task.
        limits: what clients may make the relay do.
    """

    def __init__(self, token: str | None = None, limits: RelayLimits = RelayLimits()) -> None:
        self.token = token
        self.limits = limits
        self.max_connections = limits.max_connections or connection_cap()
        #: Beyond this, new TCP connections are cut at once: the descriptors
        #: between it and the open-file limit are the process's own.
        self.max_sockets = self.max_connections + max(FD_RESERVE // 2, self.max_connections // 16)
        self.max_waiting = max(min(limits.max_waiting, self.max_connections // 2), 1)
        self.tasks: dict[str, _Task] = {}
        #: Open TCP connections, counted from before their websocket handshake.
        self.connections = 0
        self.waiting = 0
        self._waiting: dict[str, _Waiting] = {}
        self._waiting_from: collections.Counter[str] = collections.Counter()
        self._seen: collections.OrderedDict[str, None] = collections.OrderedDict()
        self._background: set[asyncio.Task[None]] = set()
        self._flood_logs: dict[str, _QuietLog] = collections.defaultdict(
            lambda: _QuietLog(FLOOD_LOG_PERIOD)
        )

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
                raise _Refusal(
                    Refusal.BUSY,
                    f"relay busy: it serves its limit of "
                    f"{self.max_connections} connections; try again later, or ask "
                    "its operator to raise the limit (ulimit -n, --max-connections)",
                    flood="connections",
                )
            hello = await self._read_hello(connection)
            if hello["role"] == "initiator":
                await self._serve_initiator(connection, hello)
            else:
                await self._serve_participant(connection, hello)
        except _Refusal as refusal:
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

    async def _read_hello(self, connection: ServerConnection) -> dict[str, Any]:
        try:
            data = await asyncio.wait_for(connection.recv(), self.limits.hello_timeout)
        except asyncio.TimeoutError:
            raise _Refusal(
                Refusal.TIMEOUT, f"no hello within {self.limits.hello_timeout:g} s"
            ) from None
        header = Frame.parse(data).header
        if header["t"] != Kind.HELLO:
            raise _Refusal(
                Refusal.PROTOCOL, f"the first frame must be a hello, got {header['t']!r}"
            )
        version = header.get("protocol")
        if version != PROTOCOL_VERSION:
            raise _Refusal(
                Refusal.PROTOCOL,
                f"this relay speaks fedmagic protocol {PROTOCOL_VERSION} "
                f"but the client speaks {version!r}; install the same fedmagic "
                "version on every node",
            )
        if header.get("role") not in ("initiator", "participant"):
            raise _Refusal(Refusal.PROTOCOL, "role must be 'initiator' or 'participant'")
        for key in ("task", "token"):
            if not isinstance(header.get(key), str) or not header[key]:
                raise _Refusal(Refusal.PROTOCOL, f"hello needs a non-empty string {key!r}")
        wait = header.get("wait")
        if wait is not None and (
            isinstance(wait, bool) or not isinstance(wait, (int, float)) or not math.isfinite(wait)
        ):
            raise _Refusal(Refusal.PROTOCOL, "'wait' must be a finite number of seconds")
        if header["role"] == "participant":
            if not _is_node_name(header.get("node")):
                raise _Refusal(
                    Refusal.PROTOCOL,
                    f"a participant needs a node name of 1 to "
                    f"{MAX_NAME_CHARS} characters, not starting with '@'",
                )
            if not _is_hex(header.get("session", "0")):
                raise _Refusal(
                    Refusal.PROTOCOL,
                    "'session' must be the hex string a relay's "
                    "welcome gave this node (Link.session)",
                )
            if not _is_hex(header.get("accepted", "0")):
                raise _Refusal(
                    Refusal.PROTOCOL,
                    "'accepted' must be the hex code hash of the task this node consented to",
                )
        else:
            allowed = header.get("allowed_nodes")
            if allowed is not None and not (
                isinstance(allowed, list)
                and len(allowed) <= self.limits.max_participants
                and all(map(_is_node_name, allowed))
            ):
                raise _Refusal(
                    Refusal.PROTOCOL,
                    f"'allowed_nodes' must be a list of at most "
                    f"{self.limits.max_participants} node names",
                )
        return header

    async def _serve_initiator(self, connection: ServerConnection, hello: dict[str, Any]) -> None:
        task_id = hello["task"]
        if self.token is not None and not _same(hello.get("relay_token"), self.token):
            raise _Refusal(
                Refusal.RELAY_TOKEN,
                "wrong or missing relay token: pass the token the "
                "relay's operator gave you (FEDMAGIC_RELAY_TOKEN)",
            )
        if task_id in self.tasks:
            raise _Refusal(
                Refusal.TASK_EXISTS,
                f"task {task_id!r} is already running on this "
                "relay; stop it first or pick another task id",
            )
        if len(self.tasks) >= self.limits.max_tasks:
            raise _Refusal(
                Refusal.BUSY,
                f"relay busy: it already runs {len(self.tasks)} tasks, its limit; try again later",
            )
        allowed = hello.get("allowed_nodes")
        initiator = _Peer(connection, INITIATOR, self.limits)
        task = _Task(
            task_id, hello["token"], initiator, frozenset(allowed) if allowed is not None else None
        )
        self.tasks[task_id] = task
        self._seen[task_id] = None
        self._seen.move_to_end(task_id)
        if len(self._seen) > SEEN_TASKS:
            self._seen.popitem(last=False)
        waiting = self._waiting.pop(task_id, None)
        if waiting is not None:
            waiting.event.set()
        log.info("task %r created by %s", task_id, initiator.address)
        try:
            initiator.outbox.force(
                Frame(
                    {"t": Kind.WELCOME, "task": task_id, "protocol": PROTOCOL_VERSION}
                ).serialize()
            )
            async for to, message, size in self._incoming(initiator):
                await self._fan_out(task, self._targets(task, to), message, size)
        finally:
            del self.tasks[task_id]
            initiator.active = False
            log.info("task %r closed", task_id)
            # Forget the participants first: nobody is left to hear their peer_left.
            participants = list(task.participants.values())
            task.participants.clear()
            closed = Frame({"t": Kind.TASK_CLOSED, "task": task_id}).serialize()
            await asyncio.gather(
                initiator.outbox.aclose(),
                *(self._close_task(participant, closed) for participant in participants),
            )

    async def _incoming(self, peer: _Peer) -> AsyncIterator[tuple[Any, Any, int]]:
        """A client's frames to forward: limited, checked, stamped with the sender.

        Yields:
            the frame's ``to`` field, the message to forward and its size.
        """
        frames = _TokenBucket(
            self.limits.max_frames_per_second, burst=self.limits.max_frames_per_second
        )
        volume = _TokenBucket(self.limits.max_bytes_per_second, burst=self.limits.burst_bytes)
        async for data in peer.connection:
            if frames.take() > 0:  # over the frame rate: refused, not slowed
                raise _Refusal(
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
            frame = _parse_forwarded(data)
            to = frame.header.pop("to", None)
            frame.header["from"] = peer.name
            if frame.payload_size >= FRAGMENT_BYTES:
                message: Any = [frame.serialize_header(), frame.payload]
            else:
                message = frame.serialize()
            yield to, message, size

    async def _fan_out(self, task: _Task, targets: list[_Peer], message: Any, size: int) -> None:
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

    def _drop(self, task: _Task, peer: _Peer, reason: str) -> None:
        """Disconnect a peer (participant or initiator) that holds others up."""
        log.warning(
            "dropping %s of task %r from %s: %s", _name(peer), task.task_id, peer.address, reason
        )
        self._remove(task, peer)
        peer.active = False
        self._spawn(_hang_up(peer, POLICY_VIOLATION, reason))

    def _remove(self, task: _Task, peer: _Peer) -> None:
        """Forget a participant and tell the initiator, once."""
        if task.participants.get(peer.name) is peer:
            del task.participants[peer.name]
            peer.active = False
            task.initiator.outbox.force(Frame({"t": Kind.PEER_LEFT, "from": peer.name}).serialize())
            log.info("%r left task %r", peer.name, task.task_id)

    def _spawn(self, coroutine: Any) -> None:
        background = asyncio.ensure_future(coroutine)
        self._background.add(background)
        background.add_done_callback(self._background.discard)

    async def _close_task(self, participant: _Peer, closed: bytes) -> None:
        """Tell a participant its task is over once what was queued went out, then close."""
        participant.active = False
        participant.outbox.force(closed)
        await participant.outbox.drain(self.limits.max_send_stall)
        await _hang_up(participant, GOING_AWAY, "task closed")

    def _join_wait(self, task_id: str, wanted: Any) -> float:
        """How long a participant may wait for ``task_id``: shorter for one never seen."""
        cap = self.limits.max_join_wait
        if task_id not in self._seen:
            cap = min(cap, self.limits.max_unknown_task_wait)
        return min(float(wanted or 0), cap)

    async def _wait_for_task(
        self, connection: ServerConnection, node: str, address: str, task_id: str, wait: float
    ) -> bool:
        """Hold a participant until its task starts; False if it hung up first.

        Raises:
            _Refusal: if the relay holds too many waiting joins (from that
                address or overall), or the task did not start within ``wait`` seconds.
        """
        if self.waiting >= self.max_waiting:
            raise _Refusal(
                Refusal.BUSY,
                f"relay busy: {self.waiting} joins already wait for tasks "
                "that have not started, its limit; start the task first, or try "
                "again later",
                flood="waiting",
            )
        if self._waiting_from[address] >= self.limits.max_waiting_per_address:
            raise _Refusal(
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
        raise _Refusal(
            Refusal.UNKNOWN_TASK,
            f"task {task_id!r} did not start within {wait:g} s; "
            "start the task first, or join with a longer wait",
        )

    def _targets(self, task: _Task, to: Any) -> list[_Peer]:
        if to == "*":
            return list(task.participants.values())
        if not isinstance(to, list) or not all(isinstance(node, str) for node in to):
            raise CodecError("an initiator's frame needs 'to': a list of node names or '*'")
        return [task.participants[node] for node in to if node in task.participants]

    async def _serve_participant(self, connection: ServerConnection, hello: dict[str, Any]) -> None:
        task_id, node = hello["task"], hello["node"]
        address = connection.remote_address[0] if connection.remote_address else "?"
        task = self.tasks.get(task_id)
        if task is None:
            wait = self._join_wait(task_id, hello.get("wait"))
            if wait <= 0:
                raise _Refusal(
                    Refusal.UNKNOWN_TASK,
                    f"no task {task_id!r} on this relay; check the "
                    "task id, or wait for the initiator to launch it",
                )
            if not await self._wait_for_task(connection, node, address, task_id, wait):
                return  # the participant hung up (or the relay is closing) while waiting
            task = self.tasks.get(task_id)
            if task is None:
                raise _Refusal(
                    Refusal.UNKNOWN_TASK, f"task {task_id!r} ended before it could be joined"
                )
        if not _same(hello["token"], task.join_token):
            raise _Refusal(
                Refusal.JOIN_TOKEN,
                f"wrong join token for task {task_id!r}; copy the "
                "join line the task's author shared",
            )
        if task.allowed_nodes is not None and node not in task.allowed_nodes:
            raise _Refusal(
                Refusal.NODE_NOT_ALLOWED,
                f"task {task_id!r} admits only the nodes its "
                f"author named, and {node!r} is not one of them; ask the task's "
                "author to add it, or check the --node name",
            )
        session = hello.get("session")
        stale = task.participants.get(node)
        if stale is not None and not _same(session, stale.session or ""):
            raise _Refusal(
                Refusal.NODE_TAKEN,
                f"the name {node!r} is in use by a connected node of "
                f"task {task_id!r}; pick another --node name, or, if this is that "
                "node restarting, present its session (the one its welcome gave)",
            )
        if stale is None and len(task.participants) >= self.limits.max_participants:
            raise _Refusal(
                Refusal.BUSY,
                f"relay busy: task {task_id!r} already has "
                f"{len(task.participants)} participants, its limit; a place frees when one "
                "leaves, or the relay's operator raises it (fedmagic relay --max-participants)",
            )
        peer = _Peer(connection, node, self.limits, session or secrets.token_hex(16))
        if stale is not None:
            log.info(
                "%r reconnected to task %r from %s; closing its stale connection from %s",
                node,
                task_id,
                peer.address,
                stale.address,
            )
            self._remove(task, stale)  # its peer_left reaches the initiator before our peer_joined
            self._spawn(_hang_up(stale, NORMAL_CLOSURE, "replaced by a reconnect of the same node"))
        task.participants[node] = peer
        log.info("%r joined task %r from %s", node, task_id, peer.address)
        try:
            peer.outbox.force(
                Frame(
                    {
                        "t": Kind.WELCOME,
                        "task": task_id,
                        "node": node,
                        "session": peer.session,
                        "protocol": PROTOCOL_VERSION,
                    }
                ).serialize()
            )
            # A node coming back says which code it consented to: the initiator
            # need not send it again, nor the data owner consent twice.
            joined = {"t": Kind.PEER_JOINED, "from": node}
            if "accepted" in hello:
                joined["accepted"] = hello["accepted"]
            task.initiator.outbox.force(Frame(joined).serialize())
            async for to, message, size in self._incoming(peer):
                if to is None:  # a participant speaks to its initiator, unless it names others
                    await self._to_initiator(task, peer, message, size)
                else:
                    await self._to_peers(task, peer, to, message, size)
        finally:
            self._remove(task, peer)
            peer.active = False
            await peer.outbox.aclose()

    async def _to_initiator(self, task: _Task, peer: _Peer, message: Any, size: int) -> None:
        try:
            await task.initiator.outbox.put(message, size, sender=peer)
        except _TooSlow as exc:
            if task.initiator.active:  # its handler then closes the task
                self._drop(task, task.initiator, f"too slow: {exc}")

    async def _to_peers(self, task: _Task, peer: _Peer, to: Any, message: Any, size: int) -> None:
        """A participant's frame to the nodes it names (a round's elected aggregator, say),
        ``@initiator`` among them; names not in the task are passed over."""
        if not isinstance(to, list) or not all(isinstance(node, str) for node in to):
            raise CodecError("a participant's 'to' must be a list of node names")
        for node in to:
            if node == INITIATOR:
                await self._to_initiator(task, peer, message, size)
                continue
            target = task.participants.get(node)
            if target is None:
                continue
            try:
                await target.outbox.put(message, size, sender=peer)
            except _TooSlow as exc:
                self._drop(task, target, f"too slow: {exc}")


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


def _is_node_name(node: Any) -> bool:
    return isinstance(node, str) and 0 < len(node) <= MAX_NAME_CHARS and not node.startswith("@")


def _is_hex(text: Any) -> bool:
    return (
        isinstance(text, str)
        and 0 < len(text) <= MAX_NAME_CHARS
        and all(char in string.hexdigits for char in text)
    )


def _parse_forwarded(data: bytes | str) -> Frame:
    """Parse a frame a client wants forwarded; only the relay speaks for the relay.

    Raises:
        CodecError: if ``data`` is not a frame.
        _Refusal: if it is a kind only the relay may send.
    """
    frame = Frame.parse(data)
    if frame.kind in RELAY_KINDS:
        raise _Refusal(
            Refusal.PROTOCOL,
            f"{frame.kind!r} frames come from the relay only; clients may not send them",
        )
    return frame


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


def _same(given: Any, secret: str) -> bool:
    return isinstance(given, str) and hmac.compare_digest(given.encode(), secret.encode())


def _address(connection: ServerConnection) -> str:
    address = connection.remote_address
    return f"{address[0]}:{address[1]}" if address else "?"


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
