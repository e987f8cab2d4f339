"""What the initiator knows of each node of its task."""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any

from .state import NodeStatus, ParticipantState

__all__ = ["Participant"]


@dataclass
class Participant:
    """What the initiator knows of one node."""

    node: str
    status: NodeStatus = NodeStatus.JOINED
    samples: int = 0
    detail: str = ""
    traceback: str = ""
    round: int = 0
    train_seconds: float | None = None
    #: The last round this node sits out, after timing out or stalling.
    sits_out_until: int = 0
    #: Deadlines missed in a row; each doubles the rounds sat out.
    strikes: int = 0
    #: Epochs of this round's training done, of how many.
    epoch: int = 0
    epochs: int = 0
    #: When the initiator last heard from it (``time.time()``).
    last_seen: float | None = None
    #: Rounds its update was folded into.
    rounds: int = 0
    #: Examples of its own test data (0: it cannot evaluate the global model).
    test_samples: int = 0
    #: The global model's metrics on its own data, at the last federated evaluation.
    evaluation: dict[str, Any] = field(default_factory=dict)
    #: What its own DP-SGD spent so far, where the task trains privately on participants.
    epsilon: float | None = None

    def state(self, uploaded: int = 0, upload_size: int = 0) -> ParticipantState:
        """What displays show of this node, as it is now."""
        return ParticipantState(
            self.node,
            self.status,
            self.samples,
            self.detail,
            self.traceback,
            self.train_seconds,
            self.round,
            self.epoch,
            self.epochs,
            uploaded,
            upload_size,
            self.last_seen,
            dict(self.evaluation),
            self.epsilon,
        )
