"""The websocket relay: one initiator and its participants per task.

Every party dials out to the relay, so nobody needs an open port but the
relay's operator. The relay authenticates each connection (a relay token for
initiators, the task's join token for participants), stamps the sender on
every frame it forwards so nobody can speak for another, fans one upload
from the initiator out to many participants, and keeps tasks apart. It
reads only headers; payloads pass through untouched.

``Relay.handle`` is the whole server logic; ``serve`` runs it, and
``EmbeddedRelay`` runs it on a thread of its own inside another program.
"""

from __future__ import annotations

import asyncio
import hmac
import logging
import math
import secrets
import ssl as ssl_module
import threading
import time
from dataclasses import dataclass, field
from typing import Any, AsyncIterator

from websockets.asyncio.server import Server, ServerConnection, serve
from websockets.exceptions import ConnectionClosed

from .codec import CHUNK_BYTES, MAX_HEADER_BYTES, PROTOCOL_VERSION, Frame, Kind
from .errors import CodecError

__all__ = ["DEFAULT_PORT", "EmbeddedRelay", "Relay", "RelayLimits", "new_token", "serve_relay"]

DEFAULT_PORT = 8765


def new_token() -> str:
    """A fresh join token: hex, so a command line never reads it as an option ("-x...")."""
    return secrets.token_hex(16)
INITIATOR = "@initiator"
POLICY_VIOLATION = 1008
MAX_CLOSE_REASON_BYTES = 120
#: Kinds only the relay may send; a client sending one would speak for the relay.
RELAY_KINDS = frozenset({Kind.HELLO, Kind.WELCOME, Kind.ERROR, Kind.PEER_JOINED,
                         Kind.PEER_LEFT, Kind.TASK_CLOSED})

log = logging.getLogger("fedmagic.relay")


@dataclass(frozen=True)
class RelayLimits:
    """What one connection may do; each limit protects everyone else."""

    max_frame_bytes: int = CHUNK_BYTES + MAX_HEADER_BYTES + 1024
    max_frames_per_second: float = 10000.0
    max_participants: int = 1024
    max_tasks: int = 1024
    hello_timeout: float = 10.0
    max_join_wait: float = 3600.0
    #: Seconds between pings, and without a pong before a peer counts as gone.
    ping_interval: float = 20.0
    ping_timeout: float = 60.0


@dataclass(eq=False)
class _Task:
    task_id: str
    join_token: str
    initiator: ServerConnection
    participants: dict[str, ServerConnection] = field(default_factory=dict)


@dataclass(eq=False)
class _Waiting:
    """Participants held until a task starts, and the event that releases them."""

    event: asyncio.Event = field(default_factory=asyncio.Event)
    count: int = 0


class _Refusal(Exception):
    def __init__(self, code: str, message: str) -> None:
        super().__init__(code, message)
        self.code = code
        self.message = message


class _RateLimit:
    """A token bucket: a burst of one second's frames, then the steady rate."""

    def __init__(self, rate: float) -> None:
        self.rate = rate
        self.tokens = rate
        self.stamp = time.monotonic()

    def take(self) -> bool:
        now = time.monotonic()
        self.tokens = min(self.rate, self.tokens + (now - self.stamp) * self.rate)
        self.stamp = now
        if self.tokens < 1:
            return False
        self.tokens -= 1
        return True


