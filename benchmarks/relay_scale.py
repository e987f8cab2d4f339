"""The relay at real scale: a real task through ``fedmagic relay`` with up to 2,000 participants.

Why: ``round_scale.py`` stops at 300 participants in one process. The question here is
whether one relay, one initiator and one event loop each carry 2,000 connected
participants with a round overhead under 2 s on this machine, and, if not or barely,
what limits them: file descriptors, memory per connection, or the one event loop.

How: first a stock ``fedmagic relay`` shows the default limit a 2,000-participant
task may meet (joins waiting per address, for participants that join before the task
starts). Then for each N (default 300, 1,000, 2,000), each with a fresh relay and task:

* the relay is ``fedmagic relay`` (its CLI: it raises its own open-file limit and
  derives its connection cap from it), with ``--max-participants N``;
* N echo participants (round_scale's protocol: verify, then send back the weights they
  got, no training) over ceil(N / 500) processes, each one asyncio loop with one
  websocket per participant, its soft RLIMIT_NOFILE raised to the hard limit; every
  process imports and waits for a "go", sent once the task is up, so the join (all at
  once, as after a relay restart) is timed without process start;
* the initiator in this process: round_scale's ``Echo`` task (the tutorial ConvNet,
  85 KiB of state) through ``start_task``, with min_clients = max_clients = N.

A round's time is from one round's "averaged" event to the next (the checkpoint save
included), the median of rounds 2..R; round 1 (which also tests) is shown apart. With
no training all of it is overhead: nothing is subtracted. Participants note when each
got the whole state, which splits a round into the fan-out and the collection of the N
updates. At each round's end the CPU times of the relay, this process, the participants
and the whole machine (whatever else runs beside) are read with psutil, and the relay's
RSS and descriptors. For comparison, round_scale's hand-written initiator (send the
state, read N updates back, nothing else) runs at the largest N on the same relay
afterwards, its participants all in one process.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import math
import os
import queue
import resource
import secrets
import select
import statistics
import subprocess
import sys
import tempfile
import threading
import time
from dataclasses import dataclass
from pathlib import Path

import psutil
import torch
from harness import free_port
from round_scale import Echo, baseline_round_seconds, echo

from fedmagic.engine.launch import start_task
from fedmagic.errors import RelayRefused
from fedmagic.examples.digits_task import ConvNet
from fedmagic.wire.link import Link
from fedmagic.wire.relay import RelayLimits, connection_cap

SCRATCH = Path("/tmp/relaybench")
MIB = 1 << 20
#: Cores other processes may take during the rounds before the verdict says the machine was busy.
BUSY_MACHINE = 0.2
#: Participants' processes print these; the parent waits for them with deadlines.
READY, CONNECTED, ROUNDS, FAILED = "ready", "connected", "rounds", "failed"


# Participants' processes.


def raise_own_open_file_limit() -> tuple[int, int]:
    """Raise this process's soft RLIMIT_NOFILE to its hard limit; (soft, hard) after."""
    soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    if hard != resource.RLIM_INFINITY and soft < hard:
        resource.setrlimit(resource.RLIMIT_NOFILE, (hard, hard))
    return resource.getrlimit(resource.RLIMIT_NOFILE)


async def open_participant(url: str, task: str, token: str, node: str) -> tuple[Link, float]:
    started = time.perf_counter()
    link = await Link.open(url, role="participant", task=task, token=token, node=node, wait=30)
    return link, time.perf_counter() - started


async def participants_main(url: str, task: str, token: str, first: int, count: int) -> None:
    """One process's participants: ready, then on "go" connect all at once, then echo."""
    print(READY, *raise_own_open_file_limit(), flush=True)
    await asyncio.to_thread(sys.stdin.readline)
    began = time.time()
    opened = await asyncio.gather(
        *(open_participant(url, task, token, f"p{first + i}") for i in range(count)),
        return_exceptions=True,
    )
    failures = [str(item) for item in opened if isinstance(item, BaseException)]
    links = [item for item in opened if not isinstance(item, BaseException)]
    summary = {
        "began": began,
        "done": time.time(),
        "ok": len(links),
        "latencies": [round(seconds, 4) for _, seconds in links],
        "failures": failures[:3],
        "failed": len(failures),
    }
    print(CONNECTED, json.dumps(summary), flush=True)
    rounds: dict[int, list[float]] = {}
    outcomes = await asyncio.gather(
        *(echo(link, rounds) for link, _ in links), return_exceptions=True
    )
    errors = [repr(outcome) for outcome in outcomes if isinstance(outcome, BaseException)]
    if errors:
        print(FAILED, len(errors), errors[0], flush=True)
    fan_out = {number: [min(times), max(times), len(times)] for number, times in rounds.items()}
    print(ROUNDS, json.dumps(fan_out), flush=True)


