"""A simulation's workers on a Dask cluster: this machine's by default, or one the user runs.

Why Dask rather than Ray, which Flower's simulation runs on: for this
shape (the model sent once a round, many virtual participants a worker, one
partial sum back) ``benchmarks/engines.py`` measured Dask starting in 1.7 s
against Ray's 7.3 s and idling in 1.1 against 1.8 GiB with two workers, at
a round overhead within 0.04 ms a participant of Ray's at N = 1,000.

What travels is fedmagic's own: the task as its ``task`` frame's header and
the shares as msgpack, sent once; each round the global state, broadcast
once to every worker, and one partial sum back from each, as fedmagic's
frames of raw tensor bytes. Dask carries the function that runs a worker's
round and the strategy whose fold it uses, with its own serialization,
between this process and the user's own workers.

A worker that dies mid-round costs that round's virtual participants on it:
they are reported failed, and the round goes on with the others. Dask's
nanny starts a fresh worker, which builds its participants on its first round.
"""

from __future__ import annotations

import concurrent.futures
import heapq
import logging
import os
import threading
import time
import uuid
from typing import Any, Callable, Mapping, Sequence

import msgpack
import torch

from ..errors import ConfigurationError
from ..strategies import Strategy
from ..strategies.aggregate import Partial
from ..wire.codec import StateReader, encode_state
from ..wire.frames import Frame
from .simulation_options import resources_text
from .state import NodeStatus
from .task import TaskPackage
from .virtual import Outcome, VirtualParticipants, WorkerRound

__all__ = ["DaskWorkers", "balance"]

log = logging.getLogger("fedmagic")

#: How often a round's wait looks for workers that left.
POLL_SECONDS = 0.5

#: How often a worker tells of its participants' outcomes mid-round (what a display shows).
REPORT_SECONDS = 0.25

#: A state travels as frames of at most this much payload each.
_CHUNK_BYTES = 64 << 20


