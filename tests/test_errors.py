"""Every error's message, pinned: rewording one is a deliberate act."""

from __future__ import annotations

import builtins
import pickle
import re

import pytest

from fedmagic import errors
from fedmagic.errors import (AggregationError, CodecError, ConfigurationError, ConnectionLost,
                             DataNotFound, FedMagicError, NotEnoughParticipants, ProtocolError,
                             RelayRefused, RemoteError, SecureAggregationError,
                             TaskDefinitionError, TaskFailed, UnsupportedTensor, UpdateRejected,
                             VerificationFailed)

MESSAGES = [
    (FedMagicError("something went wrong"),
     "something went wrong"),
    (TaskDefinitionError("MyTask", "does not define train()", "add a train(self) method"),
     "MyTask does not define train(): add a train(self) method"),
    (ConfigurationError("min_clients", 0, "must be at least 1"),
     "min_clients=0: must be at least 1"),
    (ConfigurationError("relay", "ws:/bad", "is not a ws:// or wss:// URL"),
     "relay='ws:/bad': is not a ws:// or wss:// URL"),
    (CodecError("header is too long"),
     "malformed frame: header is too long"),
    (CodecError("tensor 'w' is short", "state"),
     "malformed state: tensor 'w' is short"),
    (ProtocolError("relay", "expected a welcome, got round(round=1)"),
     "protocol error with relay: expected a welcome, got round(round=1)"),
    (RelayRefused("token", "check the token you were given"),
     "relay refused the connection (token): check the token you were given"),
    (RelayRefused("task", "no task 'abc' is open", "ws://relay:8765"),
     "relay at ws://relay:8765 refused the connection (task): no task 'abc' is open"),
    (ConnectionLost("ws://relay:8765", "no pong within 20 s"),
     "lost the connection to the relay at ws://relay:8765: no pong within 20 s"),
    (UnsupportedTensor("mask", "a torch.bool tensor", "leave it out"),
     "state_dict()['mask'] is a torch.bool tensor: leave it out"),
    (UnsupportedTensor(3, "stored under a key of type int", "rename it"),
     "state_dict()[3] is stored under a key of type int: rename it"),
    (UnsupportedTensor(None, "a list, not a mapping", "return a dict"),
     "state_dict() is a list, not a mapping: return a dict"),
    (UpdateRejected("alice", 3, "non-finite values in fc.weight"),
     "update from 'alice' in round 3 refused: non-finite values in fc.weight"),
    (AggregationError("no update was given"),
     "cannot average: no update was given"),
    (SecureAggregationError("the aggregator", "only 2 masked updates arrived, fewer than the "
                            "threshold t=3; dropped: 'n3' (before uploading its masked update)"),
     "secure aggregation failed at the aggregator: only 2 masked updates arrived, fewer than "
     "the threshold t=3; dropped: 'n3' (before uploading its masked update)"),
    (RemoteError("bob", "training", "ZeroDivisionError: division by zero"),
     "'bob' failed during training: ZeroDivisionError: division by zero"),
    (RemoteError("bob", "testing", "KeyError: 'x'",
                 "Traceback (most recent call last):\n  File \"task.py\", line 3\n"),
     "'bob' failed during testing: KeyError: 'x'\n\n"
     "Traceback on 'bob':\nTraceback (most recent call last):\n  File \"task.py\", line 3"),
    (DataNotFound("/data/mnist", "no network"),
     "the data under '/data/mnist' is not in place and could not be downloaded "
     "(no network). Put the files there before joining (for the digits sample data, "
     "run `fedmagic digits`); nodes are not expected to reach the internet"),
    (VerificationFailed("DatasetVerify.run() returned False: no images under data/"),
     "DatasetVerify.run() returned False: no images under data/"),
    (TaskFailed("t1", "the relay closed the task"),
     "task 't1' failed: the relay closed the task"),
    (TaskFailed("t1", "the initiator left", round=4),
     "task 't1' failed in round 4: the initiator left"),
    (NotEnoughParticipants("t1", 1, 3, round=2),
     "task 't1' failed in round 2: only 1 of the 3 participants needed (min_clients) sent "
     "a valid update; the task's log says why each of the others did not"),
    (NotEnoughParticipants("t1", 0, 2, waited=60),
     "task 't1' failed: only 0 of the 2 participants needed (min_clients) joined and "
     "verified their data within 60 s; start more participants, lower min_clients, or "
     "raise join_timeout"),
    (NotEnoughParticipants("t1", 0, 2, waited=2.5),
     "task 't1' failed: only 0 of the 2 participants needed (min_clients) joined and "
     "verified their data within 2.5 s; start more participants, lower min_clients, or "
     "raise join_timeout"),
    (NotEnoughParticipants("t1", 0, 2),
     "task 't1' failed: only 0 of the 2 participants needed (min_clients) joined and "
     "verified their data; start more participants, lower min_clients, or "
     "raise join_timeout"),
]


@pytest.mark.parametrize("error, message", MESSAGES,
                         ids=[f"{type(e).__name__}-{i}" for i, (e, _) in enumerate(MESSAGES)])
def test_error_message(error, message):
    # Execute / Assert
    assert str(error) == message


def test_every_error_class_has_a_message_in_the_table():
    # Prepare
    tested = {type(error).__name__ for error, _ in MESSAGES}
    # Assert
    assert tested == set(errors.__all__)


@pytest.mark.parametrize("error, message", MESSAGES,
                         ids=[f"{type(e).__name__}-{i}" for i, (e, _) in enumerate(MESSAGES)])
def test_error_survives_pickling_with_its_message(error, message):
    # Execute
    copy = pickle.loads(pickle.dumps(error))
    # Assert
    assert type(copy) is type(error)
    assert str(copy) == message


BASES = [
    (TaskDefinitionError, TypeError),
    (ConfigurationError, ValueError),
    (CodecError, ValueError),
    (ProtocolError, FedMagicError),
    (RelayRefused, FedMagicError),
    (ConnectionLost, ConnectionError),
    (UnsupportedTensor, TypeError),
    (UpdateRejected, ValueError),
    (AggregationError, ValueError),
    (SecureAggregationError, ValueError),
    (RemoteError, FedMagicError),
    (DataNotFound, FileNotFoundError),
    (TaskFailed, RuntimeError),
    (NotEnoughParticipants, TaskFailed),
]


@pytest.mark.parametrize("cls, base", BASES, ids=[cls.__name__ for cls, _ in BASES])
def test_error_subclasses_fedmagic_error_and_its_builtin(cls, base):
    # Assert
    assert issubclass(cls, FedMagicError)
    assert issubclass(cls, base)


def test_hierarchy_in_module_docstring_matches_the_classes():
    # Prepare
    drawn = re.findall(r"[─└├]── (\w+)(?: \((\w+)\))?", errors.__doc__)
    # Assert
    assert {name for name, _ in drawn} | {"FedMagicError"} == set(errors.__all__)
    for name, builtin in drawn:
        cls = getattr(errors, name)
        assert issubclass(cls, FedMagicError)
        if builtin:
            assert issubclass(cls, getattr(builtins, builtin)), name
    assert issubclass(NotEnoughParticipants, TaskFailed)  # drawn nested under it