class Participants:
    """Participants' processes, and the lines they print, read on threads of their own."""

    def __init__(self, url: str, task: str, token: str, count: int, per_process: int) -> None:
        self.processes: list[subprocess.Popen] = []
        self.lines: queue.Queue[tuple[int, str]] = queue.Queue()
        #: One a process, reading its lines until it ends: then they are all in ``lines``.
        self.readers: list[threading.Thread] = []
        env = {**os.environ, "OMP_NUM_THREADS": "1"}
        for index, first in enumerate(range(0, count, per_process)):
            size = min(per_process, count - first)
            process = subprocess.Popen(
                [
                    sys.executable,
                    __file__,
                    "--participants-of",
                    url,
                    task,
                    token,
                    str(first),
                    str(size),
                ],
                stdin=subprocess.PIPE,
                stdout=subprocess.PIPE,
                text=True,
                env=env,
            )
            self.processes.append(process)
            reader = threading.Thread(target=self._read, args=(index, process), daemon=True)
            reader.start()
            self.readers.append(reader)

    def _read(self, index: int, process: subprocess.Popen) -> None:
        for line in process.stdout:
            self.lines.put((index, line.rstrip("\n")))

    def collect(self, word: str, seconds: float) -> list[str]:
        """Each process's line starting with ``word``, waiting at most ``seconds``; a
        "failed" line is shown.

        Raises:
            SystemExit: if a process ended without the line, or at the deadline.
        """
        found: dict[int, str] = {}
        deadline = time.monotonic() + seconds
        while len(found) < len(self.processes):
            try:
                index, line = self.lines.get(timeout=0.5)
            except queue.Empty:
                ended = [i for i, reader in enumerate(self.readers) if not reader.is_alive()]
                if any(i not in found for i in ended) and self.lines.empty():
                    raise SystemExit(
                        f"participants: a process ended before saying {word!r}"
                    ) from None
                if time.monotonic() >= deadline:
                    raise SystemExit(
                        f"participants: no {word!r} from all within {seconds:g} s"
                    ) from None
                continue
            if line.startswith(FAILED):
                print(f"participants' process {index}: {line}", flush=True)
            elif line.startswith(word):
                found[index] = line[len(word) :].strip()
        return [found[index] for index in range(len(self.processes))]

    def go(self) -> None:
        for process in self.processes:
            process.stdin.write("go\n")
            process.stdin.flush()

    def stop(self) -> None:
        for process in self.processes:
            if process.poll() is None:
                process.kill()
            process.wait(30)


# Processes' figures.


def rss(pid: int) -> int:
    return psutil.Process(pid).memory_info().rss


def peak_rss(pid: int) -> int:
    with open(f"/proc/{pid}/status") as status:
        for line in status:
            if line.startswith("VmHWM:"):
                return int(line.split()[1]) * 1024
    return 0


def fds(pid: int) -> int:
    return len(os.listdir(f"/proc/{pid}/fd"))


def open_file_limits(pid: int) -> tuple[int, int]:
    """Soft and hard RLIMIT_NOFILE of ``pid``, from /proc/<pid>/limits."""
    with open(f"/proc/{pid}/limits") as limits:
        for line in limits:
            if line.startswith("Max open files"):
                soft, hard = line.split()[3:5]
                return int(soft), int(hard)
    raise SystemExit(f"no open-file limit in /proc/{pid}/limits")


def cpu_seconds(pid: int) -> float:
    times = psutil.Process(pid).cpu_times()
    return times.user + times.system


def machine_busy_seconds() -> float:
    """CPU seconds every process on this machine spent, all cores together."""
    times = psutil.cpu_times()
    guests = getattr(times, "guest", 0.0) + getattr(times, "guest_nice", 0.0)  # in user already
    return sum(times) - times.idle - getattr(times, "iowait", 0.0) - guests