class DaskWorkers:
    """Virtual participants spread over a Dask cluster's workers: one partial sum each a round.

    Every worker can train every virtual participant (each loads the whole
    training set once and keeps the shares' indices), so each round's
    selection is shared out afresh, balanced by samples.

    Args:
        package: the task, as its participants receive it.
        shares: each virtual participant's examples, as indices into the training set.
        strategy: the task's strategy; its workers' copies fold the updates.
        address: a running Dask scheduler's (``tcp://host:8786``); None starts a
            cluster on this machine.
        workers: how many workers a local cluster starts (one process of one
            thread each); None: one per core.
        resources: what a worker's round asks of it, e.g. ``{"GPU": 1}``: Dask runs it
            only on workers started with that much (``dask worker --resources GPU=1``).
    """

    def __init__(
        self,
        package: TaskPackage,
        shares: Mapping[str, Sequence[int]],
        strategy: Strategy,
        *,
        address: str | None = None,
        workers: int | None = None,
        resources: Mapping[str, float] | None = None,
    ) -> None:
        import dask
        import distributed

        self._distributed = distributed
        self._cluster = None
        if address is None:
            settings = {
                # Dask's default of 65536 stops glibc adapting its mmap threshold, so torch's
                # buffers are mapped and unmapped on every step: ~25% more CPU (engines.py).
                "distributed.nanny.pre-spawn-environ.MALLOC_TRIM_THRESHOLD_": None,
                # A round task on a worker that died fails at once (its participants are lost)
                # rather than being run again elsewhere.
                "distributed.scheduler.allowed-failures": 0,
                # Its statistical profiler samples each worker's stack all the time: ~0.1 ms
                # a participant here (benchmarks/simulation.py), and nothing reads it
                "distributed.worker.profile.enabled": False,
            }
            with dask.config.set(settings):
                self._cluster = distributed.LocalCluster(
                    n_workers=workers or os.cpu_count() or 1,
                    threads_per_worker=1,
                    processes=True,
                    dashboard_address=None,
                    resources=dict(resources) if resources else None,
                )
        try:
            self.client = distributed.Client(
                self._cluster if self._cluster is not None else address, set_as_default=False
            )
        except OSError as unreachable:
            raise ConfigurationError(
                "address",
                address,
                f"no Dask scheduler answered there ({unreachable}); start one (dask scheduler, "
                "then dask worker ADDRESS on each machine) or leave address out to start "
                "workers on this machine",
            ) from None
        self.address = address or "this machine"
        self.resources = dict(resources) if resources else None
        self.samples = {node: len(indices) for node, indices in shares.items()}
        self._key = f"{package.task_id}-{uuid.uuid4().hex}"
        self._setup_bytes = msgpack.packb(
            {"task": package.to_header(), "shares": {n: list(s) for n, s in shares.items()}},
            use_bin_type=True,
        )
        self._strategy_object = strategy
        self._scatter_setup()
        # Outcomes as workers report them mid-round, through Dask's structured events
        self._topic = f"fedmagic-progress-{self._key}"
        self._listening: tuple[int, Callable[[list[Outcome]], None]] | None = None
        self.client.subscribe_topic(self._topic, self._heard)

    def _scatter_setup(self) -> None:
        """Give every worker the task, the shares and the strategy."""
        self._setup, self._strategy = self.client.scatter(
            [self._setup_bytes, self._strategy_object], broadcast=True, hash=False
        )

    def addresses(self) -> list[str]:
        """The workers there are now that have the round's ``resources``, by address, as
        the scheduler itself says.

        Not ``Client.scheduler_info()``: it returns a cache the client's own periodic
        refresh may have just emptied, which would make live workers look gone. A worker
        without the resources would never start a part pinned to it.
        """
        client = self.client
        identity = client.sync(client.scheduler.identity, n_workers=-1)  # type: ignore[union-attr]
        wanted = self.resources or {}
        return sorted(
            address
            for address, worker in identity["workers"].items()
            if all(worker.get("resources", {}).get(k, 0) >= v for k, v in wanted.items())
        )

    def run_round(
        self,
        number: int,
        global_state: Mapping[str, torch.Tensor],
        nodes: Sequence[str],
        configs: Mapping[str, dict[str, Any]],
        progress: Callable[[list[Outcome]], None] | None = None,
    ) -> list[WorkerRound]:
        """Each worker trains its part of ``nodes`` and folds their updates.

        A worker that dies or leaves before it answers costs its part: each
        of them comes back failed, saying so. ``progress`` hears of outcomes
        as workers report them, a few times a second; what comes back is the
        whole account.
        """
        distributed, client = self._distributed, self.client
        addresses = self.addresses()
        if not addresses:
            wanted = resources_text(self.resources)
            having = f" with resources {wanted}" if wanted else ""
            start = "dask worker ADDRESS" + (f" --resources '{wanted}'" if wanted else "")
            raise RuntimeError(
                f"the Dask cluster at {self.address} has no workers{having}; start some "
                f"({start}) or leave address= out to start them here"
            )
        packed = pack_state(global_state)
        [state] = client.scatter([packed], broadcast=True, hash=False)
        topic = self._topic if progress is not None else None

        def submit(address: str, part: list[str], state: Any) -> Any:
            return client.submit(
                _train_part,
                self._key,
                self._setup,
                self._strategy,
                state,
                number,
                part,
                {node: configs.get(node) or {} for node in part},
                topic,
                workers=[address],
                allow_other_workers=False,
                resources=self.resources,
                pure=False,
                key=f"fedmagic-round-{number}-{uuid.uuid4().hex}",
            )

        parts = balance(nodes, self.samples, len(addresses))
        pending = {
            submit(address, part, state): (address, part)
            for address, part in zip(addresses, parts, strict=True)
            if part
        }
        rounds: list[WorkerRound] = []
        retried = False
        self._listening = (number, progress) if progress is not None else None
        while pending:
            try:
                with client.as_current():
                    distributed.wait(
                        list(pending), timeout=POLL_SECONDS, return_when="FIRST_COMPLETED"
                    )
            except (TimeoutError, concurrent.futures.CancelledError):
                pass  # none done yet, or one cancelled: each is looked at below
            present = set(self.addresses())
            for future, (address, part) in list(pending.items()):
                if future.cancelled() and not retried and address in present:
                    # Data it needed went with a worker that left as it was sent: send
                    # it all again, once, and run the part on the same worker.
                    retried = True
                    del pending[future]
                    self._scatter_setup()
                    [state] = client.scatter([packed], broadcast=True, hash=False)
                    pending[submit(address, part, state)] = (address, part)
                elif future.done():
                    del pending[future]
                    rounds.append(self._result(future, address, part, global_state))
                elif address not in present:
                    del pending[future]
                    future.cancel()
                    rounds.append(_lost(part, self.samples, f"its Dask worker {address} left"))
        self._listening = None
        return rounds

    def _heard(self, event: tuple[float, Any]) -> None:
        listening = self._listening
        number, reported = event[1]
        if listening is None or listening[0] != number:
            return  # a late word from a round already accounted for
        listening[1]([Outcome(n, NodeStatus(s), k, t, d) for n, s, k, t, d in reported])

    def _result(
        self, future: Any, address: str, part: list[str], reference: Mapping[str, torch.Tensor]
    ) -> WorkerRound:
        if future.status == "finished":
            return unpack_round(future.result(), reference)
        if future.cancelled():
            return _lost(part, self.samples, f"Dask cancelled its round on worker {address}")
        exception = future.exception()
        if isinstance(exception, self._distributed.KilledWorker):
            why = f"its Dask worker {address} died mid-round"
        else:
            why = f"its Dask worker {address} failed: {type(exception).__name__}: {exception}"
        return _lost(part, self.samples, why)

    def close(self) -> None:
        """Let the workers forget this task, and stop a cluster started here."""
        try:
            self.client.unsubscribe_topic(self._topic)
            self.client.run(_forget, self._key)
        finally:
            self.client.close()
            if self._cluster is not None:
                self._cluster.close()


