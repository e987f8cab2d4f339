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
from dataclasses import dataclass, field
from typing import Any, Sequence

__all__ = [
    "JoinSnapshot",
    "NodeStatus",
    "FEDERATED",
    "ParticipantState",
    "TaskSnapshot",
    "TaskStatus",
    "best_point",
    "budget_text",
    "clock",
    "epsilon_series",
    "failure_text",
    "is_number",
    "last_metrics",
    "lower_is_better",
    "metrics_of",
    "metric_series",
    "metrics_text",
    "size_text",
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
    #: The round it was last picked for, and how far its training got there.
    round: int = 0
    epoch: int = 0
    epochs: int = 0
    #: Bytes of its update in, of how many, while it uploads.
    uploaded: int = 0
    upload_size: int = 0
    #: When the initiator last heard from it (``time.time()``).
    last_seen: float | None = None
    #: The global model's metrics on its own test data, at the last federated evaluation.
    evaluation: dict[str, Any] = field(default_factory=dict)
    #: What its own DP-SGD spent so far, where the task trains privately on participants.
    epsilon: float | None = None

    @property
    def progress(self) -> str:
        """How far it is in the current round, as a few words."""
        if self.status == NodeStatus.TRAINING and self.epochs:
            return f"epoch {min(self.epoch + 1, self.epochs)}/{self.epochs}"
        if self.status == NodeStatus.UPLOADING and self.upload_size:
            return f"{self.uploaded / self.upload_size:.0%} of {size_text(self.upload_size)}"
        return ""


@dataclass(frozen=True)
class TaskSnapshot:
    """The initiator's task at one moment."""

    task_id: str
    status: TaskStatus
    #: What ended a failed task ("failed in round 2: ..." for a ``TaskFailed``,
    #: else the error's own words), and its traceback.
    error: str | None
    error_traceback: str
    #: Asked to stop after the current round, and not stopped yet.
    stopping: bool
    max_rounds: int
    participants: tuple[ParticipantState, ...]
    #: One row per finished round: the round's figures and what ``test()`` returned.
    history: tuple[dict[str, Any], ...]
    join_command: str
    #: The scheduler's arguments (``max_rounds``, ``merge_epochs``, the learning rate...).
    hyperparameters: dict[str, Any] = field(default_factory=dict)
    #: When it started and ended (``time.time()``), and when this snapshot was taken.
    started: float = 0.0
    ended: float | None = None
    taken: float = 0.0
    #: Where the model and history are saved.
    checkpoint: str | None = None
    #: Rounds that came from a checkpoint, not from this run.
    resumed_rounds: int = 0
    #: What its strategy promises data owners about privacy, a line each; empty for none.
    guarantees: tuple[str, ...] = ()
    #: The ``(target_epsilon, delta)`` a differentially private task stays within, if any.
    privacy_target: tuple[float, float] | None = None
    #: A simulated task's virtual participants, summed up (``Simulation.describe()``).
    simulation: dict[str, Any] | None = None

    @property
    def round(self) -> int:
        """Rounds finished."""
        return len(self.history)

    @property
    def elapsed(self) -> float:
        """Seconds since it started, until it ended."""
        return max((self.ended or self.taken) - self.started, 0.0)

    @property
    def seconds_per_round(self) -> float | None:
        """The mean length of this run's rounds, once one finished."""
        rows = [row for row in self.history[self.resumed_rounds :] if "seconds" in row]
        if not rows:
            return None
        return sum(row["seconds"] for row in rows) / len(rows)

    @property
    def remaining(self) -> float | None:
        """Seconds left, guessed from the rounds so far; None while unknown or once ended."""
        per_round = self.seconds_per_round
        if self.status != TaskStatus.RUNNING or per_round is None or not self.max_rounds:
            return None
        return max(self.max_rounds - self.round, 0) * per_round

    def best(self, metric: str) -> tuple[int, float] | None:
        """The round with the best value of ``metric`` so far, and the value.

        Lower is better for losses and errors, higher for everything else.
        """
        return best_point(metric, metric_series(self.history).get(metric, []))

    @property
    def epsilon_spent(self) -> tuple[float, float] | None:
        """The privacy budget spent so far, ``(epsilon, delta)``: the last round's.

        ``(0, delta)`` before the first round of a task with a target; None
        for a task that counts no budget, or none yet.
        """
        for row in reversed(self.history):
            if "epsilon" in row:
                return float(row["epsilon"]), float(row["delta"])
        if self.privacy_target is not None:
            return 0.0, self.privacy_target[1]
        return None

    def budget_line(self) -> str:
        """The privacy budget spent, of any target: ``ε 1.23 of 3 spent at δ 1e-05``; or ""."""
        spent = self.epsilon_spent
        if spent is None:
            return ""
        target = None if self.privacy_target is None else self.privacy_target[0]
        return budget_text(spent[0], target, spent[1])

    @property
    def secure_sum(self) -> tuple[int, int] | None:
        """The last secure round's ``(updates in its sum, threshold t)``; None for a task that
        does not aggregate securely, or before its first round."""
        for row in reversed(self.history):
            if "threshold" in row:
                return int(row["participants"]), int(row["threshold"])
        return None

    def secure_line(self) -> str:
        """What the initiator saw of the last secure round: ``seen: only the sum of 4 masked
        updates (t=3)``; or ""."""
        seen = self.secure_sum
        return "" if seen is None else secure_text(*seen)

    def status_line(self) -> str:
        """One line, as a progress bar's caption: ``round 3/5 · 0:41 elapsed · ~0:27 left``."""
        parts = [f"round {self.round}/{self.max_rounds or '?'}", f"{clock(self.elapsed)} elapsed"]
        if self.remaining is not None:
            parts.append(f"~{clock(self.remaining)} left")
        if self.seconds_per_round is not None:
            parts.append(f"{self.seconds_per_round:.1f} s/round")
        return " · ".join(parts)

    @property
    def metrics(self) -> dict[str, Any]:
        """The last tested round's metrics."""
        return last_metrics(self.history)

    def summary(self) -> str:
        """The task as text: its state, each participant, and each round's metrics."""
        state = str(self.status) if self.error is None else failure_text(self.error)
        lines = [
            f"task {self.task_id!r} {state}: round {self.round}/{self.max_rounds or '?'}, "
            + (self.simulated_line() or f"{len(self.participants)} participants")
        ]
        lines += [f"  privacy: {line}" for line in self.guarantees]
        lines += [f"  {line}" for line in (self.budget_line(), self.secure_line()) if line]
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
        spent = self.epsilon_spent
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
            "elapsed": round(self.elapsed, 1),
            "remaining": None if self.remaining is None else round(self.remaining, 1),
            "checkpoint": self.checkpoint,
            "guarantees": list(self.guarantees),
            "epsilon": None if spent is None else _finite(spent[0]),
            "target_epsilon": None if self.privacy_target is None else self.privacy_target[0],
            "delta": None if spent is None else spent[1],
            "secure_sum": None if self.secure_sum is None else list(self.secure_sum),
            "simulated": self.simulated_line(),
        }

    def simulated_line(self) -> str | None:
        """A simulated task's participants in a line: ``1,000 virtual (iid) on dask:
        round 5, 980 uploaded, 20 refused``; None for a task of real participants."""
        simulated = self.simulation
        if simulated is None:
            return None
        line = (
            f"{simulated['participants']:,} virtual ({simulated['partition']}) "
            f"on {simulated['engine']}"
        )
        progress = simulated["round"]
        if progress is None:
            return line
        counts = ", ".join(f"{count:,} {status}" for status, count in progress["counts"].items())
        return f"{line}: round {progress['round']}, {counts or 'none done yet'}"


