"""A ``fedmagic relay`` at rest: its resident memory and how long it takes to start.

Starts ``python -m fedmagic relay`` on a free loopback port, times it until it
accepts a connection, lets it idle, then reads its resident memory from
/proc. For comparison, the same for a process that imports ``fedmagic.wire.codec``
(torch and numpy), which the relay used to. Prints the figures (target: idle
resident memory under 100 MiB).
"""

from __future__ import annotations

import argparse
import os
import signal
import socket
import subprocess
import sys
import time

from harness import free_port

PAGE = os.sysconf("SC_PAGE_SIZE")


def resident(pid: int) -> int:
    with open(f"/proc/{pid}/statm") as statm:
        return int(statm.read().split()[1]) * PAGE


def start_relay(port: int) -> tuple[subprocess.Popen, float]:
    """The relay process, and the seconds until it accepted a connection."""
    started = time.perf_counter()
    relay = subprocess.Popen([sys.executable, "-m", "fedmagic", "relay", "--port", str(port)],
                             stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    deadline = time.monotonic() + 60
    while True:
        try:
            socket.create_connection(("127.0.0.1", port), timeout=1).close()
            return relay, time.perf_counter() - started
        except OSError:
            if relay.poll() is not None or time.monotonic() > deadline:
                raise SystemExit(f"the relay did not start (exit status {relay.poll()})")
            time.sleep(0.01)


def importing_codec() -> int:
    """Resident memory of a process that imported ``fedmagic.wire.codec``."""
    process = subprocess.Popen([sys.executable, "-c", "import sys, fedmagic.wire.codec; "
                                "print('ready', flush=True); sys.stdin.read()"],
                               stdin=subprocess.PIPE, stdout=subprocess.PIPE, text=True)
    try:
        process.stdout.readline()
        return resident(process.pid)
    finally:
        process.stdin.close()
        process.wait(timeout=30)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--idle", type=float, default=2.0, help="seconds to idle before "
                        "measuring (default 2)")
    options = parser.parse_args()
    relay, seconds = start_relay(free_port())
    try:
        time.sleep(options.idle)
        rss = resident(relay.pid)
    finally:
        relay.send_signal(signal.SIGINT)
        relay.wait(timeout=30)
    codec = importing_codec()
    print(f"fedmagic relay: accepting connections {seconds:.2f} s after starting; "
          f"idle resident memory {rss / (1 << 20):.1f} MiB (target < 100 MiB)")
    print(f"for comparison, a process that imports fedmagic.wire.codec (torch, numpy), as the "
          f"relay used to: {codec / (1 << 20):.1f} MiB")


if __name__ == "__main__":
    main()