def listen_overflows() -> int:
    """This machine's count of connections dropped for a full listen queue (TcpExt)."""
    with open("/proc/net/netstat") as netstat:
        lines = [line.split() for line in netstat if line.startswith("TcpExt:")]
    return int(dict(zip(lines[0][1:], lines[1][1:], strict=True))["ListenOverflows"])


@dataclass
class Sample:
    """One round's end: the wall clock and everyone's CPU time, the relay's RSS and fds."""

    wall: float
    relay_cpu: float
    initiator_cpu: float
    participants_cpu: float
    machine_cpu: float
    relay_rss: int
    relay_fds: int
    initiator_rss: int


def sample(relay: int, participants: list[int]) -> Sample:
    return Sample(
        time.time(),
        cpu_seconds(relay),
        cpu_seconds(os.getpid()),
        sum(cpu_seconds(pid) for pid in participants),
        machine_busy_seconds(),
        rss(relay),
        fds(relay),
        rss(os.getpid()),
    )


# The relay.


def start_relay(
    port: int, log: Path, max_participants: int | None = None, waiting: int | None = None
) -> subprocess.Popen:
    """``fedmagic relay`` on ``port``, listening when this returns; its stderr into ``log``.

    Args:
        max_participants: None: a stock relay's.
        waiting: joins held waiting for the task, overall and per address; None: the defaults.
    """
    command = [sys.executable, "-m", "fedmagic", "relay", "--port", str(port)]
    if waiting is not None:
        command += ["--max-waiting", str(waiting), "--max-waiting-per-address", str(waiting)]
    if max_participants is not None:
        command += ["--max-participants", str(max_participants)]
    with open(log, "w") as stderr:
        relay = subprocess.Popen(command, stdout=subprocess.PIPE, stderr=stderr, text=True)
    deadline = time.monotonic() + 60
    while time.monotonic() < deadline and relay.poll() is None:
        if select.select([relay.stdout], [], [], 0.5)[0]:
            if "listening" in relay.stdout.readline():
                return relay
    stop_relay(relay)
    raise SystemExit(f"the relay did not start; see {log}")


def stop_relay(relay: subprocess.Popen) -> None:
    if relay.poll() is None:
        relay.terminate()
        try:
            relay.wait(30)
        except subprocess.TimeoutExpired:
            relay.kill()
            relay.wait(30)


def relay_log_summary(log: Path) -> str:
    text = log.read_text()
    counts = {word: text.count(word) for word in ("refused", "dropping", "throttling", "busy")}
    limits = [line.split("INFO ", 1)[-1] for line in text.splitlines() if "limit" in line]
    return (
        "; ".join(limits[:2])
        + " | log lines: "
        + ", ".join(f"{word} {count}" for word, count in counts.items())
    )


async def waiting_refusal(url: str, token: str, cap: int) -> tuple[int, str]:
    """Hold ``cap`` joins waiting for a task not started yet, from this one address; what
    the next one heard (it asks once: its wait is shorter than a busy relay's retry delay)."""
    waiting = [
        asyncio.ensure_future(
            Link.open(url, role="participant", task="early", token=token, node=f"w{i}", wait=20)
        )
        for i in range(cap)
    ]
    try:
        await asyncio.sleep(1.0)
        if any(join.done() for join in waiting):
            return 0, "the waiting joins did not wait"
        try:
            link = await Link.open(
                url, role="participant", task="early", token=token, node="x", wait=0.5
            )
            await link.close()
            return cap, "admitted"
        except RelayRefused as refusal:
            return cap, f"({refusal.code}) {refusal.message}"
    finally:
        for join in waiting:
            join.cancel()
        await asyncio.gather(*waiting, return_exceptions=True)


