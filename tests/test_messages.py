"""The task's messages: each kind's fields written down once, and checked on arrival."""

from __future__ import annotations

import pytest

from fedmagic.errors import ProtocolError
from fedmagic.wire.frames import Frame, Kind
from fedmagic.wire.messages import (Failed, Finish, PeerJoined, PeerLeft, Refusal, Round,
                                    Status, TaskClosed, Trained, Upload, parse)


def through_the_wire(frame: Frame, sender: str = "alice") -> Frame:
    """The frame as the relay forwards it: parsed back from bytes, stamped with its sender."""
    header = {key: value for key, value in frame.header.items() if key != "to"}
    return Frame.parse(Frame({**header, "from": sender}).serialize())


@pytest.mark.parametrize("message", [
    Round(3, epochs=2, upload=True), Upload(3), Trained(3, samples=719, seconds=0.25),
    Failed(3, "train()", "RuntimeError: boom", "Traceback ..."),
    Status("verified", ok=True, samples=719), Status("declined", detail="not today"),
    Finish(True, "finished"), PeerLeft("alice"), TaskClosed("digits"),
    PeerJoined("alice", accepted="ab12"),
])
def test_every_message_comes_back_as_it_was_sent(message):
    assert parse(through_the_wire(message.to_frame(to=["alice"]))) == message


@pytest.mark.parametrize("header, refusal", [
    ({"t": Kind.TRAINED, "seconds": 1.0},
     "a trained frame needs 'round'"),
    ({"t": Kind.TRAINED, "round": "3"},
     "a trained frame's 'round' must be int, not '3'"),
    ({"t": Kind.ROUND, "round": True},
     "a round frame's 'round' must be int, not True"),
    ({"t": Kind.STATUS, "stage": "verified", "samples": 1.5},
     "a status frame's 'samples' must be int or None, not 1.5"),
    ({"t": Kind.FINISH, "ok": 1, "reason": "finished"},
     "a finish frame's 'ok' must be bool, not 1"),
    ({"t": Kind.STATE, "round": 1},
     "a 'state' frame is not a message"),
])
def test_a_malformed_message_is_refused_naming_the_sender_kind_and_field(header, refusal):
    with pytest.raises(ProtocolError) as refused:
        parse(through_the_wire(Frame(header), sender="mallory"))

    assert str(refused.value) == f"protocol error with mallory: {refusal}"


def test_refusal_codes_are_the_strings_on_the_wire():
    assert Refusal.BUSY == "busy" and Refusal("node_taken") is Refusal.NODE_TAKEN
