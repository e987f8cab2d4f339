"""One model of where a task stands, for every display of it.

A :class:`TaskSnapshot` is the initiator's task at one moment; a
:class:`JoinSnapshot` a data owner's part in one. Each is taken at once, from
any thread, and never changes after, so a display reads it at leisure. The
text summary, the live widget, the JupyterLab bridge (whose TypeScript
``ITaskState`` and ``IJoinState`` mirror ``to_json()``, kept in step by a
test) and the participant panel all render these, and nothing else.
"""

from __future__ import annotations

import enum
import math
from dataclasses import dataclass
from typing import Any, Sequence

__all__ = [
    "JoinSnapshot",
    "NodeStatus",
    "ParticipantState",
    "TaskSnapshot",
    "TaskStatus",
    "last_metrics",
    "metrics_of",
    "metrics_text",
]


class TaskStatus(enum.StrEnum):
    RUNNING = "running"
    FINISHED = "finished"
    FAILED = "failed"


class NodeStatus(enum.StrEnum):
    """Where one participant stands, as its task's initiator sees it."""

    JOINED = "joined"  # sent the task's code; consent and verification pending
    READY = "ready"  # verified its data; may be picked for a round
    TRAINING = "training"
    TRAINED = "trained"  # waits for room to upload
    UPLOADING = "uploading"
    UPLOADED = "uploaded"  # its update is in
    REFUSED = "refused"  # its update or its weight was refused; may take part again
    TIMED_OUT = "timed out"  # missed a deadline; sits out a round or more
    RECONNECTING = "reconnecting"  # lost with the relay connection
    DECLINED = "declined"  # its data owner did not consent
    UNVERIFIED = "unverified"  # its data failed verification, or its sample count
    FAILED = "failed"  # its train() raised
    DROPPED = "dropped"  # left, or did not come back

    @property
    def available(self) -> bool:
        """Whether the node may be picked for the next round."""
        return self in _AVAILABLE

    @property
    def ended(self) -> bool:
        """Whether the node takes no more part unless it joins anew."""
        return self in _ENDED


_AVAILABLE = frozenset(
    {NodeStatus.READY, NodeStatus.UPLOADED, NodeStatus.REFUSED, NodeStatus.TIMED_OUT}
)
_ENDED = frozenset(
    {NodeStatus.DECLINED, NodeStatus.UNVERIFIED, NodeStatus.FAILED, NodeStatus.DROPPED}
)


@dataclass(frozen=True)
class ParticipantState:
    node: str
    status: NodeStatus
    samples: int = 0
    detail: str = ""
    traceback: str = ""
    #: How long its last round's training took.
    train_seconds: float | None = None


@dataclass(frozen=True)
class TaskSnapshot:
    """The initiator's task at one moment."""

    task_id: str
    status: TaskStatus
    #: What ended a failed task, as one line, and its traceback.
    error: str | None
    error_traceback: str
    #: Asked to stop after the current round, and not stopped yet.
    stopping: bool
    max_rounds: int
    participants: tuple[ParticipantState, ...]
    #: One row per finished round: the round's figures and what ``test()`` returned.
    history: tuple[dict[str, Any], ...]
    join_command: str

    @property
    def round(self) -> int:
        """Rounds finished."""
        return len(self.history)

    @property
    def metrics(self) -> dict[str, Any]:
        """The last tested round's metrics."""
        return last_metrics(self.history)

    def summary(self) -> str:
        """The task as text: its state, each participant, and each round's metrics."""
        state = f"{self.status}: {self.error}" if self.error is not None else str(self.status)
        lines = [
            f"task {self.task_id!r} {state}: round {self.round}/{self.max_rounds or '?'}, "
            f"{len(self.participants)} participants"
        ]
        lines += [
            f"  {p.node}: {p.status}"
            + (f", {p.samples} samples" if p.samples else "")
            + (f" ({p.detail})" if p.detail else "")
            for p in self.participants
        ]
        lines += [
            f"  round {row['round']}: {row['participants']} participants"
            + (f", {metrics_text(row)}" if metrics_of(row) else "")
            for row in self.history
        ]
        return "\n".join(lines)

    def to_json(self) -> dict[str, Any]:
        """What the JupyterLab extension shows (its ``ITaskState``)."""
        return {
            "task_id": self.task_id,
            "status": str(self.status),
            "error": self.error,
            "stopping": self.stopping,
            "round": self.round,
            "max_rounds": self.max_rounds,
            "participants": [
                {"node": p.node, "status": str(p.status), "detail": p.detail}
                for p in self.participants
            ],
            "metrics": {
                key: value
                for key, value in self.metrics.items()
                if isinstance(value, (int, float, str))
            },
            "join_command": self.join_command,
        }


@dataclass(frozen=True)
class JoinSnapshot:
    """A data owner's part in a task at one moment."""

    task_id: str
    node: str
    #: Whether its part is over (finished, failed, declined or left).
    ended: bool
    #: What it does now, as one line ("round 3: training", "finished: ...").
    detail: str
    #: The code offered, once it arrived.
    code_hash: str | None
    #: Whether its data owner accepted the code offered.
    accepted: bool
    round: int
    max_rounds: int
    #: The last Verify data: passed or not, and why; None before the first.
    verified: bool | None
    verification: str

    def to_json(self) -> dict[str, Any]:
        """What the JupyterLab extension shows (its ``IJoinState``)."""
        return {
            "task_id": self.task_id,
            "node": self.node,
            "status": "ended" if self.ended else "running",
            "detail": self.detail,
            "code_hash": self.code_hash,
            "accepted": self.accepted,
            "round": self.round,
            "max_rounds": self.max_rounds,
            "verified": self.verified,
            "verification": self.verification,
        }


# What a history row records about the round itself; the rest is what ``test()`` returned.
_ROUND_KEYS = frozenset(
    {"round", "participants", "samples", "seconds", "train_seconds", "test_seconds", "tested"}
)


def metrics_of(row: dict[str, Any]) -> dict[str, Any]:
    """The metrics ``test()`` returned in a history row."""
    return {key: value for key, value in row.items() if key not in _ROUND_KEYS}


def last_metrics(history: Sequence[dict[str, Any]]) -> dict[str, Any]:
    """The metrics of the last tested round, or none before the first test."""
    for row in reversed(history):
        if row.get("tested"):
            return metrics_of(row)
    return {}


def metrics_text(row: dict[str, Any]) -> str:
    """A history row's metrics as ``loss=0.31, accuracy=0.91``."""
    return ", ".join(f"{key}={_short(value)}" for key, value in metrics_of(row).items())


def _short(value: Any) -> str:
    if isinstance(value, float) and math.isfinite(value):
        return f"{value:.4g}"
    return str(value)