def probe_stock_relay(workdir: Path) -> list[str]:
    """What a stock ``fedmagic relay`` refuses on the way to 2,000 participants."""
    limits = RelayLimits()
    port, token = free_port(), secrets.token_hex(8)
    url = f"ws://127.0.0.1:{port}"
    relay = start_relay(port, workdir / "relay-stock.log")
    try:
        held, early = asyncio.run(waiting_refusal(url, token, limits.max_waiting_per_address))
    finally:
        stop_relay(relay)
    return [
        f"RelayLimits.max_participants = {limits.max_participants} (--max-participants): "
        "participants of one task",
        f"RelayLimits.max_waiting_per_address = {limits.max_waiting_per_address} "
        f"(--max-waiting-per-address; --max-waiting {limits.max_waiting}): with {held} joins "
        f"from 127.0.0.1 waiting for a task not started yet, the next heard: {early}",
    ]


# One size.


@dataclass
class Figures:
    """What one N measured."""

    count: int
    processes: int
    connect: float = 0.0
    connect_p50: float = 0.0
    connect_max: float = 0.0
    verified: float = 0.0
    first_round: float = 0.0
    round: float = 0.0
    fan_out: float = 0.0
    collect: float = 0.0
    relay_idle_rss: int = 0
    relay_rss: int = 0
    relay_peak_rss: int = 0
    relay_idle_fds: int = 0
    relay_fds: int = 0
    relay_limits: tuple[int, int] = (0, 0)
    relay_cpu: float = 0.0
    initiator_cpu: float = 0.0
    participants_cpu: float = 0.0
    others_cpu: float = 0.0
    overflows: int = 0
    initiator_rss_before: int = 0
    initiator_rss: int = 0
    baseline: float | None = None
    relay_log: str = ""

    @property
    def per_connection(self) -> float:
        return (self.relay_rss - self.relay_idle_rss) / self.count

    @property
    def fds_per_connection(self) -> float:
        return (self.relay_fds - self.relay_idle_fds) / self.count


class Timeline:
    """The task's events that matter here, with the time each came and a sample at each."""

    def __init__(self, relay: int, participants: list[int]) -> None:
        self.relay, self.participants = relay, participants
        self.gathering = threading.Event()
        self.started: dict[int, float] = {}
        self.ended: dict[int, Sample] = {}
        #: The relay with every participant connected and verified, before round 1's data.
        self.before_rounds: Sample | None = None

    def __call__(self, text: str) -> None:
        if text.startswith("waiting for "):
            self.gathering.set()
        elif text.startswith("round ") and ": training on" in text:
            number = int(text.split()[1].rstrip(":"))
            self.started[number] = time.time()
            if number == 1:  # said before the round's first frame goes out
                self.before_rounds = sample(self.relay, self.participants)
        elif text.startswith("round ") and "averaged" in text:
            number = int(text.split()[1].split("/")[0])
            self.ended[number] = sample(self.relay, self.participants)


def measure(count: int, options: argparse.Namespace, workdir: Path) -> Figures:
    """A fresh relay, ``count`` participants and one task of ``options.rounds`` rounds."""
    port, token = free_port(), secrets.token_hex(8)
    url, task = f"ws://127.0.0.1:{port}", f"scale-{count}-{secrets.token_hex(3)}"
    log = workdir / f"relay-{count}.log"
    relay = start_relay(port, log, max_participants=count, waiting=2 * count)
    participants, run = None, None
    figures = Figures(count, math.ceil(count / options.per_process))
    try:
        time.sleep(1.0)  # idle: after its start-up allocations
        figures.relay_idle_rss, figures.relay_idle_fds = rss(relay.pid), fds(relay.pid)
        figures.relay_limits = open_file_limits(relay.pid)
        participants = Participants(url, task, token, count, options.per_process)
        participants.collect(READY, 300)
        pids = [process.pid for process in participants.processes]
        timeline = Timeline(relay.pid, pids)
        figures.initiator_rss_before = rss(os.getpid())
        scheduler = Echo(min_clients=count, max_clients=count, max_rounds=options.rounds, name=task)
        run = start_task(
            scheduler,
            task,
            relay=url,
            token=token,
            join_timeout=300,
            join_grace=0,
            checkpoint_dir=workdir / task,
            on_event=timeline,
            quiet=True,
        )
        if not timeline.gathering.wait(120):
            raise SystemExit("the initiator did not start gathering within 120 s")
        overflows, went = listen_overflows(), time.time()
        participants.go()
        connected = [json.loads(line) for line in participants.collect(CONNECTED, 300)]
        admitted = sum(report["ok"] for report in connected)
        if admitted < count:
            failures = [text for report in connected for text in report["failures"]]
            raise SystemExit(f"only {admitted} of {count} participants connected: {failures}")
        figures.connect = max(report["done"] for report in connected) - went
        figures.overflows = listen_overflows() - overflows
        latencies = [seconds for report in connected for seconds in report["latencies"]]
        figures.connect_p50 = statistics.median(latencies)
        figures.connect_max = max(latencies)
        run.wait(600)
        fan_outs = [json.loads(line) for line in participants.collect(ROUNDS, 120)]
        figures.relay_peak_rss = peak_rss(relay.pid)
        figures.relay_log = relay_log_summary(log)
        summarize(figures, timeline, fan_outs, went, options.rounds)
        if count in options.baseline_at:
            figures.baseline = baseline_round_seconds(url, token, count, options.rounds - 1)
    finally:
        if run is not None and not run.done():
            run.stop(now=True)
        if participants is not None:
            participants.stop()
        stop_relay(relay)
    return figures


