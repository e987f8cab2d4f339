"""The initiator's side of a task: gather participants, run rounds, average.

Each round the global weights fan out once through the relay to the
selected participants; each trains and says so; the aggregator then asks
one participant at a time for its update, checks it (names, dtypes, shapes,
finite values) and folds it into a running weighted mean. One upload at a
time keeps memory at a few copies of the model however many participants
there are.
"""

from __future__ import annotations

import asyncio
import collections
import logging
import math
import numbers
import random
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any, Callable

import torch

from .aggregate import WeightedMean, non_finite
from .checkpoint import Checkpoint
from .codec import Frame, Kind, StateReader
from .errors import (CodecError, ConnectionLost, NotEnoughParticipants,
                     RemoteError, TaskFailed, UpdateRejected)
from .link import Link
from .task import TaskPackage

if TYPE_CHECKING:
    from .fed_avg import FedAvgScheduler

__all__ = ["Aggregator", "Participant", "TaskResult"]

log = logging.getLogger("fedmagic")

#: Statuses from which a participant may be picked for the next round.
AVAILABLE = ("ready", "uploaded", "refused")


@dataclass
class Participant:
    """What the initiator knows of one node."""

    node: str
    status: str = "joined"
    samples: int = 0
    detail: str = ""
    traceback: str = ""
    round: int = 0
    train_seconds: float | None = None


@dataclass
class TaskResult:
    """How a task ended: its history, last metrics and checkpoint."""

    task_id: str
    name: str
    rounds: int
    history: list[dict[str, Any]]
    checkpoint: Path
    participants: dict[str, Participant] = field(default_factory=dict)

    @property
    def metrics(self) -> dict[str, Any]:
        """The last tested round's metrics."""
        return last_metrics(self.history)


# What a history row records about the round itself; the rest is what ``test()`` returned.
_ROUND_KEYS = frozenset({"round", "participants", "samples", "seconds", "train_seconds",
                        "test_seconds", "tested"})


def metrics_of(row: dict[str, Any]) -> dict[str, Any]:
    """The metrics ``test()`` returned in a history row."""
    return {key: value for key, value in row.items() if key not in _ROUND_KEYS}


def last_metrics(history: list[dict[str, Any]]) -> dict[str, Any]:
    """The metrics of the last tested round, or none before the first test."""
    for row in reversed(history):
        if row.get("tested"):
            return metrics_of(row)
    return {}


def metrics_text(row: dict[str, Any]) -> str:
    """A history row's metrics as ``loss=0.31, accuracy=0.91``."""
    return ", ".join(f"{key}={_short(value)}" for key, value in metrics_of(row).items())


@dataclass
class _Upload:
    node: str
    round: int
    reader: StateReader
    last_progress: float
    state: dict[str, torch.Tensor] | None = None
    error: str | None = None