def balance(nodes: Sequence[str], samples: Mapping[str, int], parts: int) -> list[list[str]]:
    """``nodes`` in ``parts`` parts of about equal samples: the largest first, each to the
    lightest part so far (longest processing time first)."""
    loads = [(0, index) for index in range(parts)]
    split: list[list[str]] = [[] for _ in range(parts)]
    for node in sorted(nodes, key=lambda node: -samples[node]):
        load, index = heapq.heappop(loads)
        split[index].append(node)
        heapq.heappush(loads, (load + max(samples[node], 1), index))
    return split


def _lost(part: Sequence[str], samples: Mapping[str, int], why: str) -> WorkerRound:
    detail = f"lost with its worker: {why}; the round went on without this worker's part"
    outcomes = [Outcome(node, NodeStatus.FAILED, samples[node], 0.0, detail) for node in part]
    return WorkerRound(Partial(), outcomes)


# What runs on a worker.

_hosted: dict[str, VirtualParticipants] = {}
_hosting = threading.Lock()


def _train_part(
    key: str,
    setup: bytes,
    strategy: Strategy,
    state: bytes,
    number: int,
    nodes: list[str],
    configs: dict[str, dict[str, Any]],
    topic: str | None,
) -> bytes:
    with _hosting:
        participants = _hosted.get(key)
        if participants is None:
            described = msgpack.unpackb(setup, raw=False)
            package = TaskPackage.from_header(described["task"])
            participants = _hosted[key] = VirtualParticipants(
                package, described["shares"], strategy
            )
    global_state = unpack_state(state)
    participants.strategy.begin(number, global_state)
    report = _Reporter(topic, number) if topic is not None else None
    return pack_round(participants.run_round(number, global_state, nodes, configs, None, report))


class _Reporter:
    """Tells the driver of outcomes as they come, a few times a second, as Dask events."""

    def __init__(self, topic: str, number: int) -> None:
        from distributed import get_worker

        self.worker = get_worker()
        self.topic, self.number = topic, number
        self.waiting: list[list[Any]] = []
        self.last = time.monotonic()

    def __call__(self, outcome: Outcome) -> None:
        o = outcome
        self.waiting.append([o.node, str(o.status), o.samples, o.seconds, o.detail])
        if time.monotonic() - self.last >= REPORT_SECONDS:
            self.worker.log_event(self.topic, [self.number, self.waiting])
            self.waiting, self.last = [], time.monotonic()


def _forget(key: str) -> None:
    with _hosting:
        _hosted.pop(key, None)


# What travels: states as fedmagic's frames, everything else as msgpack.


def pack_state(state: Mapping[str, torch.Tensor]) -> bytes:
    """A state dict as one message: its frames (raw tensor bytes, never pickled)."""
    frames = [frame.serialize() for frame in encode_state(state, chunk_bytes=_CHUNK_BYTES)]
    return msgpack.packb(frames, use_bin_type=True)


def unpack_state(
    data: bytes, expected: Mapping[str, torch.Tensor] | None = None
) -> dict[str, torch.Tensor]:
    """The state :func:`pack_state` packed, checked against ``expected`` when given."""
    *pieces, end = (Frame.parse(frame) for frame in msgpack.unpackb(data, raw=False))
    reader = StateReader(expected)
    for frame in pieces:
        reader.feed(frame)
    return reader.finish(end)


def pack_round(done: WorkerRound) -> bytes:
    partial = done.partial
    return msgpack.packb(
        {
            "sums": pack_state(partial.sums) if partial.sums else None,
            "weight": partial.weight,
            "count": partial.count,
            "kept": [[pack_state(state), weight] for state, weight in partial.kept],
            "outcomes": [
                [o.node, str(o.status), o.samples, o.seconds, o.detail, o.traceback]
                for o in done.outcomes
            ],
        },
        use_bin_type=True,
    )


def unpack_round(data: bytes, reference: Mapping[str, torch.Tensor]) -> WorkerRound:
    """A worker's round; kept updates are checked against ``reference`` (the global state)."""
    fields = msgpack.unpackb(data, raw=False)
    partial = Partial(
        unpack_state(fields["sums"]) if fields["sums"] else {},
        float(fields["weight"]),
        int(fields["count"]),
        [(unpack_state(state, reference), float(weight)) for state, weight in fields["kept"]],
    )
    outcomes = [
        Outcome(node, NodeStatus(status), samples, seconds, detail, trace)
        for node, status, samples, seconds, detail, trace in fields["outcomes"]
    ]
    return WorkerRound(partial, outcomes)
