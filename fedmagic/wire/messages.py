"""Every message of a task's conversation, as typed records, and the relay's refusal codes.

The initiator and its participants talk through the relay in frames whose
header says what they are; this module is where each kind's fields are
written down, once. A record becomes a frame with :meth:`Message.to_frame`
and comes back with :func:`parse`, which checks every field's type and
refuses a malformed one with a :class:`~fedmagic.errors.ProtocolError` that
names the kind, the field and the sender. Tensors (``state``, ``state_end``)
and the task's code (``task``) travel in frames of their own, read by
:mod:`fedmagic.wire.codec` and the task package.
"""

from __future__ import annotations

import dataclasses
import enum
import functools
import types
import typing
from dataclasses import dataclass
from typing import Any, ClassVar

from ..errors import ProtocolError
from .frames import Frame, Kind

__all__ = [
    "Aggregate",
    "Aggregated",
    "Evaluate",
    "Evaluated",
    "Failed",
    "Finish",
    "LeftOut",
    "Message",
    "PeerJoined",
    "PeerLeft",
    "Progress",
    "Refusal",
    "Round",
    "Secure",
    "Status",
    "TaskClosed",
    "Trained",
    "Upload",
    "parse",
    "sender",
]


class Refusal(enum.StrEnum):
    """Why a relay (or a link, before reaching one) refused a connection."""

    BUSY = "busy"  # at its limit of connections, waiting joins or tasks: ask again later
    UNKNOWN_TASK = "unknown_task"  # no such task (yet)
    TASK_EXISTS = "task_exists"
    JOIN_TOKEN = "join_token"
    RELAY_TOKEN = "relay_token"
    NODE_TAKEN = "node_taken"
    NODE_NOT_ALLOWED = "node_not_allowed"
    PROTOCOL = "protocol"  # a malformed hello or frame, or another protocol version
    RATE = "rate"  # over the frame rate
    TIMEOUT = "timeout"  # no hello, or no answer to one, in time
    # Said by the link itself:
    UNREACHABLE = "unreachable"
    CLOSED = "closed"
    BAD_URL = "bad_url"


@dataclass(frozen=True)
class Message:
    """One message; subclasses name their frame kind and declare their fields."""

    KIND: ClassVar[str]

    def to_frame(self, to: list[str] | str | None = None) -> Frame:
        """The frame that carries this message; ``to``: its addressees (an initiator's, or
        a participant's other than the initiator, which the relay sends to by default)."""
        header: dict[str, Any] = {"t": self.KIND}
        for item in dataclasses.fields(self):
            value = getattr(self, item.name)
            if value is not None:
                header[_WIRE_NAMES.get(item.name, item.name)] = value
        if to is not None:
            header["to"] = to
        return Frame(header)


@dataclass(frozen=True)
class Round(Message):
    """Initiator to the round's participants: train on the weights that follow."""

    KIND = Kind.ROUND
    round: int
    epochs: int | None = None
    #: There is room for every update: upload straight after training, unasked.
    upload: bool = False
    #: What the task's strategy tells this node for the round (FedProx's ``mu``, say).
    config: dict | None = None
    #: With ``is_centralized=False``: the node elected to aggregate the round, which
    #: updates (and ``trained``) go to instead of the initiator.
    aggregator: str | None = None


@dataclass(frozen=True)
class Upload(Message):
    """Initiator to participants: there is room now for your update of this round."""

    KIND = Kind.UPLOAD
    round: int


@dataclass(frozen=True)
class Progress(Message):
    """Participant to initiator: an epoch of this round's training is done."""

    KIND = Kind.PROGRESS
    round: int
    epoch: int
    epochs: int


@dataclass(frozen=True)
class Trained(Message):
    """Participant to initiator: training this round is done."""

    KIND = Kind.TRAINED
    round: int
    samples: int | None = None
    seconds: float | None = None
    #: What this node's DP-SGD spent so far, where the task trains privately.
    epsilon: float | None = None


@dataclass(frozen=True)
class Failed(Message):
    """Participant to initiator: the task's own code raised."""

    KIND = Kind.FAILED
    round: int | None
    during: str
    error: str
    traceback: str = ""


@dataclass(frozen=True)
class Status(Message):
    """Participant to initiator: consent and data verification."""

    KIND = Kind.STATUS
    #: "declined" or "verified".
    stage: str
    ok: bool | None = None
    samples: int | None = None
    detail: str = ""
    traceback: str = ""
    #: Examples of this node's own test data, which it can evaluate the global model on.
    test_samples: int | None = None


@dataclass(frozen=True)
class Evaluate(Message):
    """Initiator to participants: test the global model that follows on your own data."""

    KIND = Kind.EVALUATE
    round: int


@dataclass(frozen=True)
class Evaluated(Message):
    """Participant to initiator: the global model's ``test()`` metrics on its own data."""

    KIND = Kind.EVALUATED
    round: int
    examples: int
    metrics: dict
    #: What ``test()`` raised instead, if it did.
    error: str = ""


