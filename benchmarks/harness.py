"""What the benchmarks share: free ports, model-like states, a relay with waiting participants,
and what task code needs when its participants share this process."""

from __future__ import annotations

import contextlib
import contextvars
import os
import socket
import subprocess
import sys
import threading
from pathlib import Path
from typing import Iterator, Sequence

import torch

from fedmagic.digits import Party

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
