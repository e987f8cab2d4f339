"""A client's connection to the relay, for an initiator or a participant."""

from __future__ import annotations

import asyncio
import random
import ssl as ssl_module
import time
from typing import TYPE_CHECKING, Any, Sequence

from websockets.asyncio.client import ClientConnection, connect
from websockets.exceptions import ConcurrencyError, ConnectionClosed, InvalidHandshake, InvalidURI

from ..errors import ConnectionLost, RelayRefused
from .frames import CHUNK_BYTES, MAX_HEADER_BYTES, Frame, Kind
from .messages import Refusal
from .routing import hello_header
from .transport import Transport

if TYPE_CHECKING:
    pass

__all__ = ["Link"]

#: The first and the longest pause between attempts to reach a relay that is not up.
RETRY_DELAY = 0.25
MAX_RETRY_DELAY = 2.0
#: How long to wait before asking a busy relay again.
BUSY_RETRY_DELAY = 2.0
#: Refusals worth asking again while ``wait`` lasts: a full relay, a task not started yet.
RETRYABLE = frozenset({Refusal.BUSY, Refusal.UNKNOWN_TASK})
#: How long a relay may take to answer a hello, beyond the time a participant waits.
WELCOME_TIMEOUT = 30.0
#: Seconds between pings, without a pong before the relay counts as gone, and
#: for it to answer a close frame: a dead relay is noticed within their sum.
PING_INTERVAL = 5.0
PING_TIMEOUT = 12.0
CLOSE_TIMEOUT = 3.0


