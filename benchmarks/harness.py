"""What the benchmarks share: free ports, model-like states, a relay with waiting participants,
and what task code needs when its participants share this process."""

from __future__ import annotations

import asyncio
import contextlib
import contextvars
import os
import socket
import subprocess
import sys
import threading
from pathlib import Path
from typing import Callable, Iterator, Mapping, Sequence, TypeVar

import torch

from fedmagic import FedAvgScheduler
from fedmagic.digits import Party
from fedmagic.engine.checkpoint import Checkpoint
from fedmagic.engine.participant import ParticipantRuntime
from fedmagic.engine.policy import RoundPolicy
from fedmagic.engine.rounds import Aggregator, TaskResult
from fedmagic.engine.task import TaskPackage
from fedmagic.strategies import Strategy
from fedmagic.wire.memory import MemoryRelay

#: The party whose code runs, when parties share this process: set in each one's coroutine,
#: and asyncio.to_thread carries it into the task's methods. It lives here, not in the task's
#: module, because every participant runs a copy of that module from its source.
PARTY: contextvars.ContextVar[Party] = contextvars.ContextVar("benchmark_party")
#: Held while one in-process participant trains: torch's global RNG is then its alone.
TRAINING = threading.Lock()


def free_port() -> int:
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        return probe.getsockname()[1]


def make_state(total_bytes: int, bias: bool = False) -> dict[str, torch.Tensor]:
    """A model-like state: float32 matrices of at most 128 MiB (and small biases)."""
    state, left, index = {}, total_bytes, 0
    while left > 0:
        numel = min(left // 4, 32 << 20)
        state[f"layer{index}.weight"] = torch.randn(numel)
        if bias:
            state[f"layer{index}.bias"] = torch.randn(1024)
        left -= 4 * numel
        index += 1
    return state


@contextlib.contextmanager
def relay_with_participants(task: str, token: str, workdirs: Sequence[Path],
                            wait: float = 300) -> Iterator[str]:
    """A ``fedmagic relay`` and one ``fedmagic join`` per directory, all connected and
    waiting for ``task`` when this yields the relay's URL."""
    port = free_port()
    url = f"ws://127.0.0.1:{port}"
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    relay = subprocess.Popen([sys.executable, "-m", "fedmagic", "relay", "--port", str(port)],
                             stderr=subprocess.PIPE, text=True, env=env)
    joins = [subprocess.Popen([sys.executable, "-m", "fedmagic", "join", url, "--task", task,
                               "--token", token, "--node", f"node-{index + 1}", "--yes",
                               "--wait", str(wait)],
                              cwd=workdir, env=env, stdout=subprocess.DEVNULL,
                              stderr=subprocess.DEVNULL)
             for index, workdir in enumerate(workdirs)]
    try:
        waiting = 0
        while waiting < len(joins):
            line = relay.stderr.readline()
            if not line:
                raise SystemExit("the relay stopped before the participants connected")
            waiting += "is waiting" in line
        yield url
    finally:
        for process in joins:
            process.wait(timeout=120)
        relay.terminate()
        relay.wait(timeout=30)


def run_in_memory(
    scheduler: FedAvgScheduler,
    strategy: Strategy,
    initiator: Party,
    nodes: Sequence[Party],
    checkpoint: Path,
    on_event: Callable[[str], None] | None = None,
    policy: RoundPolicy | None = None,
    task_id: str = "benchmark",
) -> TaskResult:
    """Run a task to its end with the initiator and every node in this process: the
    initiator's ``Aggregator`` and one ``ParticipantRuntime`` per node over a ``MemoryRelay``,
    each node building the task from its source as ``fedmagic join`` does.

    Args:
        policy: how the initiator runs rounds; by default it starts as soon as
            ``min_clients`` are in (``join_grace=0``).

    Raises:
        SystemExit: if a participant's part ended in failure.
    """
    relay, token = MemoryRelay(), "benchmark"
    scheduler._setup(task_id)
    strategy.check(scheduler.min_clients, scheduler.max_clients)
    package = TaskPackage.from_scheduler(scheduler, task_id, strategy=strategy.describe())

    async def initiate() -> TaskResult:
        PARTY.set(initiator)
        link = await relay.open(role="initiator", task=task_id, token=token)
        aggregator = Aggregator(
            scheduler,
            package,
            link,
            checkpoint=Checkpoint(checkpoint),
            policy=policy or RoundPolicy(join_grace=0),
            strategy=strategy,
            on_event=on_event,
        )
        return await aggregator.run()

    async def participate(party: Party) -> None:
        PARTY.set(party)
        link = await relay.open(
            role="participant", task=task_id, token=token, node=party.name, wait=10
        )
        outcome = await ParticipantRuntime(link, party.name, lambda package: True).run()
        if not outcome.ok:
            raise SystemExit(f"{party.name} failed: {outcome.reason}")

    async def everyone() -> TaskResult:
        result, *_ = await asyncio.gather(initiate(), *map(participate, nodes))
        return result

    return asyncio.run(everyone())


Measured = TypeVar("Measured")


def alternated(
    subjects: Mapping[str, Measured], repeats: int, measure: Callable[[Measured], list[float]]
) -> dict[str, list[float]]:
    """Each subject's figures over ``repeats`` repetitions, their order rotated each time,
    so whatever else the machine does falls on every subject alike."""
    figures: dict[str, list[float]] = {label: [] for label in subjects}
    labels = list(subjects)
    for repeat in range(repeats):
        shift = repeat % len(labels)
        for label in labels[shift:] + labels[:shift]:
            figures[label] += measure(subjects[label])
    return figures