class Aggregator:
    """Runs one task's rounds over a link to the relay.

    Args:
        scheduler: the author's scheduler, already set up.
        package: the task's code, sent to each participant that joins.
        link: an initiator's link to the relay.
        join_timeout: seconds to wait for ``min_clients`` verified participants.
        join_grace: once ``min_clients`` are in, seconds to wait for more (up
            to ``max_clients``) before round 1.
        weighted: weight updates by sample counts (FedAvg); False gives the
            plain mean.
        on_event: called with every event line, for displays.
    """

    def __init__(self, scheduler: FedAvgScheduler, package: TaskPackage, link: Link, *,
                 checkpoint: Checkpoint, join_timeout: float = 300.0, join_grace: float = 3.0,
                 weighted: bool = True, history: list[dict[str, Any]] | None = None,
                 on_event: Callable[[str], None] | None = None) -> None:
        self.scheduler = scheduler
        self.package = package
        self.link = link
        self.checkpoint = checkpoint
        self.join_timeout = join_timeout
        self.join_grace = join_grace
        self.weighted = weighted
        self.history = history or []
        self.on_event = on_event
        self.participants: dict[str, Participant] = {}
        self.upload_timeout = max(60.0, scheduler.calculation_timeout)
        self._task_header = package.to_header()
        self._ready: collections.deque[str] = collections.deque()
        self._upload: _Upload | None = None
        # Reused from round to round: the incoming update and the running mean.
        self._staging: dict[str, torch.Tensor] = {}
        self._mean: WeightedMean | None = None
        self._round = 0
        self._changed = asyncio.Event()
        self._lost: BaseException | None = None
        #: Set (from any thread) to end the task cleanly after the current round.
        self.stop_requested = False

    @property
    def task_id(self) -> str:
        return self.package.task_id

    async def run(self) -> TaskResult:
        """Gather, run rounds until ``is_task_finished()``, and tell everyone.

        Raises:
            TaskFailed: if the task cannot go on; participants are told too.
        """
        reader = asyncio.create_task(self._read_frames())
        try:
            await self._gather()
            while True:
                await self._run_round(self.scheduler.current_round + 1)
                if self.scheduler.is_task_finished():
                    reason = "finished"
                    break
                if self.stop_requested:
                    reason = f"stopped by its author after round {self.scheduler.current_round}"
                    self._event(f"task {self.task_id!r} {reason}")
                    break
            await self._tell_all({"t": Kind.FINISH, "ok": True, "reason": reason})
        except BaseException as exc:
            reason = exc.reason if isinstance(exc, TaskFailed) else str(exc) or type(exc).__name__
            if isinstance(exc, asyncio.CancelledError):
                reason = "stopped by the task's author"
            await self._tell_all({"t": Kind.FINISH, "ok": False, "reason": reason})
            raise
        finally:
            reader.cancel()
            await self.link.close()
        self._event(f"task {self.task_id!r} finished after round {self.scheduler.current_round}")
        return TaskResult(self.task_id, self.scheduler.name, self.scheduler.current_round,
                          self.history, self.checkpoint.directory, self.participants)

    # Gathering.

    async def _gather(self) -> None:
        need, most = self.scheduler.min_clients, self.scheduler.max_clients
        self._event(f"waiting for {need} to {most} participants to join and verify their data")
        loop = asyncio.get_running_loop()
        if not await self._wait_until(lambda: self._count_available() >= need,
                                      loop.time() + self.join_timeout):
            raise NotEnoughParticipants(self.task_id, self._count_available(), need,
                                        waited=self.join_timeout)
        await self._wait_until(lambda: self._count_available() >= most,
                               loop.time() + self.join_grace)

    def _count_available(self) -> int:
        return sum(p.status in AVAILABLE for p in self.participants.values())

    # One round.

    async def _run_round(self, round: int) -> None:
        scheduler = self.scheduler
        started = time.perf_counter()
        loop = asyncio.get_running_loop()
        if self._count_available() < scheduler.min_clients:
            self._event(f"round {round}: waiting for participants")
            await self._wait_until(lambda: self._count_available() >= scheduler.min_clients,
                                   loop.time() + self.join_timeout)
        available = [p.node for p in self.participants.values() if p.status in AVAILABLE]
        # As in FedAvg, a random subset when more are available than a round uses.
        selected = (random.sample(available, scheduler.max_clients)
                    if len(available) > scheduler.max_clients else available)
        if len(selected) < scheduler.min_clients:
            raise NotEnoughParticipants(self.task_id, len(selected), scheduler.min_clients,
                                        waited=self.join_timeout)
        self._round = round
        for node in selected:
            self.participants[node].status = "training"
            self.participants[node].round = round
        self._event(f"round {round}: training on {', '.join(selected)}")
        global_state = scheduler.state_dict()
        await self.link.send(Frame({"t": Kind.ROUND, "to": selected, "round": round,
                                    "epochs": scheduler.merge_epochs}))
        await self.link.send_state(global_state, to=selected, round=round)

        if self._mean is None:
            self._mean = WeightedMean(global_state)
        mean = self._mean
        mean.reset()
        deadline = loop.time() + scheduler.calculation_timeout
        while True:
            if self._ready:
                await self._collect(self._ready.popleft(), round, global_state, mean)
                continue
            training = [node for node in selected
                        if self.participants[node].status == "training"]
            if not training:
                break
            if not await self._wait_until(lambda: bool(self._ready) or not any(
                    self.participants[n].status == "training" for n in training), deadline):
                for node in training:
                    if self.participants[node].status == "training":
                        self.participants[node].status = "timed out"
                        self._event(f"round {round}: {node} timed out after "
                                    f"{scheduler.calculation_timeout:g} s (calculation_timeout)")
                break

        contributions, samples = mean.count, int(mean.total_weight)
        if contributions < scheduler.min_clients:
            raise NotEnoughParticipants(self.task_id, contributions, scheduler.min_clients,
                                        round=round)
        averaged = await asyncio.to_thread(mean.result_in_place)
        await asyncio.to_thread(scheduler.load_state_dict, averaged)
        if mean.shares_memory_with(scheduler.state_dict()):
            self._mean = None  # the scheduler kept our tensors: next round gets new ones
        del averaged
        scheduler.current_round = round
        finished = scheduler.is_task_finished()
        row: dict[str, Any] = {"round": round, "participants": contributions,
                               "samples": samples if self.weighted else None}
        log_rounds = scheduler.log_rounds
        tested = round == 1 or finished or (log_rounds > 0 and round % log_rounds == 0)
        row["tested"] = tested
        trained = [self.participants[node].train_seconds for node in selected
                   if self.participants[node].status == "uploaded"
                   and self.participants[node].train_seconds is not None]
        row["train_seconds"] = max(trained, default=None)
        if tested:
            test_started = time.perf_counter()
            row.update(_metrics(await asyncio.to_thread(scheduler.test)))
            row["test_seconds"] = time.perf_counter() - test_started
        row["seconds"] = round_seconds = time.perf_counter() - started
        self.history.append(row)
        await asyncio.to_thread(self.checkpoint.save, scheduler.state_dict(), round,
                                self.history, self.task_id)
        shown = metrics_text(row)
        self._event(f"round {round}/{scheduler.max_rounds or '?'}: averaged {contributions} "
                    f"updates in {round_seconds:.2f} s" + (f"; {shown}" if shown else ""))

    async def _collect(self, node: str, round: int, global_state: dict[str, torch.Tensor],
                       mean: WeightedMean) -> None:
        participant = self.participants[node]
        if participant.status != "trained":
            return
        loop = asyncio.get_running_loop()
        upload = _Upload(node, round, StateReader(global_state, out=self._staging),
                         last_progress=loop.time())
        self._upload = upload
        participant.status = "uploading"
        try:
            await self.link.send(Frame({"t": Kind.UPLOAD, "to": [node], "round": round}))
            while upload.state is None and upload.error is None:
                if participant.status == "dropped":
                    return
                stalled = loop.time() - upload.last_progress
                if stalled >= self.upload_timeout:
                    upload.error = f"no data for {self.upload_timeout:g} s"
                    break
                self._changed.clear()
                try:
                    await asyncio.wait_for(self._changed.wait(), self.upload_timeout - stalled)
                except asyncio.TimeoutError:
                    pass
                self._check_lost()
        finally:
            self._upload = None
        if upload.error is None:
            bad = await asyncio.to_thread(non_finite, upload.state)
            if bad:
                upload.error = f"non-finite values (NaN or infinity) in {', '.join(bad)}"
        if upload.error is None and self.weighted and participant.samples <= 0:
            upload.error = "it reported no training samples, so it has no weight"
        if upload.error is not None:
            participant.status = "refused"
            participant.detail = upload.error
            self._event(str(UpdateRejected(node, round, upload.error)), logging.WARNING)
            return
        weight = participant.samples if self.weighted else 1
        await asyncio.to_thread(mean.add, upload.state, weight)
        participant.status = "uploaded"

    # Frames from the relay.

    async def _read_frames(self) -> None:
        try:
            while True:
                frame = await self.link.recv()
                await self._dispatch(frame)
                self._changed.set()
        except asyncio.CancelledError:
            raise
        except BaseException as exc:
            self._lost = exc
            self._changed.set()

    async def _dispatch(self, frame: Frame) -> None:
        node = frame.header.get("from")
        kind = frame.kind
        if kind == Kind.PEER_JOINED:
            self.participants[node] = Participant(node)
            self._event(f"{node} joined; sending it the task's code")
            await self.link.send(Frame({**self._task_header, "to": [node]}))
            return
        participant = self.participants.get(node)
        if participant is None:
            log.warning("ignored a %s frame from unknown node %r", kind, node)
            return
        if kind == Kind.PEER_LEFT:
            if participant.status not in ("declined", "unverified", "failed"):
                participant.status = "dropped"
            self._event(f"{node} left", logging.WARNING)
        elif kind == Kind.STATUS:
            self._on_status(participant, frame.header)
        elif kind == Kind.TRAINED:
            self._on_trained(participant, frame.header)
        elif kind in (Kind.STATE, Kind.STATE_END):
            self._on_state(participant, frame)
        elif kind == Kind.FAILED:
            participant.status = "failed"
            error = RemoteError(node, str(frame.header.get("during", "training")),
                                str(frame.header.get("error")),
                                str(frame.header.get("traceback", "")))
            participant.detail, participant.traceback = error.error, error.traceback
            self._event(str(error), logging.ERROR)
        else:
            log.warning("ignored an unexpected %s frame from %r", kind, node)

    def _on_status(self, participant: Participant, header: dict[str, Any]) -> None:
        node = participant.node
        stage = header.get("stage")
        detail = str(header.get("detail") or "")
        if stage == "declined":
            participant.status, participant.detail = "declined", detail or "consent refused"
            self._event(f"{node} declined the task's code: {participant.detail}", logging.WARNING)
        elif stage == "verified" and header.get("ok"):
            samples = header.get("samples")
            participant.samples = samples if isinstance(samples, int) and samples > 0 else 0
            participant.status = "ready"
            self._event(f"{node} verified its data: {participant.samples} training samples")
        elif stage == "verified":
            participant.status, participant.detail = "unverified", detail
            participant.traceback = trace = str(header.get("traceback") or "")
            self._event(f"{node} failed data verification: {detail}"
                        + (f"\n{trace.rstrip()}" if trace else ""), logging.WARNING)

    def _on_trained(self, participant: Participant, header: dict[str, Any]) -> None:
        seconds = header.get("seconds")
        participant.train_seconds = seconds if isinstance(seconds, numbers.Real) else None
        if header.get("round") == self._round and participant.status == "training":
            participant.status = "trained"
            self._ready.append(participant.node)
        elif participant.status == "timed out":
            participant.status = "ready"  # late, but free for the next round

    def _on_state(self, participant: Participant, frame: Frame) -> None:
        upload = self._upload
        if upload is None or upload.node != participant.node:
            # The rest of a refused or late update: nothing was asked of it any more.
            log.debug("ignored state data %s from %r", frame, participant.node)
            return
        if upload.error is not None or upload.state is not None:
            return
        upload.last_progress = asyncio.get_running_loop().time()
        try:
            if frame.header.get("round") != upload.round:
                raise CodecError(f"state is for round {frame.header.get('round')!r}", "update")
            if frame.kind == Kind.STATE:
                upload.reader.feed(frame)
            else:
                upload.state = upload.reader.finish(frame)
        except CodecError as exc:
            upload.error = str(exc)

    # Helpers.

    async def _wait_until(self, predicate: Callable[[], bool], deadline: float) -> bool:
        loop = asyncio.get_running_loop()
        while not predicate():
            self._check_lost()
            remaining = deadline - loop.time()
            if remaining <= 0:
                return False
            self._changed.clear()
            try:
                await asyncio.wait_for(self._changed.wait(), remaining)
            except asyncio.TimeoutError:
                pass
        return True

    def _check_lost(self) -> None:
        if self._lost is not None:
            raise TaskFailed(self.task_id, str(self._lost), self._round or None) from self._lost

    async def _tell_all(self, header: dict[str, Any]) -> None:
        if self._lost is None:
            try:
                await self.link.send(Frame({**header, "to": "*"}))
            except ConnectionLost:
                pass

    def _event(self, text: str, level: int = logging.INFO) -> None:
        log.log(level, text, extra={"event": True})
        if self.on_event is not None:
            self.on_event(text)


def _metrics(values: Any) -> dict[str, Any]:
    if not isinstance(values, dict):
        log.warning("test() returned a %s, not a dict of metrics; ignored",
                    type(values).__name__)
        return {}
    metrics = {}
    for key, value in values.items():
        if isinstance(value, torch.Tensor) and value.numel() == 1:
            value = value.item()
        if isinstance(value, (numbers.Real, str)) and not isinstance(value, bool):
            metrics[str(key)] = float(value) if isinstance(value, numbers.Real) and not \
                isinstance(value, int) else value
    return metrics


def _short(value: Any) -> str:
    if isinstance(value, float) and math.isfinite(value):
        return f"{value:.4g}"
    return str(value)