class Link(Transport):
    """One authenticated connection to a relay, over a websocket."""

    def __init__(self, connection: ClientConnection, url: str, welcome: Frame) -> None:
        self.connection = connection
        self.url = url
        self.welcome = welcome
        # What ``reopen`` says and connects with: this link's own hello and options.
        self._hello: dict[str, Any] = {}
        self._options: dict[str, Any] = {}

    @classmethod
    async def open(
        cls,
        url: str,
        *,
        role: str,
        task: str,
        token: str,
        node: str | None = None,
        relay_token: str | None = None,
        wait: float = 0.0,
        ssl: ssl_module.SSLContext | None = None,
        session: str | None = None,
        allowed_nodes: Sequence[str] | None = None,
        max_frame_bytes: int = CHUNK_BYTES + MAX_HEADER_BYTES + 1024,
        ping_interval: float | None = PING_INTERVAL,
        ping_timeout: float | None = PING_TIMEOUT,
    ) -> Link:
        """Connect and say hello.

        Args:
            wait: for this many seconds, keep trying while the relay is not
                up yet or is busy, and (participants) while the task has not
                started: the relay holds the connection for a while, then
                this asks again.
            session: a participant's ``Link.session`` from an earlier
                connection: it replaces that connection if the relay still
                holds it (a restarted node), and keeps the session after a
                relay restart.
            allowed_nodes: an initiator's list of the only node names the
                relay may admit to the task; None admits any node with the
                join token.

        Raises:
            RelayRefused: if the relay is unreachable or says no.
        """
        if ssl is None and url.startswith("wss://"):
            ssl = ssl_module.create_default_context()  # the system's trust ($SSL_CERT_FILE)
        said = hello_header(
            role=role,
            task=task,
            token=token,
            node=node,
            relay_token=relay_token,
            session=session,
            allowed_nodes=allowed_nodes,
        )
        options = {
            "ssl": ssl,
            "compression": None,
            "proxy": None,
            "max_size": max_frame_bytes,
            "max_queue": 4,
            "ping_interval": ping_interval,
            "ping_timeout": ping_timeout,
            "close_timeout": CLOSE_TIMEOUT,
            "write_limit": 4 << 20,
            "open_timeout": 10,
        }
        return await cls._connect(url, said, wait, options)

    async def _hello_again(self, hello: dict[str, Any], wait: float) -> Link:
        # Asked again, backing off: a relay shutting down may close before it answers, and one
        # that has not yet noticed the initiator's old connection is gone still holds its task.
        return await self._connect(
            self.url,
            hello,
            wait,
            self._options,
            retry=RETRYABLE | {Refusal.CLOSED, Refusal.TASK_EXISTS},
        )

    @classmethod
    async def _connect(
        cls,
        url: str,
        hello: dict[str, Any],
        wait: float,
        options: dict[str, Any],
        retry: frozenset[str] = RETRYABLE,
    ) -> Link:
        """Say hello until welcomed, asking again while the relay is busy or the task not there."""
        deadline = time.monotonic() + wait
        while True:
            try:
                link = await cls._attempt(url, hello, deadline, options)
            except RelayRefused as refusal:
                delay = BUSY_RETRY_DELAY if refusal.code == Refusal.BUSY else RETRY_DELAY
                if refusal.code not in retry or time.monotonic() + delay >= deadline:
                    raise
                await asyncio.sleep(delay)
                continue
            link._hello, link._options = hello, options
            return link

    @classmethod
    async def _attempt(
        cls, url: str, hello: dict[str, Any], deadline: float, options: dict[str, Any]
    ) -> Link:
        """Connect (trying until ``deadline``, backing off) and say hello once."""
        delay = RETRY_DELAY
        while True:
            try:
                connection = await connect(url, **options)
                break
            except InvalidURI as exc:
                raise RelayRefused(
                    Refusal.BAD_URL, f"{exc}; use ws://HOST:PORT or wss://HOST:PORT", url
                ) from None
            except (OSError, InvalidHandshake, asyncio.TimeoutError) as exc:
                if time.monotonic() >= deadline:
                    raise RelayRefused(
                        Refusal.UNREACHABLE,
                        f"cannot connect ({exc or type(exc)}); is "
                        "the relay running at that address?",
                        url,
                    ) from None
                # Jittered, so a relay coming back is not hit by every node at once.
                await asyncio.sleep(
                    min(delay * random.uniform(0.5, 1.0), max(deadline - time.monotonic(), 0))
                )
                delay = min(delay * 2, MAX_RETRY_DELAY)
        if deadline > time.monotonic():
            hello = {**hello, "wait": max(deadline - time.monotonic(), 0.001)}
        link = cls(connection, url, Frame({"t": Kind.HELLO}))
        try:
            try:
                await connection.send(Frame(hello).serialize())
            except ConnectionClosed:
                pass  # a busy relay says why at once and closes: its error frame is queued
            answer_within = max(deadline - time.monotonic(), 0) + WELCOME_TIMEOUT
            try:
                reply = await asyncio.wait_for(link.recv(), answer_within)
            except asyncio.TimeoutError:
                raise RelayRefused(
                    Refusal.TIMEOUT,
                    f"no answer to the hello within "
                    f"{answer_within:.0f} s; is that a fedmagic relay?",
                    url,
                ) from None
            if reply.kind == Kind.ERROR:
                raise RelayRefused(
                    str(reply.header.get("code")), str(reply.header.get("message")), url
                )
            if reply.kind != Kind.WELCOME:
                raise RelayRefused(Refusal.PROTOCOL, f"expected a welcome, got {reply.kind!r}", url)
        except ConnectionLost as exc:
            raise RelayRefused(Refusal.CLOSED, exc.detail, url) from None
        except BaseException:
            await link.close()
            raise
        link.welcome = reply
        return link

    async def send(self, frame: Frame) -> None:
        try:
            await self.connection.send(frame.serialize())
        except ConnectionClosed as exc:
            raise ConnectionLost(self.url, _why(exc)) from None

    async def recv(self) -> Frame:
        """The next frame; an ``error`` frame from the relay is raised.

        Raises:
            ConnectionLost: if the connection closed.
            RelayRefused: if the relay sent an error.
        """
        try:
            data = await self.connection.recv()
        except ConnectionClosed as exc:
            raise ConnectionLost(self.url, _why(exc)) from None
        frame = Frame.parse(data)
        if frame.kind == Kind.ERROR and self.welcome.kind == Kind.WELCOME:
            raise RelayRefused(
                str(frame.header.get("code")), str(frame.header.get("message")), self.url
            )
        return frame

    async def close(self) -> None:
        """Close, discarding frames nobody read.

        With its incoming queue full, websockets stops reading, misses the
        relay's close frame and waits ``close_timeout`` (10 s) before giving up.
        """
        discard = asyncio.ensure_future(_discard(self.connection))
        try:
            await self.connection.close()
        finally:
            discard.cancel()


async def _discard(connection: ClientConnection) -> None:
    while True:
        try:
            await connection.recv()
        except ConcurrencyError:  # a cancelled recv() elsewhere is still unwinding
            await asyncio.sleep(0.01)
        except ConnectionClosed:
            return


def _why(exc: ConnectionClosed) -> str:
    close = exc.rcvd or exc.sent
    if close is None:
        return "the connection dropped without a closing handshake"
    reason = f": {close.reason}" if close.reason else ""
    return f"closed with code {close.code}{reason}"