class Relay:
    """Routes frames between each task's initiator and its participants.

    Args:
        token: if set, initiators must present it to create a task.
        limits: per-connection limits.
    """

    def __init__(self, token: str | None = None, limits: RelayLimits = RelayLimits()) -> None:
        self.token = token
        self.limits = limits
        self.tasks: dict[str, _Task] = {}
        self._waiting: dict[str, _Waiting] = {}

    async def handle(self, connection: ServerConnection) -> None:
        """Serve one connection from its hello to its close."""
        peer = _address(connection)
        try:
            hello = await self._read_hello(connection)
            if hello["role"] == "initiator":
                await self._serve_initiator(connection, hello)
            else:
                await self._serve_participant(connection, hello)
        except _Refusal as refusal:
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
            raise _Refusal("timeout", f"no hello within {self.limits.hello_timeout:g} s") from None
        header = Frame.parse(data).header
        if header["t"] != Kind.HELLO:
            raise _Refusal("protocol", f"the first frame must be a hello, got {header['t']!r}")
        version = header.get("protocol")
        if version != PROTOCOL_VERSION:
            raise _Refusal("protocol", f"this relay speaks fedmagic protocol {PROTOCOL_VERSION} "
                           f"but the client speaks {version!r}; install the same fedmagic "
                           "version on every node")
        if header.get("role") not in ("initiator", "participant"):
            raise _Refusal("protocol", "role must be 'initiator' or 'participant'")
        for key in ("task", "token"):
            if not isinstance(header.get(key), str) or not header[key]:
                raise _Refusal("protocol", f"hello needs a non-empty string {key!r}")
        wait = header.get("wait")
        if wait is not None and (isinstance(wait, bool) or not isinstance(wait, (int, float))
                                 or not math.isfinite(wait)):
            raise _Refusal("protocol", "'wait' must be a finite number of seconds")
        if header["role"] == "participant":
            node = header.get("node")
            if not isinstance(node, str) or not node or node.startswith("@") or len(node) > 128:
                raise _Refusal("protocol", "a participant needs a node name of 1 to 128 "
                               "characters, not starting with '@'")
        return header

    async def _serve_initiator(self, connection: ServerConnection,
                               hello: dict[str, Any]) -> None:
        task_id = hello["task"]
        if self.token is not None and not _same(hello.get("relay_token"), self.token):
            raise _Refusal("relay_token", "wrong or missing relay token: pass the token the "
                           "relay's operator gave you (FEDMAGIC_RELAY_TOKEN)")
        if task_id in self.tasks:
            raise _Refusal("task_exists", f"task {task_id!r} is already running on this "
                           "relay; stop it first or pick another task id")
        if len(self.tasks) >= self.limits.max_tasks:
            raise _Refusal("busy", f"the relay already runs {len(self.tasks)} tasks")
        task = _Task(task_id, hello["token"], connection)
        self.tasks[task_id] = task
        waiting = self._waiting.pop(task_id, None)
        if waiting is not None:
            waiting.event.set()
        log.info("task %r created by %s", task_id, _address(connection))
        try:
            await connection.send(Frame({"t": Kind.WELCOME, "task": task_id,
                                         "protocol": PROTOCOL_VERSION}).serialize())
            async for to, out in self._incoming(connection, INITIATOR):
                targets = self._targets(task, to)
                await asyncio.gather(*(_send(target, out) for target in targets))
        finally:
            del self.tasks[task_id]
            log.info("task %r closed", task_id)
            # Forget the participants first: nobody is left to hear their peer_left.
            participants = list(task.participants.values())
            task.participants.clear()
            closed = Frame({"t": Kind.TASK_CLOSED, "task": task_id}).serialize()
            await asyncio.gather(*(_close_task(participant, closed)
                                   for participant in participants))

    async def _incoming(self, connection: ServerConnection,
                        sender: str) -> AsyncIterator[tuple[Any, bytes]]:
        """A client's frames to forward: rate-limited, checked, stamped with the sender.

        Yields:
            the frame's ``to`` field and the frame to forward, serialized.
        """
        limit = _RateLimit(self.limits.max_frames_per_second)
        async for data in connection:
            if not limit.take():
                raise _Refusal("rate", "more than "
                               f"{self.limits.max_frames_per_second:g} frames per second")
            frame = _parse_forwarded(data)
            to = frame.header.pop("to", None)
            frame.header["from"] = sender
            yield to, Frame(frame.header, frame.payload).serialize()

    async def _wait_for_task(self, connection: ServerConnection, task_id: str,
                             wait: float) -> bool:
        """Hold a participant until its task starts; False if it hung up first.

        Raises:
            _Refusal: if the task did not start within ``wait`` seconds.
        """
        waiting = self._waiting.setdefault(task_id, _Waiting())
        waiting.count += 1
        created = asyncio.ensure_future(waiting.event.wait())
        closed = asyncio.ensure_future(connection.wait_closed())
        try:
            await asyncio.wait((created, closed), timeout=wait,
                               return_when=asyncio.FIRST_COMPLETED)
        finally:
            created.cancel()
            closed.cancel()
            waiting.count -= 1
            if not waiting.count and self._waiting.get(task_id) is waiting:
                del self._waiting[task_id]  # nobody waits: forget the task id
        if waiting.event.is_set():
            return True
        if closed.done() and not closed.cancelled():
            return False
        raise _Refusal("unknown_task", f"task {task_id!r} did not start within {wait:g} s; "
                       "start the task first, or join with a longer wait")

    def _targets(self, task: _Task, to: Any) -> list[ServerConnection]:
        if to == "*":
            return list(task.participants.values())
        if not isinstance(to, list) or not all(isinstance(node, str) for node in to):
            raise CodecError("an initiator's frame needs 'to': a list of node names or '*'")
        return [task.participants[node] for node in to if node in task.participants]

    async def _serve_participant(self, connection: ServerConnection,
                                 hello: dict[str, Any]) -> None:
        task_id, node = hello["task"], hello["node"]
        task = self.tasks.get(task_id)
        if task is None:
            wait = min(float(hello.get("wait") or 0), self.limits.max_join_wait)
            if wait <= 0:
                raise _Refusal("unknown_task", f"no task {task_id!r} on this relay; check the "
                               "task id, or wait for the initiator to launch it")
            log.info("%r is waiting up to %g s for task %r", node, wait, task_id)
            if not await self._wait_for_task(connection, task_id, wait):
                return  # the participant hung up (or the relay is closing) while waiting
            task = self.tasks.get(task_id)
            if task is None:
                raise _Refusal("unknown_task", f"task {task_id!r} ended before it could be joined")
        if not _same(hello["token"], task.join_token):
            raise _Refusal("join_token", f"wrong join token for task {task_id!r}; copy the "
                           "join line the task's author shared")
        if node in task.participants:
            raise _Refusal("node_taken", f"a node named {node!r} already joined task "
                           f"{task_id!r}; pick another --node name")
        if len(task.participants) >= self.limits.max_participants:
            raise _Refusal("busy", f"task {task_id!r} already has "
                           f"{len(task.participants)} participants")
        task.participants[node] = connection
        log.info("%r joined task %r from %s", node, task_id, _address(connection))
        try:
            await connection.send(Frame({"t": Kind.WELCOME, "task": task_id, "node": node,
                                         "protocol": PROTOCOL_VERSION}).serialize())
            await _send(task.initiator, Frame({"t": Kind.PEER_JOINED, "from": node}).serialize())
            async for _, out in self._incoming(connection, node):
                await _send(task.initiator, out)
        finally:
            if task.participants.get(node) is connection:
                del task.participants[node]
                await _send(task.initiator, Frame({"t": Kind.PEER_LEFT, "from": node}).serialize())
                log.info("%r left task %r", node, task_id)


