"""Every error fedmagic raises, in one place.

Each exception keeps the facts as attributes and builds its message in
``__str__``: what happened, where, and what to do about it.

    FedMagicError
    ├── TaskDefinitionError (TypeError)    a scheduler class that cannot run
    ├── ConfigurationError (ValueError)    a parameter that cannot work
    ├── CodecError (ValueError)            bytes that are not a fedmagic frame
    ├── ProtocolError                      a peer that broke the conversation
    ├── RelayRefused                       the relay said no (token, task, name)
    ├── ConnectionLost (ConnectionError)   the link to the relay broke
    ├── UnsupportedTensor (TypeError)      a state dict value FedAvg cannot average
    ├── UpdateRejected (ValueError)        a participant's update that does not fit
    ├── AggregationError (ValueError)      nothing, or nothing of weight, to average
    ├── SecureAggregationError (ValueError) a secure round whose sum cannot be revealed
    ├── RemoteError                        an exception raised on another node
    ├── DataNotFound (FileNotFoundError)   a dataset that was meant to be in place
    ├── VerificationFailed                 data that the task's DatasetVerify refused
    └── TaskFailed (RuntimeError)          a task that ended without finishing
        └── NotEnoughParticipants          fewer than ``min_clients`` to go on with
"""

from __future__ import annotations

__all__ = [
    "AggregationError",
    "CodecError",
    "ConnectionLost",
    "ConfigurationError",
    "DataNotFound",
    "FedMagicError",
    "NotEnoughParticipants",
    "ProtocolError",
    "RelayRefused",
    "RemoteError",
    "SecureAggregationError",
    "TaskDefinitionError",
    "TaskFailed",
    "UnsupportedTensor",
    "UpdateRejected",
    "VerificationFailed",
]


class FedMagicError(Exception):
    """Base class of every error fedmagic raises."""


class TaskDefinitionError(FedMagicError, TypeError):
    """A ``FedAvgScheduler`` subclass is missing something it needs."""

    def __init__(self, cls_name: str, problem: str, fix: str) -> None:
        super().__init__(cls_name, problem, fix)
        self.cls_name = cls_name
        self.problem = problem
        self.fix = fix

    def __str__(self) -> str:
        return f"{self.cls_name} {self.problem}: {self.fix}"


class ConfigurationError(FedMagicError, ValueError):
    """A parameter has a value the task cannot run with."""

    def __init__(self, parameter: str, value: object, reason: str) -> None:
        super().__init__(parameter, value, reason)
        self.parameter = parameter
        self.value = value
        self.reason = reason

    def __str__(self) -> str:
        return f"{self.parameter}={self.value!r}: {self.reason}"


class CodecError(FedMagicError, ValueError):
    """Bytes that do not decode to a valid fedmagic frame or tensor."""

    def __init__(self, what: str, where: str = "frame") -> None:
        super().__init__(what, where)
        self.what = what
        self.where = where

    def __str__(self) -> str:
        return f"malformed {self.where}: {self.what}"


class ProtocolError(FedMagicError):
    """A peer sent something the conversation does not allow at this point."""

    def __init__(self, peer: str, what: str) -> None:
        super().__init__(peer, what)
        self.peer = peer
        self.what = what

    def __str__(self) -> str:
        return f"protocol error with {self.peer}: {self.what}"


class RelayRefused(FedMagicError):
    """The relay refused a connection; ``code`` says why, ``message`` what to do."""

    def __init__(self, code: str, message: str, url: str = "") -> None:
        super().__init__(code, message, url)
        self.code = code
        self.message = message
        self.url = url

    def __str__(self) -> str:
        where = f" at {self.url}" if self.url else ""
        return f"relay{where} refused the connection ({self.code}): {self.message}"


class ConnectionLost(FedMagicError, ConnectionError):
    """The connection to the relay closed under us."""

    def __init__(self, url: str, detail: str) -> None:
        super().__init__(url, detail)
        self.url = url
        self.detail = detail

    def __str__(self) -> str:
        return f"lost the connection to the relay at {self.url}: {self.detail}"


class UnsupportedTensor(FedMagicError, TypeError):
    """``state_dict()`` returned a value FedAvg cannot average.

    ``name`` is the value's key, or None when the whole state is the problem.
    """

    def __init__(self, name: object, kind: str, reason: str) -> None:
        super().__init__(name, kind, reason)
        self.name = name
        self.kind = kind
        self.reason = reason

    def __str__(self) -> str:
        where = "state_dict()" if self.name is None else f"state_dict()[{self.name!r}]"
        return f"{where} is {self.kind}: {self.reason}"


