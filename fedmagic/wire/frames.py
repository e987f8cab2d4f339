"""Frames and their headers, sans I/O: what every party of fedmagic speaks.

A frame is one websocket binary message::

    +------------------+--------------------+-------------------------+
    | header length    | header             | payload                 |
    | 4 bytes, big end | msgpack map, str   | raw bytes, described    |
    |                  | keys, no ext types | by the header           |
    +------------------+--------------------+-------------------------+

This module needs msgpack only, so the relay, which reads headers and passes
payloads through, runs without torch or numpy; ``codec`` adds the tensors.
"""

from __future__ import annotations

import enum
import struct
from dataclasses import dataclass
from typing import Any

import msgpack

from ..errors import CodecError

__all__ = [
    "CHUNK_BYTES",
    "INITIATOR",
    "Frame",
    "Kind",
    "MAX_HEADER_BYTES",
    "MAX_LOG_SIZE",
    "PROTOCOL_VERSION",
]

PROTOCOL_VERSION = 5
#: How the relay names a task's initiator, in ``from`` and a participant's ``to``.
INITIATOR = "@initiator"
MAX_HEADER_BYTES = 1 << 20
CHUNK_BYTES = 1 << 20
MAX_LOG_SIZE = 60
MAX_LOG_FIELDS = 12

_PREFIX = struct.Struct(">I")


class Kind(enum.StrEnum):
    """The ``t`` field of every header: what a frame is."""

    # between a client and the relay
    HELLO = "hello"
    WELCOME = "welcome"
    ERROR = "error"
    PEER_JOINED = "peer_joined"
    PEER_LEFT = "peer_left"
    TASK_CLOSED = "task_closed"
    # between the initiator and its participants, through the relay
    TASK = "task"
    STATUS = "status"
    ROUND = "round"
    STATE = "state"
    STATE_END = "state_end"
    PROGRESS = "progress"
    TRAINED = "trained"
    UPLOAD = "upload"
    FAILED = "failed"
    EVALUATE = "evaluate"
    EVALUATED = "evaluated"
    # with is_centralized=False: between the initiator and the round's elected aggregator
    AGGREGATE = "aggregate"
    LEFT_OUT = "left_out"
    AGGREGATED = "aggregated"
    # with secure aggregation: a stage of the round's SecAgg+ protocol, either way
    SECURE = "secure"
    FINISH = "finish"


@dataclass(frozen=True)
class Frame:
    """One message: a header map and an optional raw payload.

    ``payload`` is a bytes-like object or a sequence of them (joined when the
    frame is serialized, so tensor memory is copied once, into the frame).
    """

    header: dict[str, Any]
    payload: Any = b""

    @property
    def kind(self) -> str:
        return self.header["t"]

    @property
    def payload_size(self) -> int:
        if isinstance(self.payload, (list, tuple)):
            return sum(memoryview(part).nbytes for part in self.payload)
        return memoryview(self.payload).nbytes

    def serialize(self) -> bytes:
        parts = self.payload if isinstance(self.payload, (list, tuple)) else (self.payload,)
        return b"".join((self.serialize_header(), *parts))

    def serialize_header(self) -> bytes:
        """The frame's bytes up to its payload: what a forwarder sends before the payload.

        Raises:
            CodecError: if the header is too large.
        """
        header = msgpack.packb(self.header, use_bin_type=True)
        if len(header) > MAX_HEADER_BYTES:
            raise CodecError(
                f"header of {len(header)} bytes exceeds the limit of {MAX_HEADER_BYTES} bytes",
                "outgoing frame",
            )
        return _PREFIX.pack(len(header)) + header

    @classmethod
    def parse(
        cls,
        data: bytes | bytearray | memoryview | str,
        *,
        max_header_bytes: int = MAX_HEADER_BYTES,
    ) -> Frame:
        """Decode one frame; the payload is a view into ``data``, not a copy.

        ``data`` is a websocket message as received: a text message is refused.

        Raises:
            CodecError: if ``data`` is not a well-formed frame.
        """
        if isinstance(data, str):
            raise CodecError("got a text message; fedmagic speaks binary frames only")
        view = memoryview(data).cast("B")  # slices below count bytes, whatever the format
        if view.nbytes < _PREFIX.size:
            raise CodecError(f"{view.nbytes} bytes is shorter than the 4-byte header length")
        (size,) = _PREFIX.unpack_from(view)
        if size > max_header_bytes:
            raise CodecError(
                f"header of {size} bytes exceeds the limit of {max_header_bytes} bytes"
            )
        end = _PREFIX.size + size
        if end > view.nbytes:
            raise CodecError(
                f"header claims {size} bytes but only {view.nbytes - _PREFIX.size} follow"
            )
        try:
            header = msgpack.unpackb(
                view[_PREFIX.size : end],
                raw=False,
                strict_map_key=True,
                ext_hook=_refuse_ext,
                object_pairs_hook=_check_map,
                list_hook=_check_list,
            )
        except CodecError:
            raise
        except Exception as exc:  # msgpack raises several unrelated types
            raise CodecError(f"header is not valid msgpack ({exc})") from None
        if not isinstance(header, dict) or not isinstance(header.get("t"), str):
            raise CodecError("header must be a map with a string field 't'")
        return cls(header, view[end:])

    def __str__(self) -> str:
        keys = [key for key in self.header if key != "t"]
        fields = [
            f"{_loggable(str(key))}={_loggable(repr(self.header[key]))}"
            for key in keys[:MAX_LOG_FIELDS]
        ]
        if len(keys) > MAX_LOG_FIELDS:
            fields.append(f"... {len(keys) - MAX_LOG_FIELDS} more")
        size = self.payload_size
        tail = f" +{size} bytes" if size else ""
        return f"{_loggable(str(self.kind))}({', '.join(fields)}){tail}"


def _loggable(text: str) -> str:
    """``text`` on one line of at most ``MAX_LOG_SIZE`` characters."""
    if not text.isprintable():
        text = repr(text)  # a peer's newline must not forge a log line
    return text if len(text) <= MAX_LOG_SIZE else text[: MAX_LOG_SIZE - 3] + "..."


def _refuse_ext(code: int, data: bytes) -> None:
    raise CodecError(f"msgpack extension type {code} is not allowed in a header")


def _check_map(pairs: list[tuple[Any, Any]]) -> dict[str, Any]:
    for key, _ in pairs:
        if not isinstance(key, str):
            raise CodecError(f"header map key {_loggable(repr(key))} is not a string")
    _check_list([value for _, value in pairs])
    return dict(pairs)


def _check_list(items: list[Any]) -> list[Any]:
    # msgpack decodes extension type -1 itself, without calling ext_hook
    if msgpack.Timestamp in map(type, items):
        raise CodecError("msgpack extension type -1 (timestamp) is not allowed in a header")
    return items
