"""How a relay routes, whatever carries its frames: the relay's protocol without I/O.

A :class:`Router` keeps the tasks (each one initiator and its participants),
checks hellos, admits or refuses each party, and says who hears what: the
welcomes, a peer joining or leaving, a task closing, and every forwarded
frame, stamped with its sender. It sends nothing itself. The websocket relay
(:mod:`fedmagic.wire.relay`) drives it from connections, the in-memory relay
(:mod:`fedmagic.wire.memory`) from queues, so both route alike; as the
websockets library keeps its protocol apart from its asyncio layer.
"""

from __future__ import annotations

import collections
import hmac
import math
import secrets
import string
from dataclasses import dataclass, field
from typing import Any, Generic, Protocol, Sequence, TypeVar

from ..errors import CodecError
from .frames import CHUNK_BYTES, INITIATOR, MAX_HEADER_BYTES, PROTOCOL_VERSION, Frame, Kind
from .messages import Refusal

__all__ = ["DEFAULT_LIMITS", "Party", "Refused", "RelayLimits", "Router", "Task", "hello_header"]

MAX_NAME_CHARS = 128
#: Kinds only the relay may send; a client sending one would speak for the relay.
RELAY_KINDS = frozenset(
    {Kind.HELLO, Kind.WELCOME, Kind.ERROR, Kind.PEER_JOINED, Kind.PEER_LEFT, Kind.TASK_CLOSED}
)
#: Task ids remembered as having run here; joins for them may wait the longest.
SEEN_TASKS = 4096


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


#: The limits a relay keeps unless its operator sets others.
DEFAULT_LIMITS = RelayLimits()


class Refused(Exception):
    """Why a party is refused; ``flood`` names refusals that come in floods (for the log)."""

    def __init__(self, code: Refusal, message: str, flood: str | None = None) -> None:
        super().__init__(code, message)
        self.code = code
        self.message = message
        self.flood = flood


class Party(Protocol):
    """A connected party as the router knows it: its name (``@initiator``) and session."""

    @property
    def name(self) -> str: ...

    @property
    def session(self) -> str | None: ...


P = TypeVar("P", bound=Party)
#: A frame for one party: the driver delivers it in this order.
Send = tuple[P, Frame]


@dataclass(eq=False)
class Task(Generic[P]):
    """One task on the relay: its initiator, who may join it, and who has."""

    task_id: str
    join_token: str
    initiator: P
    allowed_nodes: frozenset[str] | None
    participants: dict[str, P] = field(default_factory=dict)


def hello_header(
    *,
    role: str,
    task: str,
    token: str,
    node: str | None = None,
    relay_token: str | None = None,
    session: str | None = None,
    allowed_nodes: Sequence[str] | None = None,
) -> dict[str, Any]:
    """The hello a party says first, with only the fields it has."""
    header: dict[str, Any] = {
        "t": Kind.HELLO,
        "protocol": PROTOCOL_VERSION,
        "role": role,
        "task": task,
        "token": token,
    }
    if node is not None:
        header["node"] = node
    if relay_token is not None:
        header["relay_token"] = relay_token
    if session is not None:
        header["session"] = session
    if allowed_nodes is not None:
        header["allowed_nodes"] = list(allowed_nodes)
    return header