@dataclass(frozen=True)
class Aggregate(Message):
    """Initiator to the round's elected aggregator: collect and combine these nodes' updates.

    ``samples`` holds each node's training samples, as the initiator verified
    them, which weigh its update; the aggregator runs the round's uploads under
    the same deadlines and memory budget the initiator would.
    """

    KIND = Kind.AGGREGATE
    round: int
    samples: dict
    slots: int
    upload_seconds: float
    calculation_timeout: float


@dataclass(frozen=True)
class LeftOut(Message):
    """Initiator to the round's aggregator: this node is out of the round; do not wait for it."""

    KIND = Kind.LEFT_OUT
    round: int
    #: The node left out (``node`` names a message's sender).
    left: str
    reason: str


@dataclass(frozen=True)
class Aggregated(Message):
    """Aggregator to initiator: the round's combined updates follow, as a state.

    ``outcomes`` maps each node of the round to ``[status, detail]``: whether
    its update was folded in, refused (and why) or missed a deadline.
    """

    KIND = Kind.AGGREGATED
    round: int
    outcomes: dict
    #: Samples behind the updates folded in.
    samples: int
    #: How many updates were folded in; 0: no state follows.
    count: int


@dataclass(frozen=True)
class Secure(Message):
    """A stage of a secure round's SecAgg+ protocol, between the initiator and one participant.

    The initiator sends ``setup``, ``keys``, ``shares`` and ``unmask``; a
    participant answers ``advertise``, ``share`` and ``reveal`` (or
    ``abort``, saying why it cannot go on). ``body`` is the stage's message,
    as :mod:`fedmagic.strategies.secagg` writes and checks it; the masked
    update itself travels as a state.
    """

    KIND = Kind.SECURE
    round: int
    stage: str
    body: dict


@dataclass(frozen=True)
class Finish(Message):
    """Initiator to everyone: the task is over."""

    KIND = Kind.FINISH
    ok: bool
    reason: str


@dataclass(frozen=True)
class PeerJoined(Message):
    """Relay to initiator: a participant joined (or came back, consenting to ``accepted``)."""

    KIND = Kind.PEER_JOINED
    node: str
    #: The code hash it already consented to, when it comes back.
    accepted: str | None = None


@dataclass(frozen=True)
class PeerLeft(Message):
    """Relay to initiator: a participant's connection ended."""

    KIND = Kind.PEER_LEFT
    node: str


@dataclass(frozen=True)
class TaskClosed(Message):
    """Relay to participants: the initiator's connection ended without a finish."""

    KIND = Kind.TASK_CLOSED
    task: str


# The relay names who sent a frame in ``from``, a word Python keeps for itself.
_WIRE_NAMES = {"node": "from"}
_MESSAGES: dict[str, type[Message]] = {
    cls.KIND: cls
    for cls in (
        Round,
        Upload,
        Progress,
        Trained,
        Failed,
        Status,
        Evaluate,
        Evaluated,
        Aggregate,
        LeftOut,
        Aggregated,
        Secure,
        Finish,
        PeerJoined,
        PeerLeft,
        TaskClosed,
    )
}


def sender(frame: Frame) -> str:
    """Who sent a frame the relay forwarded (it stamps every one)."""
    node = frame.header.get("from")
    return node if isinstance(node, str) else "?"


def parse(frame: Frame) -> Message:
    """The message a frame carries, every field checked.

    Raises:
        ProtocolError: for a kind that is no message, or a field missing or of
            the wrong type; it names the sender, the kind and the field.
    """
    cls = _MESSAGES.get(frame.kind)
    if cls is None:
        raise ProtocolError(sender(frame), f"a {frame.kind!r} frame is not a message")
    values = {}
    for item, kind in _fields(cls):
        value = frame.header.get(_WIRE_NAMES.get(item.name, item.name), _MISSING)
        if value is _MISSING:
            if item.default is dataclasses.MISSING:
                raise ProtocolError(sender(frame), f"a {cls.KIND} frame needs {item.name!r}")
            continue
        if not _is(value, kind):
            raise ProtocolError(
                sender(frame),
                f"a {cls.KIND} frame's {item.name!r} must be {_name(kind)}, not {value!r}",
            )
        values[item.name] = value
    return cls(**values)


_MISSING = object()


@functools.cache  # resolving the hints is most of a parse's time; a class's never change
@typing.no_type_check
def _fields(cls: type[Message]) -> list[tuple[dataclasses.Field[Any], Any]]:
    hints = typing.get_type_hints(cls)
    return [(item, hints[item.name]) for item in dataclasses.fields(cls)]


def _is(value: Any, kind: Any) -> bool:
    if isinstance(kind, types.UnionType):
        return any(_is(value, option) for option in typing.get_args(kind))
    if kind is type(None):
        return value is None
    if kind is bool:
        return isinstance(value, bool)
    if kind is int:
        return isinstance(value, int) and not isinstance(value, bool)
    if kind is float:  # msgpack gives back a whole float as an int
        return isinstance(value, (int, float)) and not isinstance(value, bool)
    return isinstance(value, kind)


def _name(kind: Any) -> str:
    if isinstance(kind, types.UnionType):
        return " or ".join(_name(option) for option in typing.get_args(kind))
    return "None" if kind is type(None) else kind.__name__
