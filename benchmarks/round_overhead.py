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
import statistics
import tempfile
import time
from pathlib import Path

from harness import relay_with_participants

from fedmagic.digits import write_partitions
from fedmagic.examples.digits_task import DigitsScheduler


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--rounds", type=int, default=10)
    options = parser.parse_args()
    workdir = Path(tempfile.mkdtemp(prefix="fedmagic-overhead-"))
    layout = write_partitions(workdir, 3, data_dir="demo_task/data")
    token = secrets.token_urlsafe(8)
    with relay_with_participants("bench", token, [p.workdir for p in layout.nodes]) as url:
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