@dataclass(frozen=True)
class JoinSnapshot:
    """A data owner's part in a task at one moment: the code offered to it now.

    Joining again may bring other code, so everything here is about the
    current offer only: what was accepted, declined or verified for earlier
    code, and its number of rounds, say nothing about this one.

    Raises:
        ValueError: for a snapshot that contradicts itself (accepted and
            declined, or a decision or verification with no code to be about).
    """

    task_id: str
    node: str
    #: Whether its part is over (finished, failed, declined or left).
    ended: bool
    #: What it does now: a first line that says it ("round 3: training",
    #: "finished: took part in 2 rounds"); any lines after it are details.
    detail: str
    #: The code offered, once it arrived.
    code_hash: str | None
    #: Whether its data owner accepted this code (asked now, or joining again with it).
    accepted: bool
    #: Whether its data owner declined this code.
    declined: bool
    #: Rounds this node took part in.
    round: int
    #: The rounds this code runs; None while unknown (before it arrives, or
    #: until the node built the task when its arguments do not say).
    max_rounds: int | None
    #: Verify data for this code: passed or not, and why; None before any.
    verified: bool | None
    verification: str
    #: What the code's strategy promises this data owner about privacy, a line each.
    guarantees: tuple[str, ...] = ()

    def __post_init__(self) -> None:
        if self.accepted and self.declined:
            raise ValueError(f"{self.node!r} cannot have both accepted and declined the code")
        if self.code_hash is None and (
            self.accepted or self.declined or self.verified is not None or self.guarantees
        ):
            raise ValueError(
                f"{self.node!r} has no code yet: nothing to accept, decline or verify data "
                "for, and no guarantees"
            )

    def to_json(self) -> dict[str, Any]:
        """What the JupyterLab extension shows (its ``IJoinState``)."""
        return {
            "task_id": self.task_id,
            "node": self.node,
            "status": "ended" if self.ended else "running",
            "detail": self.detail,
            "code_hash": self.code_hash,
            "accepted": self.accepted,
            "declined": self.declined,
            "round": self.round,
            "max_rounds": self.max_rounds,
            "verified": self.verified,
            "verification": self.verification,
            "guarantees": list(self.guarantees),
        }