def summarize(
    figures: Figures, timeline: Timeline, fan_outs: list[dict], went: float, rounds: int
) -> None:
    """Round times, their fan-out and collection, CPU shares and memory, from the timeline."""
    ended = timeline.ended
    if sorted(ended) != list(range(1, rounds + 1)):
        raise SystemExit(f"rounds that ended: {sorted(ended)}, not 1..{rounds}")
    later = range(2, rounds + 1)
    figures.verified = timeline.started[1] - went
    figures.first_round = ended[1].wall - timeline.started[1]
    figures.round = statistics.median(ended[n].wall - ended[n - 1].wall for n in later)
    got_all = {n: max(report[str(n)][1] for report in fan_outs) for n in later}
    figures.fan_out = statistics.median(got_all[n] - timeline.started[n] for n in later)
    figures.collect = statistics.median(ended[n].wall - got_all[n] for n in later)
    quiet = timeline.before_rounds
    assert quiet is not None, "round 1 started"
    figures.relay_rss, figures.relay_fds = quiet.relay_rss, quiet.relay_fds
    first, last = ended[1], ended[rounds]
    wall = last.wall - first.wall
    figures.relay_cpu = (last.relay_cpu - first.relay_cpu) / wall
    figures.initiator_cpu = (last.initiator_cpu - first.initiator_cpu) / wall
    figures.participants_cpu = (last.participants_cpu - first.participants_cpu) / wall
    ours = figures.relay_cpu + figures.initiator_cpu + figures.participants_cpu
    figures.others_cpu = (last.machine_cpu - first.machine_cpu) / wall - ours
    figures.relay_fds = max([figures.relay_fds] + [s.relay_fds for s in ended.values()])
    figures.initiator_rss = max(s.initiator_rss for s in ended.values())


# The report.


def print_tables(results: list[Figures]) -> None:
    print("\ntime (s; a round: median of rounds 2..R, end to end; all of it overhead)")
    print(
        f"{'N':>5} {'procs':>5} {'connect':>8} {'joins/s':>8} {'p50/max':>11} {'ovfl':>5} "
        f"{'verified':>8} {'round 1':>8} {'round':>7} {'ms/part.':>8} {'fan-out':>8} "
        f"{'collect':>8} {'baseline':>8}"
    )
    for f in results:
        baseline = "" if f.baseline is None else f"{f.baseline:8.2f}"
        print(
            f"{f.count:5d} {f.processes:5d} {f.connect:8.2f} {f.count / f.connect:8.0f} "
            f"{f.connect_p50:5.2f}/{f.connect_max:5.2f} {f.overflows:5d} {f.verified:8.2f} "
            f"{f.first_round:8.2f} {f.round:7.2f} {f.round / f.count * 1000:8.2f} "
            f"{f.fan_out:8.2f} {f.collect:8.2f} {baseline:>8}"
        )
    print(
        "(connect: go to the last welcome; p50/max: one join's; ovfl: the machine's listen-queue"
        " overflows meanwhile; verified: go to round 1's start; fan-out: a round's start to the"
        " last participant holding the state; collect: from then to the round's end; baseline:"
        " round_scale's hand-written initiator)"
    )
    print("\nresources (CPU: seconds per wall second over rounds 2..R, 1.0 = one core busy)")
    print(
        f"{'N':>5} {'relay':>6} {'s/rnd':>6} {'init.':>6} {'parts':>6} {'others':>6} "
        f"{'relay RSS idle/N/peak MiB':>25} {'KiB/conn':>8} {'fds idle/N':>10} {'fd/conn':>7} "
        f"{'NOFILE s/h':>11} {'init. RSS +MiB':>14}"
    )
    for f in results:
        grown = (f.initiator_rss - f.initiator_rss_before) / MIB
        print(
            f"{f.count:5d} {f.relay_cpu:6.2f} {f.relay_cpu * f.round:6.2f} "
            f"{f.initiator_cpu:6.2f} {f.participants_cpu:6.2f} {f.others_cpu:6.2f} "
            f"{f.relay_idle_rss / MIB:9.1f}/{f.relay_rss / MIB:6.1f}/{f.relay_peak_rss / MIB:6.1f}"
            f"   {f.per_connection / 1024:8.1f} {f.relay_idle_fds:4d}/{f.relay_fds:5d} "
            f"{f.fds_per_connection:7.2f} {f.relay_limits[0]:5d}/{f.relay_limits[1]:5d} "
            f"{grown:14.1f}"
        )
    print(
        "(relay s/rnd: its CPU seconds per round; parts: all participants' processes; others:"
        " every other process on this machine, whatever else runs beside this benchmark)"
    )
    for f in results:
        print(f"relay at N = {f.count}: {f.relay_log}")