def _parse_forwarded(data: bytes) -> Frame:
    """Parse a frame a client wants forwarded; only the relay speaks for the relay.

    Raises:
        CodecError: if ``data`` is not a frame.
        _Refusal: if it is a kind only the relay may send.
    """
    frame = Frame.parse(data)
    if frame.kind in RELAY_KINDS:
        raise _Refusal("protocol", f"{frame.kind!r} frames come from the relay only; "
                       "clients may not send them")
    return frame


async def _send(connection: ServerConnection, data: bytes) -> None:
    """Send, ignoring a peer that has gone: its own handler cleans up."""
    try:
        await connection.send(data)
    except ConnectionClosed:
        pass


async def _close_task(participant: ServerConnection, closed: bytes) -> None:
    """Tell a participant its task is over, then close it; its handler keeps reading."""
    await _send(participant, closed)
    await participant.close(1001, "task closed")


async def _refuse(connection: ServerConnection, code: str, message: str) -> None:
    """Send an ``error`` frame, then close, discarding whatever the client still sends.

    Nothing reads a refused connection any more; with its incoming queue full
    websockets would stop reading, miss the client's close frame and hold both
    ends for ``close_timeout``.
    """
    try:
        await connection.send(Frame({"t": Kind.ERROR, "code": code,
                                     "message": message}).serialize())
    except ConnectionClosed:
        return
    discard = asyncio.ensure_future(_discard(connection))
    try:
        reason = message.encode()[:MAX_CLOSE_REASON_BYTES].decode(errors="ignore")
        await connection.close(POLICY_VIOLATION, reason)
    finally:
        discard.cancel()