class Router(Generic[P]):
    """The tasks of one relay, and who each frame goes to.

    Args:
        token: if set, initiators must present it to create a task.
        limits: what clients may make the relay do (the router keeps those
            of tasks and joins; the driver those of connections).
    """

    def __init__(self, token: str | None = None, limits: RelayLimits = DEFAULT_LIMITS) -> None:
        self.token = token
        self.limits = limits
        self.tasks: dict[str, Task[P]] = {}
        self._seen: collections.OrderedDict[str, None] = collections.OrderedDict()

    def read_hello(self, data: bytes | str) -> dict[str, Any]:
        """A party's first frame, checked.

        Raises:
            CodecError: if ``data`` is not a frame.
            Refused: if it is not a well-formed hello in this relay's protocol.
        """
        header = Frame.parse(data).header
        if header["t"] != Kind.HELLO:
            raise Refused(Refusal.PROTOCOL, f"the first frame must be a hello, got {header['t']!r}")
        version = header.get("protocol")
        if version != PROTOCOL_VERSION:
            raise Refused(
                Refusal.PROTOCOL,
                f"this relay speaks fedmagic protocol {PROTOCOL_VERSION} "
                f"but the client speaks {version!r}; install the same fedmagic "
                "version on every node",
            )
        if header.get("role") not in ("initiator", "participant"):
            raise Refused(Refusal.PROTOCOL, "role must be 'initiator' or 'participant'")
        for key in ("task", "token"):
            if not isinstance(header.get(key), str) or not header[key]:
                raise Refused(Refusal.PROTOCOL, f"hello needs a non-empty string {key!r}")
        wait = header.get("wait")
        if wait is not None and (
            isinstance(wait, bool) or not isinstance(wait, (int, float)) or not math.isfinite(wait)
        ):
            raise Refused(Refusal.PROTOCOL, "'wait' must be a finite number of seconds")
        if header["role"] == "participant":
            if not _is_node_name(header.get("node")):
                raise Refused(
                    Refusal.PROTOCOL,
                    f"a participant needs a node name of 1 to "
                    f"{MAX_NAME_CHARS} characters, not starting with '@'",
                )
            if not _is_hex(header.get("session", "0")):
                raise Refused(
                    Refusal.PROTOCOL,
                    "'session' must be the hex string a relay's "
                    "welcome gave this node (Link.session)",
                )
            if not _is_hex(header.get("accepted", "0")):
                raise Refused(
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
                raise Refused(
                    Refusal.PROTOCOL,
                    f"'allowed_nodes' must be a list of at most "
                    f"{self.limits.max_participants} node names",
                )
        return header

    def admit_initiator(self, hello: dict[str, Any]) -> None:
        """Whether an initiator's hello may create its task.

        Raises:
            Refused: wrong relay token, a task of that id running, or too many tasks.
        """
        task_id = hello["task"]
        if self.token is not None and not _same(hello.get("relay_token"), self.token):
            raise Refused(
                Refusal.RELAY_TOKEN,
                "wrong or missing relay token: pass the token the "
                "relay's operator gave you (FEDMAGIC_RELAY_TOKEN)",
            )
        if task_id in self.tasks:
            raise Refused(
                Refusal.TASK_EXISTS,
                f"task {task_id!r} is already running on this "
                "relay; stop it first or pick another task id",
            )
        if len(self.tasks) >= self.limits.max_tasks:
            raise Refused(
                Refusal.BUSY,
                f"relay busy: it already runs {len(self.tasks)} tasks, its limit; try again later",
            )

    def open_task(self, hello: dict[str, Any], initiator: P) -> tuple[Task[P], list[Send[P]]]:
        """Create the task an admitted initiator's hello names.

        Returns:
            the task, and the initiator's welcome.
        """
        task_id = hello["task"]
        allowed = hello.get("allowed_nodes")
        allowed_nodes = None if allowed is None else frozenset(allowed)
        task = Task(task_id, hello["token"], initiator, allowed_nodes)
        self.tasks[task_id] = task
        self._seen[task_id] = None
        self._seen.move_to_end(task_id)
        if len(self._seen) > SEEN_TASKS:
            self._seen.popitem(last=False)
        welcome = Frame({"t": Kind.WELCOME, "task": task_id, "protocol": PROTOCOL_VERSION})
        return task, [(initiator, welcome)]

    def unknown_task(self, task_id: str) -> Refused:
        """The refusal of a join for a task not running here, once no wait is left."""
        return Refused(
            Refusal.UNKNOWN_TASK,
            f"no task {task_id!r} on this relay; check the "
            "task id, or wait for the initiator to launch it",
        )

    def join_wait(self, task_id: str, wanted: Any) -> float:
        """How long a participant may wait for ``task_id``: shorter for one never seen."""
        cap = self.limits.max_join_wait
        if task_id not in self._seen:
            cap = min(cap, self.limits.max_unknown_task_wait)
        return min(float(wanted or 0), cap)

    def admit_participant(self, task: Task[P], hello: dict[str, Any]) -> str:
        """Whether a participant's hello may join ``task``.

        Returns:
            its session: the one it presented to take its name back, or a new one.

        Raises:
            Refused: wrong join token, a node the task does not admit, a name
                another connected node holds, or the task full.
        """
        task_id, node = task.task_id, hello["node"]
        if not _same(hello["token"], task.join_token):
            raise Refused(
                Refusal.JOIN_TOKEN,
                f"wrong join token for task {task_id!r}; copy the "
                "join line the task's author shared",
            )
        if task.allowed_nodes is not None and node not in task.allowed_nodes:
            raise Refused(
                Refusal.NODE_NOT_ALLOWED,
                f"task {task_id!r} admits only the nodes its "
                f"author named, and {node!r} is not one of them; ask the task's "
                "author to add it, or check the --node name",
            )
        session = hello.get("session")
        stale = task.participants.get(node)
        if stale is not None and not _same(session, stale.session or ""):
            raise Refused(
                Refusal.NODE_TAKEN,
                f"the name {node!r} is in use by a connected node of "
                f"task {task_id!r}; pick another --node name, or, if this is that "
                "node restarting, present its session (the one its welcome gave)",
            )
        if stale is None and len(task.participants) >= self.limits.max_participants:
            raise Refused(
                Refusal.BUSY,
                f"relay busy: task {task_id!r} already has "
                f"{len(task.participants)} participants, its limit; a place frees when one "
                "leaves, or the relay's operator raises it (fedmagic relay --max-participants)",
            )
        return session or secrets.token_hex(16)

    def join(
        self, task: Task[P], peer: P, session: str, hello: dict[str, Any]
    ) -> tuple[P | None, list[Send[P]]]:
        """Seat an admitted participant, in place of its stale connection if any.

        ``session`` is what ``admit_participant`` returned, which its welcome gives.

        Returns:
            the stale connection it replaces (for the driver to close), and
            the frames to deliver: the stale one's ``peer_left``, the
            welcome, and the initiator's ``peer_joined`` (with the code a
            node coming back consented to: nobody consents twice).
        """
        stale = task.participants.get(peer.name)
        sends = self.leave(task, stale) if stale is not None else []
        task.participants[peer.name] = peer
        welcome = {
            "t": Kind.WELCOME,
            "task": task.task_id,
            "node": peer.name,
            "session": session,
            "protocol": PROTOCOL_VERSION,
        }
        joined = {"t": Kind.PEER_JOINED, "from": peer.name}
        if "accepted" in hello:
            joined["accepted"] = hello["accepted"]
        sends += [(peer, Frame(welcome)), (task.initiator, Frame(joined))]
        return stale, sends

    def leave(self, task: Task[P], peer: P) -> list[Send[P]]:
        """Forget a participant: the initiator's ``peer_left``, once (none if it already left)."""
        if task.participants.get(peer.name) is not peer:
            return []
        del task.participants[peer.name]
        return [(task.initiator, Frame({"t": Kind.PEER_LEFT, "from": peer.name}))]

    def close_task(self, task: Task[P]) -> list[Send[P]]:
        """End a task: each participant's ``task_closed``; nobody is left to hear a peer_left."""
        if self.tasks.get(task.task_id) is task:
            del self.tasks[task.task_id]
        participants = list(task.participants.values())
        task.participants.clear()
        closed = Frame({"t": Kind.TASK_CLOSED, "task": task.task_id})
        return [(participant, closed) for participant in participants]

    def route(self, task: Task[P], sender: P, data: bytes | str) -> tuple[Frame, list[P]]:
        """A frame a party sent: stamped with its sender, and who it goes to.

        The initiator names participants in ``to`` (a list, or ``"*"`` for
        all); a participant's frame goes to its initiator, or to the nodes
        it names (``@initiator`` among them). Names not in the task are
        passed over: they may have just left.

        Raises:
            CodecError: if ``data`` is not a frame, or ``to`` is malformed.
            Refused: if it is a kind only the relay may send.
        """
        frame = Frame.parse(data)
        if frame.kind in RELAY_KINDS:
            raise Refused(
                Refusal.PROTOCOL,
                f"{frame.kind!r} frames come from the relay only; clients may not send them",
            )
        to = frame.header.pop("to", None)
        frame.header["from"] = sender.name
        participants = task.participants
        if sender is task.initiator:
            if to == "*":
                return frame, list(participants.values())
            if not _names(to):
                raise CodecError("an initiator's frame needs 'to': a list of node names or '*'")
            return frame, [participants[node] for node in to if node in participants]
        if to is None:
            return frame, [task.initiator]
        if not _names(to):
            raise CodecError("a participant's 'to' must be a list of node names")
        return frame, [
            task.initiator if node == INITIATOR else participants[node]
            for node in to
            if node == INITIATOR or node in participants
        ]


def _names(to: Any) -> bool:
    return isinstance(to, list) and all(isinstance(node, str) for node in to)


def _is_node_name(node: Any) -> bool:
    return isinstance(node, str) and 0 < len(node) <= MAX_NAME_CHARS and not node.startswith("@")


def _is_hex(text: Any) -> bool:
    return (
        isinstance(text, str)
        and 0 < len(text) <= MAX_NAME_CHARS
        and all(char in string.hexdigits for char in text)
    )


def _same(given: Any, secret: str) -> bool:
    return isinstance(given, str) and hmac.compare_digest(given.encode(), secret.encode())