def print_verdict(f: Figures, target: float, state_bytes: int) -> None:
    met = "met" if f.round < target else "not met"
    print(f"\nround overhead at N = {f.count:,}: {f.round:.2f} s (target < {target:g} s): {met}")
    if f.others_cpu > BUSY_MACHINE:
        print(
            f"  (the machine was busy: other processes took {f.others_cpu:.2f} of its "
            f"{psutil.cpu_count()} cores during the rounds; the CPU figures per participant "
            f"below carry over better than the round time)"
        )
    print(
        f"  (the whole round time: training is trivial, so nothing is subtracted; "
        f"round 1, with the join behind it: {f.first_round:.2f} s; round_scale's hand-written "
        f"initiator: {'not run' if f.baseline is None else f'{f.baseline:.2f} s'})"
    )
    used, (soft, hard) = f.relay_fds, f.relay_limits
    ours = f.relay_cpu + f.initiator_cpu + f.participants_cpu
    peak = (f.relay_peak_rss - f.relay_rss) / f.count
    print(f"what limits it, at N = {f.count:,}:")
    print(
        f"  relay file descriptors: {used} in use of a soft limit of {soft} (hard {hard}); "
        f"the relay's connection cap from it: {connection_cap(soft):,}"
    )
    print(
        f"  relay memory: {f.relay_idle_rss / MIB:.1f} MiB idle, {f.relay_rss / MIB:.1f} MiB "
        f"with {f.count:,} connections (all verified, before round 1): "
        f"{f.per_connection / MIB:.3f} MiB "
        f"({f.per_connection / 1024:.0f} KiB) per connection; peak "
        f"{f.relay_peak_rss / MIB:.1f} MiB during rounds"
    )
    print(
        f"  relay event loop: {f.relay_cpu:.0%} of one core over the rounds "
        f"({f.relay_cpu * f.round:.2f} CPU s per {f.round:.2f} s round)"
    )
    print(
        f"  initiator (this process): {f.initiator_cpu:.0%} of one core; its RSS grew "
        f"{(f.initiator_rss - f.initiator_rss_before) / MIB:.1f} MiB with the task "
        f"({f.count:,} updates of {state_bytes / 1024:.0f} KiB are "
        f"{f.count * state_bytes / MIB:.0f} MiB)"
    )
    print(
        f"  participants' {f.processes} processes: {f.participants_cpu:.0%} of one core; all "
        f"of this benchmark's processes: {ours:.2f} cores, other processes on the machine: "
        f"{f.others_cpu:.2f} cores, of {psutil.cpu_count()}"
    )
    print(
        f"  join: {f.count:,} connected in {f.connect:.2f} s ({f.count / f.connect:.0f} "
        f"joins/s; one join's connect-to-welcome median {f.connect_p50:.2f} s, slowest "
        f"{f.connect_max:.2f} s; {f.overflows} listen-queue overflows), all verified by the "
        f"initiator {f.verified:.2f} s after the go"
    )
    per_round = f.relay_cpu * f.round / f.count
    print("figures for a design document (estimates, from this N):")
    print(
        f"  relay memory per connection: {f.per_connection / 1024:.0f} KiB idle; during a "
        f"round up to {peak / 1024:.0f} KiB more (peak RSS), against a state of "
        f"{state_bytes / 1024:.0f} KiB sent to each"
    )
    print(f"  relay file descriptors per connection: {f.fds_per_connection:.2f}")
    print(
        f"  connections this machine's hard RLIMIT_NOFILE ({hard}) allows one relay: "
        f"{connection_cap(hard):,} (the relay's cap: the limit less an eighth); at "
        f"{f.per_connection / 1024:.0f} KiB each they take "
        f"{connection_cap(hard) * f.per_connection / MIB:.0f} MiB idle"
    )
    print(
        f"  relay CPU per participant per round: {per_round * 1000:.2f} ms (linear in N, "
        f"an estimate): its one event loop would be saturated (one core busy all round) "
        f"at about N = {f.count / max(f.relay_cpu, 1e-9):,.0f} if a round still took "
        f"{f.round:.2f} s, and at about N = {target / max(per_round, 1e-9):,.0f} in a "
        f"{target:g} s round"
    )
    initiator = f.initiator_cpu * f.round / f.count
    print(
        f"  initiator CPU per participant per round: {initiator * 1000:.2f} ms: its event loop "
        f"(and the GIL it shares with its folding thread) would be saturated at about "
        f"N = {target / max(initiator, 1e-9):,.0f} in a {target:g} s round"
    )
    everyone = (f.relay_cpu + f.initiator_cpu + f.participants_cpu) * f.round / f.count
    cores = psutil.cpu_count()
    print(
        f"  all parties' CPU per participant per round here: {everyone * 1000:.2f} ms; this "
        f"machine's {cores} cores, running every party, could carry at most about "
        f"N = {cores * target / max(everyone, 1e-9):,.0f} in a {target:g} s round"
    )


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--sizes", type=int, nargs="+", default=[300, 1000, 2000])
    parser.add_argument("--rounds", type=int, default=8, help="R, at least 4 (default 8)")
    parser.add_argument(
        "--per-process", type=int, default=500, help="participants per process (default 500)"
    )
    parser.add_argument(
        "--baseline-at",
        type=int,
        nargs="*",
        help="sizes to run round_scale's baseline at (default: the largest)",
    )
    parser.add_argument("--target", type=float, default=2.0, help="seconds (default 2)")
    parser.add_argument(
        "--skip-probe",
        action="store_true",
        help="do not probe a stock relay's default limits first",
    )
    parser.add_argument("--participants-of", nargs=5, help=argparse.SUPPRESS)
    options = parser.parse_args()
    if options.participants_of:
        url, task, token, first, count = options.participants_of
        asyncio.run(participants_main(url, task, token, int(first), int(count)))
        return
    if options.rounds < 4:
        parser.error("--rounds must be at least 4")
    if options.baseline_at is None:
        options.baseline_at = [max(options.sizes)]
    SCRATCH.mkdir(parents=True, exist_ok=True)
    workdir = Path(tempfile.mkdtemp(prefix="run-", dir=SCRATCH))
    os.chdir(workdir)
    print(
        f"this process: soft/hard RLIMIT_NOFILE {raise_own_open_file_limit()}; "
        f"{psutil.cpu_count()} cores; scratch {workdir}",
        flush=True,
    )
    if not options.skip_probe:
        print("a stock `fedmagic relay` (default limits):", flush=True)
        for line in probe_stock_relay(workdir):
            print(f"  {line}", flush=True)
    results = []
    for count in options.sizes:
        started = time.perf_counter()
        results.append(measure(count, options, workdir))
        print(f"N = {count}: measured in {time.perf_counter() - started:.0f} s", flush=True)
    print_tables(results)
    state_bytes = sum(t.numel() * t.element_size() for t in ConvNet().state_dict().values())
    print_verdict(max(results, key=lambda f: f.count), options.target, state_bytes)


if __name__ == "__main__":
    torch.set_num_threads(1)
    main()