class UpdateRejected(FedMagicError, ValueError):
    """A participant's update was refused; the round goes on without it."""

    def __init__(self, node: str, round: int, reason: str) -> None:
        super().__init__(node, round, reason)
        self.node = node
        self.round = round
        self.reason = reason

    def __str__(self) -> str:
        return f"update from {self.node!r} in round {self.round} refused: {self.reason}"


class AggregationError(FedMagicError, ValueError):
    """There is nothing to average: no updates, or no weight behind them."""

    def __init__(self, reason: str) -> None:
        super().__init__(reason)
        self.reason = reason

    def __str__(self) -> str:
        return f"cannot average: {self.reason}"


class SecureAggregationError(FedMagicError, ValueError):
    """A secure (SecAgg+) round cannot reveal its sum, or one participant cannot take part.

    Too few nodes are left to hold or reveal the shares, or the secrets
    rebuilt from them do not take the masks off (a share or a masked vector
    was altered). ``where`` is the participant that gave up, or "the
    aggregator"; ``reason`` says which and what to do.
    """

    def __init__(self, where: str, reason: str) -> None:
        super().__init__(where, reason)
        self.where = where
        self.reason = reason

    def __str__(self) -> str:
        return f"secure aggregation failed at {self.where}: {self.reason}"


class RemoteError(FedMagicError):
    """An exception raised on another node, with that node's traceback."""

    def __init__(self, node: str, during: str, error: str, traceback: str = "") -> None:
        super().__init__(node, during, error, traceback)
        self.node = node
        self.during = during
        self.error = error
        self.traceback = traceback

    def __str__(self) -> str:
        text = f"{self.node!r} failed during {self.during}: {self.error}"
        if self.traceback:
            text += f"\n\nTraceback on {self.node!r}:\n{self.traceback.rstrip()}"
        return text


class DataNotFound(FedMagicError, FileNotFoundError):
    """A dataset was not in place and could not be downloaded."""

    def __init__(self, root: str, detail: str) -> None:
        super().__init__(root, detail)
        self.root = root
        self.detail = detail

    def __str__(self) -> str:
        return (
            f"the data under {self.root!r} is not in place and could not be downloaded "
            f"({self.detail}). Put the files there before joining (for the digits "
            "sample data, run `fedmagic digits`); nodes are not expected to reach the internet"
        )


class VerificationFailed(FedMagicError):
    """A node's ``DatasetVerify.run()`` returned False: its data is not what the task needs."""


class TaskFailed(FedMagicError, RuntimeError):
    """A task ended before ``is_task_finished()`` said it was done."""

    def __init__(self, task_id: str, reason: str, round: int | None = None) -> None:
        super().__init__(task_id, reason, round)
        self.task_id = task_id
        self.reason = reason
        self.round = round
        #: Where the last completed round's model is, and which round that was.
        self.checkpoint: str | None = None
        self.saved_round = 0

    def __str__(self) -> str:
        where = f" in round {self.round}" if self.round else ""
        text = f"task {self.task_id!r} failed{where}: {self.reason}"
        if self.checkpoint and self.saved_round:
            text += (
                f"\nthe model after round {self.saved_round} is in {self.checkpoint}; run "
                "the same code again to continue from there"
            )
        return text


class NotEnoughParticipants(TaskFailed):
    """Fewer than ``min_clients`` participants were left to go on with."""

    def __init__(
        self,
        task_id: str,
        have: int,
        need: int,
        round: int | None = None,
        waited: float | None = None,
    ) -> None:
        self.have = have
        self.need = need
        self.waited = waited
        if round:
            reason = (
                f"only {have} of the {need} participants needed (min_clients) "
                "sent a valid update; the task's log says why each of the others did not"
            )
        else:
            within = f" within {waited:g} s" if waited is not None else ""
            reason = (
                f"only {have} of the {need} participants needed (min_clients) "
                f"joined and verified their data{within}; start more "
                "participants, lower min_clients, or raise join_timeout"
            )
        super().__init__(task_id, reason, round)

    def __reduce__(self) -> tuple:
        # self.args holds the built reason, not these arguments
        return type(self), (self.task_id, self.have, self.need, self.round, self.waited)