async def _discard(connection: ServerConnection) -> None:
    try:
        while True:
            await connection.recv()
    except ConnectionClosed:
        pass


def _same(given: Any, secret: str) -> bool:
    return isinstance(given, str) and hmac.compare_digest(given.encode(), secret.encode())


def _address(connection: ServerConnection) -> str:
    address = connection.remote_address
    return f"{address[0]}:{address[1]}" if address else "?"


def _server_options(relay: Relay) -> dict[str, Any]:
    return {
        "compression": None,
        "max_size": relay.limits.max_frame_bytes,
        "max_queue": 4,
        "ping_interval": relay.limits.ping_interval,
        "ping_timeout": relay.limits.ping_timeout,
        "write_limit": 4 << 20,
    }


def ssl_context(certfile: str | None, keyfile: str | None) -> ssl_module.SSLContext | None:
    """A server TLS context for ``wss://``, or None for plain ``ws://``."""
    if not certfile:
        return None
    context = ssl_module.SSLContext(ssl_module.PROTOCOL_TLS_SERVER)
    context.load_cert_chain(certfile, keyfile)
    return context


async def serve_relay(relay: Relay, host: str, port: int, *,
                      ssl: ssl_module.SSLContext | None = None) -> Server:
    """Start listening; the caller closes the returned server."""
    return await serve(relay.handle, host, port, ssl=ssl, **_server_options(relay))


class EmbeddedRelay:
    """A relay on a thread of its own, for a program that also runs a task.

    Its own thread and event loop keep it forwarding while the program's
    loop is busy, or blocked in user code.
    """

    def __init__(self, host: str = "127.0.0.1", port: int = DEFAULT_PORT,
                 relay: Relay | None = None) -> None:
        self.relay = relay or Relay()
        self.host = host
        self.port = port
        self._loop = asyncio.new_event_loop()
        self._server: Server | None = None
        self._thread = threading.Thread(target=self._loop.run_forever,
                                        name="fedmagic-relay", daemon=True)

    @property
    def url(self) -> str:
        return f"ws://{self.host}:{self.port}"

    def start(self) -> EmbeddedRelay:
        """Listen, or raise ``OSError`` (port in use, say) before returning."""
        self._thread.start()
        future = asyncio.run_coroutine_threadsafe(
            serve_relay(self.relay, self.host, self.port), self._loop)
        try:
            self._server = future.result()
        except BaseException:
            self._loop.call_soon_threadsafe(self._loop.stop)
            self._thread.join()
            self._loop.close()
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

        asyncio.run_coroutine_threadsafe(close(), self._loop).result(timeout=30)
        self._loop.call_soon_threadsafe(self._loop.stop)
        self._thread.join()
        self._loop.close()

    def __enter__(self) -> EmbeddedRelay:
        return self.start()

    def __exit__(self, *exc_info: object) -> None:
        self.stop()
