"""Per-round framework overhead, and launch to first round, with 3 participants.

The digits task (the tutorial's ConvNet) on 3 ``fedmagic join`` processes
connected to a ``fedmagic relay`` on loopback before the task is launched.
Overhead of a round = its wall time - the slowest participant's train()
(load + local epochs) - the initiator's test(). Targets: at most 50 ms per
round, and at most 1 s from launch_task() to round 1 starting.
"""

from __future__ import annotations

import argparse
import os
import secrets
import socket
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

from fedmagic.digits import write_partitions
from fedmagic.examples.digits_task import DigitsScheduler


def free_port() -> int:
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        return probe.getsockname()[1]


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--rounds", type=int, default=10)
    options = parser.parse_args()
    workdir = Path(tempfile.mkdtemp(prefix="fedmagic-overhead-"))
    layout = write_partitions(workdir, 3, data_dir="demo_task/data")
    port, token = free_port(), secrets.token_urlsafe(8)
    url = f"ws://127.0.0.1:{port}"
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    relay = subprocess.Popen([sys.executable, "-m", "fedmagic", "relay", "--port", str(port)],
                             stderr=subprocess.PIPE, text=True, env=env)
    joins = [subprocess.Popen([sys.executable, "-m", "fedmagic", "join", url, "--task", "bench",
                               "--token", token, "--node", party.name, "--yes", "--wait", "120"],
                              cwd=party.workdir, env=env, stdout=subprocess.DEVNULL,
                              stderr=subprocess.DEVNULL)
             for party in layout.nodes]
    try:
        waiting = 0
        while waiting < len(joins):  # every participant connected, waiting for the task
            line = relay.stderr.readline()
            if not line:
                raise SystemExit("the relay stopped before the participants connected")
            waiting += "is waiting" in line
        os.chdir(layout.initiator.workdir)
        first_round: list[float] = []

        def on_event(text: str) -> None:
            if text.startswith("round 1: training") and not first_round:
                first_round.append(time.perf_counter())

        scheduler = DigitsScheduler(min_clients=3, max_clients=3, name="demo_task",
                                    max_rounds=options.rounds, merge_epochs=1, log_rounds=1)
        launched = time.perf_counter()
        result = scheduler.launch_task(task_id="bench", relay=url, token=token,
                                       on_event=on_event)
    finally:
        for process in joins:
            process.wait(timeout=60)
        relay.terminate()
        relay.wait(timeout=30)

    overheads = [row["seconds"] - row["train_seconds"] - row.get("test_seconds", 0.0)
                 for row in result.history]
    print(f"{options.rounds} rounds, 3 participants, {sum(p.train_size for p in layout.nodes)} "
          f"training images; final accuracy {result.metrics['accuracy']:.1%}")
    for row, overhead in zip(result.history, overheads):
        print(f"  round {row['round']:2d}: wall {row['seconds'] * 1000:6.1f} ms, slowest train "
              f"{row['train_seconds'] * 1000:6.1f} ms, test {row['test_seconds'] * 1000:5.1f} "
              f"ms, overhead {overhead * 1000:5.1f} ms")
    print(f"overhead per round: median {statistics.median(overheads) * 1000:.1f} ms, "
          f"max {max(overheads) * 1000:.1f} ms (target <= 50 ms)")
    print(f"launch to first round: {(first_round[0] - launched) * 1000:.0f} ms (target <= 1000 ms)")


if __name__ == "__main__":
    main()