# What a history row records about the round itself; the rest is what ``test()`` returned.
#: Federated evaluation's metrics, in a history row: what participants' own ``test()``
#: gave on their own data, combined, as ``federated_accuracy`` beside the initiator's ``accuracy``.
FEDERATED = "federated_"

_ROUND_KEYS = frozenset(
    {
        "round",
        "participants",
        "samples",
        "seconds",
        "train_seconds",
        "test_seconds",
        "tested",
        "aggregator",
        f"{FEDERATED}examples",
        # What a differentially private round spent, and how many its draw gave.
        "epsilon",
        "delta",
        "drawn",
        "truncated",
        # What a secure round revealed its sum with, and how far quantisation may move it.
        "threshold",
        "error_bound",
        "dropped_draw",
    }
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


def metric_series(history: Sequence[dict[str, Any]]) -> dict[str, list[tuple[int, float]]]:
    """Each numeric metric's ``(round, value)`` points, over the tested rounds, in order."""
    series: dict[str, list[tuple[int, float]]] = {}
    for row in history:
        if row.get("tested"):
            for name, value in metrics_of(row).items():
                if is_number(value):
                    series.setdefault(name, []).append((int(row["round"]), float(value)))
    return series


def epsilon_series(history: Sequence[dict[str, Any]]) -> list[tuple[int, float]]:
    """The privacy budget spent after each round, ``(round, epsilon)``, tested or not, in order."""
    return [
        (int(row["round"]), float(row["epsilon"]))
        for row in history
        if is_number(row.get("epsilon"))
    ]


def budget_text(epsilon: float, target: float | None, delta: float) -> str:
    """Epsilon spent, of the target if any: ``ε 1.23 of 3 spent at δ 1e-05``.

    The Federation panel's ``budgetText`` (describe.ts) writes the same words.
    """
    of = "" if target is None else f" of {target:g}"
    return f"ε {epsilon:.3g}{of} spent at δ {delta:g}"


def secure_text(updates: int, threshold: int) -> str:
    """What the initiator saw of a secure round: ``seen: only the sum of 4 masked updates (t=3)``.

    The Federation panel's ``secureText`` (describe.ts) writes the same words.
    """
    return f"seen: only the sum of {updates} masked updates (t={threshold})"


def best_point(metric: str, points: Sequence[tuple[int, float]]) -> tuple[int, float] | None:
    """The ``(round, value)`` point with the best value of ``metric``, the earliest on a tie.

    Lower is better for losses and errors (:func:`lower_is_better`), higher
    for everything else; None for no points.
    """
    if not points:
        return None
    lower = lower_is_better(metric)
    return min(points, key=lambda p: p[1] if lower else -p[1])


def metrics_text(row: dict[str, Any]) -> str:
    """A history row's metrics as ``loss=0.31, accuracy=0.91``."""
    return ", ".join(f"{key}={_short(value)}" for key, value in metrics_of(row).items())


def failure_text(error: str) -> str:
    """A failed task's error as the words after its name: ``failed in round 2: ...``."""
    return error if error.startswith("failed") else f"failed: {error}"


def is_number(value: Any) -> bool:
    """A metric that can be charted: a finite int or float, not a bool."""
    return isinstance(value, (int, float)) and not isinstance(value, bool) and math.isfinite(value)


def lower_is_better(metric: str) -> bool:
    """Whether smaller values of ``metric`` are better (losses and errors)."""
    name = metric.lower()
    return any(word in name for word in ("loss", "error", "perplexity", "mse", "mae"))


def clock(seconds: float) -> str:
    """Seconds as ``m:ss`` or ``h:mm:ss``."""
    whole = int(round(seconds))
    hours, rest = divmod(whole, 3600)
    minutes, secs = divmod(rest, 60)
    return f"{hours}:{minutes:02d}:{secs:02d}" if hours else f"{minutes}:{secs:02d}"


def size_text(count: float) -> str:
    """A byte count as ``16 bytes``, ``1.5 KiB``, ``3.2 MiB``..."""
    if count < 1024:
        return f"{count:.0f} bytes"
    value = float(count)
    for unit in ("KiB", "MiB", "GiB"):
        value /= 1024
        if value < 1024 or unit == "GiB":
            break
    return f"{value:.1f} {unit}"


def _finite(value: float) -> float | None:
    """``value``, or None where JSON has no number for it (an infinite epsilon)."""
    return value if math.isfinite(value) else None


def _short(value: Any) -> str:
    if isinstance(value, float) and math.isfinite(value):
        return f"{value:.4g}"
    return str(value)
