"""Is fedmagic's simulation ahead of Flower's? Round time, framework overhead per participant and
peak memory with N = 100, 1,000 and 10,000 virtual participants on this machine.

The issue's targets: ahead of Flower at every N; at most 0.5 ms of framework overhead per
participant per round at N = 10,000; memory under 4 GiB.

The task, the same on both sides: the tutorial's ``DigitsScheduler``
(``fedmagic/examples/digits_task.py``: its ConvNet, its SGD with momentum 0.5, its MNIST loader
with its normalisation, its own ``train()`` and ``test()``), unchanged but for
``batch_size=8``. Each virtual participant holds exactly 8 images, so its ``train()`` is one
small batch: one SGD step. There are only 1,438 training digits, so the training set is the real
digits (sklearn's, written as MNIST files by ``fedmagic.digits``) repeated to N x 8 images, and
fedmagic's iid partition (seed 0) gives each participant 8 of them; Flower's participant i gets
the same 8 as fedmagic's. Per participant and round both sides do the same work: load the global
weights, clear the optimizer's state (virtual participants keep nothing between rounds), the
tutorial's ``train()`` on its 8 images, hand back the state; then FedAvg over all N, weighted by
samples, and the tutorial's ``test()`` of the new global model on the 359 held-out digits.

* fedmagic: ``Simulation(engine="dask")``: one single-threaded Dask worker process a core, each
  folding its participants into one partial sum.
* Flower: ``flwr.simulation.run_simulation`` with the message API (a ``ServerApp`` running
  ``flwr.serverapp.strategy.FedAvg`` over all N each round, no federated evaluation, the same
  central test as ``evaluate_fn``; a ``ClientApp`` whose ``train`` does the work above), on Ray
  with ``num_cpus=1`` per client: one actor a core. Each actor process builds the scheduler and
  the loaders once and keeps them, as fedmagic's workers do. Flower runs from its own virtual
  environment (``--flower-python``) that reuses this one's torch; this checkout's fedmagic
  gives both sides the task.

A round is timed from the end of the previous round to the end of this one, each side by its own
marks: fedmagic's round events (the first round from "Dask cluster ... ready"), Flower's
``evaluate_fn``, which ends its rounds (the first round from the evaluation of the initial
model). Start-up (Dask's or Ray's, the data, the partition) stays out. The first round is the
warm-up (workers build the task, load the data and the shares) and is reported apart; a trial's
round time is the median of its later rounds.

Overhead per participant, as ``benchmarks/engines.py`` defines it: (round wall time - the serial
compute of the same round) / N, where the serial compute is the same participants' training
measured by a plain loop in one process (the trial's own process, before and after its run: the
first 200 participants of the partition, median ms per participant) x N / min(workers, cores),
plus the one central ``test()`` of the round, timed the same way. Whatever else a round costs
(sending the model, dispatch, loaders, handing back updates, aggregating, checkpoints, logging,
waiting) is overhead.

Peak memory: RSS summed over a trial's process tree (the trial's process; Dask's nannies and
workers; Ray's GCS, raylet, workers and actors), sampled every 0.2 s from the driver, the peak
over the trial, start-up and the serial baselines included. RSS counts the shared pages of the
torch libraries once per process, so it overstates what the tree holds.

Each trial runs in a fresh process, one system at one N, alternating the systems: fedmagic 100,
Flower 100, fedmagic 1,000, Flower 1,000, then fedmagic 10,000 (Flower only up to 1,000, as the
issue asks), and the pairs again with Flower first, as long as ``--budget`` allows. Figures are
medians over trials with their spread (min-max); a process a trial leaves behind is reported and
ended by its pid.

Run: ``python benchmarks/simulation.py`` (about 10 minutes on 2 cores; ``--quick``: N = 100 and
1,000, one pair each, about 3 minutes). Flower's environment, once:
``python -m venv --system-site-packages ENV && ENV/bin/pip install "flwr[simulation]"``, then
``--flower-python ENV/bin/python``; without it the fedmagic figures are printed alone.
"""

from __future__ import annotations

import argparse
import contextlib
import json
import os
import platform
import re
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

import psutil
from processes import orphans, set_child_subreaper

SYSTEMS = ("fedmagic", "flower")
#: Images each virtual participant holds: one batch of the tutorial's loader.
BATCH = 8
#: The partition's seed, the same on both sides.
SEED = 0
#: The tutorial's task name: its data is read from ``demo_task/data`` in the working directory.
TASK = "demo_task"
#: Participants in each serial (plain loop) measurement.
BASELINE = 200
MiB = 1 << 20
#: Where a trial's process reads its settings (Flower's actors read them too).
ENV_PREFIX = "FEDMAGIC_SIMBENCH_"
HERE = Path(__file__).resolve().parent
ROOT = HERE.parent
DEFAULT_FLOWER_PYTHON = Path("/tmp/simbench/flwr-env/bin/python")


# --- The task, the same for both systems ----------------------------------------------------------


def write_digits(root: Path, participants: int) -> Path:
    """The tutorial's data for ``participants`` participants of ``BATCH`` images each, under
    ``root/demo_task/data``: the real training digits repeated to ``participants * BATCH``
    images, and the real held-out test digits."""
    import numpy as np
    import torchvision

    from fedmagic.digits import write_mnist, write_partitions

    (whole,) = write_partitions(root / "real", 1, seed=SEED, data_dir=f"{TASK}/data").nodes
    train = torchvision.datasets.MNIST(whole.data_dir, train=True)
    test = torchvision.datasets.MNIST(whole.data_dir, train=False)
    repeat = np.arange(participants * BATCH) % len(train)
    write_mnist(
        root / TASK / "data",
        train.data.numpy()[repeat],
        train.targets.numpy().astype(np.uint8)[repeat],
        test.data.numpy(),
        test.targets.numpy().astype(np.uint8),
    )
    return root / TASK


def make_scheduler(participants: int, rounds: int) -> Any:
    """The tutorial's scheduler as ``fedmagic simulate`` builds it, with batches of ``BATCH``;
    reads its data from the working directory."""
    from fedmagic.examples.digits_task import DigitsScheduler

    return DigitsScheduler(
        min_clients=1,
        max_clients=participants,
        name=TASK,
        max_rounds=rounds,
        batch_size=BATCH,
    )


class Participants:
    """The tutorial's scheduler, its whole training set and each participant's share of it, as
    one process (the baseline's, or one of Flower's actors) holds them."""

    def __init__(self, participants: int, rounds: int) -> None:
        import torch

        from fedmagic.partition import partition

        torch.set_num_threads(1)
        self.scheduler = make_scheduler(participants, rounds)
        self.scheduler._setup("simbench")
        self.whole = self.scheduler.make_train_dataloader()
        shares = partition(self.whole.dataset, participants, scheme="iid", seed=SEED)
        self.shares = [share.tolist() for share in shares.shares]
        self.loaders: dict[int, Any] = {}

    def loader(self, participant: int) -> Any:
        """Participant ``participant``'s loader: the tutorial's, over its share alone."""
        if participant not in self.loaders:
            from torch.utils.data import DataLoader, Subset

            self.loaders[participant] = DataLoader(
                Subset(self.whole.dataset, self.shares[participant]),
                batch_size=self.whole.batch_size,
                shuffle=True,
            )
        return self.loaders[participant]

    def train(self, participant: int, global_state: dict[str, Any]) -> dict[str, Any]:
        """One participant's round, the work both systems do: start from the global state with
        a fresh optimizer, the tutorial's ``train()`` on its share, its state."""
        scheduler, loader = self.scheduler, self.loader(participant)
        scheduler.make_train_dataloader = lambda: loader
        scheduler.optimizer.state.clear()
        scheduler.load_state_dict(global_state)
        scheduler.train()
        return scheduler.state_dict()

    def serial_ms(self, count: int) -> tuple[float, float]:
        """The pure compute: ``count`` participants in a plain loop; wall and CPU ms per
        participant."""
        initial = {name: value.clone() for name, value in self.scheduler.state_dict().items()}
        count = min(count, len(self.shares))
        for participant in range(count):  # build the loaders untimed, as the systems do
            self.loader(participant)
        started, cpu = time.perf_counter(), time.thread_time()
        for participant in range(count):
            self.train(participant, initial)
        wall, cpu = time.perf_counter() - started, time.thread_time() - cpu
        self.scheduler.load_state_dict(initial)
        return wall * 1000 / count, cpu * 1000 / count

    def test_ms(self) -> tuple[float, float]:
        """One central ``test()`` of the global model, as each round ends with; wall and CPU
        ms."""
        started, cpu = time.perf_counter(), time.thread_time()
        self.scheduler.test()
        return (time.perf_counter() - started) * 1000, (time.thread_time() - cpu) * 1000


def measure_baseline(participants: int, rounds: int) -> dict[str, list[float]]:
    """Serial compute and test time in this process, wall and CPU: two runs of each."""
    local = Participants(participants, rounds)
    local.serial_ms(min(20, participants))  # warm torch's kernels and allocator
    serial = [local.serial_ms(BASELINE) for _ in range(2)]
    test = [local.test_ms() for _ in range(3)]
    return {
        "serial_ms": [wall for wall, _ in serial],
        "serial_cpu_ms": [cpu for _, cpu in serial],
        "test_ms": [wall for wall, _ in test],
        "test_cpu_ms": [cpu for _, cpu in test],
    }


def merged(*baselines: dict[str, list[float]]) -> dict[str, list[float]]:
    return {key: [v for b in baselines for v in b[key]] for key in baselines[0]}


def cpu_mark() -> list[float]:
    """A round's mark: [now, CPU seconds of this process and all its descendants (Dask's or
    Ray's processes), busy CPU seconds of the whole machine]."""
    now = time.perf_counter()
    me, tree = psutil.Process(), 0.0
    for process in [me, *me.children(recursive=True)]:
        with contextlib.suppress(psutil.Error):
            times = process.cpu_times()
            tree += times.user + times.system
    machine = psutil.cpu_times()
    busy = machine.user + machine.nice + machine.system + machine.irq + machine.softirq
    return [now, tree, busy + machine.steal]


def settings() -> tuple[int, int]:
    """(participants, rounds) of this trial, from its environment."""
    return int(os.environ[ENV_PREFIX + "N"]), int(os.environ[ENV_PREFIX + "ROUNDS"])


# --- fedmagic's trial -----------------------------------------------------------------------------


def fedmagic_trial() -> dict[str, Any]:
    """fedmagic's ``Simulation`` on Dask, one worker a core; rounds timed by its events."""
    import fedmagic
    from fedmagic.engine.simulation import Simulation

    participants, rounds = settings()
    result: dict[str, Any] = {"version": fedmagic.__version__, "from": fedmagic.__file__}
    baseline = measure_baseline(participants, rounds)
    marks: dict[int, list[float]] = {}
    events: list[str] = []

    def mark(text: str) -> None:
        if text.startswith("Dask cluster"):
            marks[0] = cpu_mark()
            result["workers"] = int(re.search(r"(\d+) workers", text).group(1))
        elif found := re.match(r"round (\d+)/", text):
            marks[int(found.group(1))] = cpu_mark()
        events.append(text)

    simulation = Simulation(
        make_scheduler(participants, rounds),
        participants,
        task_id="simbench",
        partition="iid",
        seed=SEED,
        engine="dask",
        on_event=mark,
    )
    outcome = simulation.run()
    after = measure_baseline(participants, rounds)
    history = outcome.history
    result.update(
        merged(baseline, after),
        marks=[marks[r] for r in range(rounds + 1)],
        inner_seconds=[row["seconds"] for row in history],
        averaged=[row["participants"] for row in history],
        accuracy=history[-1].get("accuracy"),
        events=[text for text in events if not text.startswith("round ")][:6],
    )
    return result


# --- Flower's trial -------------------------------------------------------------------------------

#: Per process: a Flower actor's participants; the server's marks and scheduler.
_FLOWER: dict[str, Any] = {}


def flower_participants() -> Participants:
    """This actor's participants, built on its first message and kept."""
    if "participants" not in _FLOWER:
        os.chdir(os.environ[ENV_PREFIX + "WORKDIR"])
        _FLOWER["participants"] = Participants(*settings())
    return _FLOWER["participants"]


def flower_train(message: Any, context: Any) -> Any:
    """The ``ClientApp``'s train: one participant's round, the same work as fedmagic's."""
    from flwr.app import ArrayRecord, Message, MetricRecord, RecordDict

    participants = flower_participants()
    participant = int(context.node_config["partition-id"])
    state = message.content["arrays"].to_torch_state_dict()
    update = participants.train(participant, state)
    samples = len(participants.loader(participant).dataset)
    content = RecordDict(
        {"arrays": ArrayRecord(update), "metrics": MetricRecord({"num-examples": samples})}
    )
    return Message(content=content, reply_to=message)


def flower_evaluate(server_round: int, arrays: Any) -> Any:
    """The central test each round ends with; its end marks the round's end."""
    from flwr.app import MetricRecord

    scheduler = _FLOWER["server"]
    scheduler.load_state_dict(arrays.to_torch_state_dict())
    metrics = scheduler.test()
    _FLOWER["marks"][server_round] = cpu_mark()
    _FLOWER["accuracy"] = metrics["accuracy"]
    return MetricRecord(metrics)


def flower_main(grid: Any, context: Any) -> None:
    """The ``ServerApp``: FedAvg over all N each round, no federated evaluation."""
    from flwr.app import ArrayRecord
    from flwr.serverapp.strategy import FedAvg

    participants, rounds = settings()
    strategy = FedAvg(
        fraction_train=1.0,
        fraction_evaluate=0.0,
        min_train_nodes=participants,
        min_available_nodes=participants,
    )
    scheduler = _FLOWER["server"]
    strategy.start(
        grid=grid,
        initial_arrays=ArrayRecord(scheduler.state_dict()),
        num_rounds=rounds,
        evaluate_fn=flower_evaluate,
    )


def flower_trial() -> dict[str, Any]:
    """Flower's simulation on Ray, one actor a core; rounds timed by its ``evaluate_fn``."""
    import flwr
    import ray
    from flwr.clientapp import ClientApp
    from flwr.serverapp import ServerApp
    from flwr.simulation import run_simulation

    participants, rounds = settings()
    cores = int(os.environ[ENV_PREFIX + "CORES"])
    result: dict[str, Any] = {"version": flwr.__version__, "ray": ray.__version__}
    baseline = measure_baseline(participants, rounds)
    server = make_scheduler(participants, rounds)
    server._setup("simbench")
    _FLOWER.update(server=server, marks={})
    client_app = ClientApp()
    client_app.train()(flower_train)
    server_app = ServerApp()
    server_app.main()(flower_main)
    run_simulation(
        server_app=server_app,
        client_app=client_app,
        num_supernodes=participants,
        backend_config={
            "client_resources": {"num_cpus": 1, "num_gpus": 0.0},
            "init_args": {
                "num_cpus": cores,
                "_temp_dir": os.environ[ENV_PREFIX + "RAY_TMP"],
            },
        },
    )
    marks = _FLOWER["marks"]
    if len(marks) < rounds + 1:
        raise RuntimeError(f"Flower ended after {len(marks) - 1} of {rounds} rounds")
    after = measure_baseline(participants, rounds)
    result.update(
        merged(baseline, after),
        workers=cores,
        marks=[marks[r] for r in range(rounds + 1)],
        accuracy=_FLOWER.get("accuracy"),
    )
    return result


def run_trial_here(system: str, out: Path) -> None:
    """In a trial's process: run it, write its figures to ``out``."""
    os.chdir(os.environ[ENV_PREFIX + "WORKDIR"])
    started = time.perf_counter()
    result = fedmagic_trial() if system == "fedmagic" else flower_trial()
    result["process_s"] = time.perf_counter() - started
    out.write_text(json.dumps(result))


# --- The driver: trials as subprocesses, their memory sampled -------------------------------------


def tree_rss(root: psutil.Process) -> list[tuple[psutil.Process, int]]:
    """Each process of ``root``'s tree (itself and all its descendants) with its RSS."""
    found = []
    with contextlib.suppress(psutil.Error):
        for process in [root, *root.children(recursive=True)]:
            with contextlib.suppress(psutil.Error):
                found.append((process, process.memory_info().rss))
    return found


def label(process: psutil.Process, root: psutil.Process) -> str:
    """A process's short name: the trial's own, a spawned Python worker (Dask's), or the
    title it gives itself (Ray's raylet, gcs_server, ray::ClientAppActor, ray::IDLE...)."""
    if process.pid == root.pid:
        return "trial process"
    with contextlib.suppress(psutil.Error, IndexError):
        command = process.cmdline()
        if any("spawn_main" in part for part in command):
            return "spawned worker"
        if "python" in Path(command[0]).name and len(command) > 1:
            scripts = [Path(part).name for part in command[1:] if part.endswith(".py")]
            return scripts[0] if scripts else "python"
        return Path(command[0].split()[0]).name[:28]
    return "?"


def breakdown(
    processes: list[tuple[psutil.Process, int]], root: psutil.Process
) -> list[tuple[str, float, int]]:
    """RSS MiB by kind of process, the largest first: (label, MiB, how many)."""
    kinds: dict[str, list[int]] = {}
    for process, rss in processes:
        kinds.setdefault(label(process, root), []).append(rss)
    rows = [(name, sum(v) / MiB, len(v)) for name, v in kinds.items()]
    return sorted(rows, key=lambda row: -row[1])


def trial_environment(
    participants: int, rounds: int, workdir: Path, options: argparse.Namespace
) -> dict[str, str]:
    paths = [str(HERE), str(ROOT), os.environ.get("PYTHONPATH", "")]
    scratch: Path = options.scratch
    return {
        **os.environ,
        # The benchmark importable as ``simulation`` (Flower's actors import its functions by
        # name), and this checkout's fedmagic before any installed one.
        "PYTHONPATH": os.pathsep.join(p for p in paths if p),
        "OMP_NUM_THREADS": "1",
        "MKL_NUM_THREADS": "1",
        "PYTHONUNBUFFERED": "1",
        "TMPDIR": str(scratch / "tmp"),
        # No network here: neither Ray nor Flower may try to report usage.
        "RAY_USAGE_STATS_ENABLED": "0",
        "FLWR_TELEMETRY_ENABLED": "0",
        ENV_PREFIX + "N": str(participants),
        ENV_PREFIX + "ROUNDS": str(rounds),
        ENV_PREFIX + "CORES": str(options.cores),
        ENV_PREFIX + "WORKDIR": str(workdir),
        ENV_PREFIX + "RAY_TMP": str(scratch / "ray"),
    }


def run_trial(
    system: str, participants: int, options: argparse.Namespace, index: int
) -> dict[str, Any]:
    """One trial in a fresh process (fedmagic's with this Python, Flower's with
    ``--flower-python``), its tree's RSS sampled every ``--sample`` seconds."""
    scratch: Path = options.scratch
    python = sys.executable if system == "fedmagic" else options.flower_python
    workdir = scratch / f"trial-{time.strftime('%H%M%S')}-{index:02d}-{system}-{participants}"
    workdir.mkdir(parents=True)
    (workdir / TASK).mkdir()
    (workdir / TASK / "data").symlink_to(scratch / f"data-{participants}" / TASK / "data")
    out = workdir / "result.json"
    log = workdir / "output.log"
    command = [python, str(Path(__file__).resolve()), "--trial", system, "--out", str(out)]
    environment = trial_environment(participants, options.rounds, workdir, options)
    began = time.perf_counter()
    peak, at_peak, timed_out = 0, [], False
    with open(log, "w") as output:
        process = subprocess.Popen(
            command, stdout=output, stderr=subprocess.STDOUT, cwd=workdir, env=environment
        )
        root = psutil.Process(process.pid)
        while process.poll() is None:
            processes = tree_rss(root)
            rss = sum(value for _, value in processes)
            if rss > peak:
                peak, at_peak = rss, breakdown(processes, root)
            if time.perf_counter() - began > options.trial_timeout:
                timed_out = True
                for child in [*root.children(recursive=True), root]:
                    with contextlib.suppress(psutil.Error):
                        child.kill()
                process.wait(timeout=30)
                break
            time.sleep(options.sample)
    result: dict[str, Any] = {"system": system, "n": participants}
    if process.returncode == 0 and out.exists():
        result.update(json.loads(out.read_text()))
    else:
        tail = " | ".join(log.read_text(errors="replace").splitlines()[-3:])
        why = f"timed out after {options.trial_timeout:.0f} s" if timed_out else "failed"
        result["failed"] = f"{why} (exit {process.returncode}; log {log}): {tail[-400:]}"
    result.update(
        trial_s=time.perf_counter() - began,
        peak_mib=peak / MiB,
        peak_by_process=at_peak,
        left_behind=orphans(options.grace),
    )
    return result


# --- Figures --------------------------------------------------------------------------------------


def median(values: list[float]) -> float:
    return statistics.median(values) if values else float("nan")


def per_round(trial: dict[str, Any]) -> list[tuple[float, float, float]]:
    """Each round's (wall seconds, CPU seconds of the trial's processes, CPU seconds of the
    machine's other work), from the marks that end the rounds."""
    marks = trial["marks"]
    rounds = []
    for before, after in zip(marks, marks[1:], strict=False):
        wall, tree, busy = (a - b for a, b in zip(after, before, strict=True))
        rounds.append((wall, tree, max(busy - tree, 0.0)))
    return rounds


def round_figures(trial: dict[str, Any]) -> dict[str, float]:
    """A trial's warm-up, round time (median of the later rounds), serial compute per
    participant and overhead per participant against its own baseline; the CPU its processes
    spent per participant beyond the pure compute; the cores other work took meanwhile."""
    n = trial["n"]
    parallel = min(trial["workers"], os.cpu_count() or 1)
    rounds = per_round(trial)
    later = rounds[1:]
    round_s = median([wall for wall, _, _ in later])
    serial = median(trial["serial_ms"])
    ideal_s = (serial * n / parallel + median(trial["test_ms"])) / 1000
    pure_cpu_s = (median(trial["serial_cpu_ms"]) * n + median(trial["test_cpu_ms"])) / 1000
    return {
        "warmup": rounds[0][0],
        "round": round_s,
        "serial": serial,
        "ideal": ideal_s,
        "overhead": (round_s - ideal_s) * 1000 / n,
        "extra_cpu": (median([tree for _, tree, _ in later]) - pure_cpu_s) * 1000 / n,
        "others": median([others / wall for wall, _, others in later]),
    }


def summarise(trials: list[dict[str, Any]]) -> list[dict[str, Any]]:
    """One row per (system, N): each figure's median over the trials and its spread."""
    rows = []
    for system in SYSTEMS:
        for n in sorted({t["n"] for t in trials}):
            good = [
                t for t in trials if t["system"] == system and t["n"] == n and "failed" not in t
            ]
            if not good:
                continue
            figures = [round_figures(t) for t in good]
            row: dict[str, Any] = {"system": system, "n": n, "trials": len(good)}
            for key in figures[0]:
                row[key] = [f[key] for f in figures]
            row["peak"] = [t["peak_mib"] for t in good]
            row["accuracy"] = [t["accuracy"] for t in good if t.get("accuracy") is not None]
            rows.append(row)
    return rows


def spread_text(values: list[float], digits: int) -> str:
    if len(values) < 2:
        return ""
    return f" [{min(values):.{digits}f}-{max(values):.{digits}f}]"


def print_table(rows: list[dict[str, Any]]) -> None:
    head = (
        f"{'system':<9}{'N':>7}{'runs':>5}{'warm-up s':>10}{'round time s':>25}"
        f"{'serial ms/p':>12}{'ideal s':>8}{'overhead ms/p':>25}{'peak MiB':>19}"
        f"{'CPU+ ms/p':>10}{'others':>7}{'acc':>5}"
    )
    print(head)
    print("-" * len(head))
    for row in rows:
        round_text = f"{median(row['round']):.3f}{spread_text(row['round'], 3)}"
        overhead_text = f"{median(row['overhead']):.3f}{spread_text(row['overhead'], 3)}"
        peak_text = f"{median(row['peak']):,.0f}{spread_text(row['peak'], 0)}"
        print(
            f"{row['system']:<9}{row['n']:>7,}{row['trials']:>5}{median(row['warmup']):>10.2f}"
            f"{round_text:>25}{median(row['serial']):>12.2f}{median(row['ideal']):>8.2f}"
            f"{overhead_text:>25}{peak_text:>19}{median(row['extra_cpu']):>10.2f}"
            f"{median(row['others']):>7.2f}{median(row['accuracy']):>5.0%}"
        )
    print(
        "round time = median over runs of each run's median later round (round 1, the warm-up, "
        "apart); [min-max] over runs. serial ms/p = one participant's training in a plain loop "
        "in the run's own process. ideal = serial x N / min(workers, cores) + one central test. "
        "overhead ms/p = (round time - ideal) / N, the issue's figure. peak = the most RSS the "
        "run's process tree held, summed over its processes. CPU+ ms/p = CPU all the run's "
        "processes spent per participant and round beyond the plain loop's (other load hardly "
        "moves it; on a quiet machine the overhead would lie between CPU+ / min(workers, cores) "
        "and CPU+, plus any idle waiting). others = cores the machine's other work kept busy "
        "during the rounds. acc = the global model's test accuracy after the last round (a "
        "check that both sides learn alike)."
    )


def row_for(rows: list[dict[str, Any]], system: str, n: int) -> dict[str, Any] | None:
    return next((r for r in rows if r["system"] == system and r["n"] == n), None)


def print_targets(rows: list[dict[str, Any]], largest: int, flower_sizes: list[int]) -> None:
    """One line per target of the issue: met or not, with the figures."""
    for n in flower_sizes:
        ours, theirs = row_for(rows, "fedmagic", n), row_for(rows, "flower", n)
        if ours is None or theirs is None:
            print(f"Ahead of Flower at N = {n:,}: no figures (a side did not run)")
            continue
        mine, flower = median(ours["round"]), median(theirs["round"])
        beyond = max(ours["round"]) < min(theirs["round"])
        print(
            f"Ahead of Flower at N = {n:,}: {'met' if mine < flower else 'NOT MET'}: round "
            f"{mine:.3f} s against Flower's {flower:.3f} s ({flower / mine:.1f}x"
            + (", every fedmagic run faster than every Flower run)" if beyond else ")")
            + f"; overhead {median(ours['overhead']):.3f} against "
            f"{median(theirs['overhead']):.3f} ms/participant"
        )
    big = row_for(rows, "fedmagic", largest)
    if big is None:
        print(f"Overhead at N = {largest:,}: no figures (fedmagic did not run at that N)")
    else:
        overhead = median(big["overhead"])
        print(
            f"At most 0.5 ms of overhead per participant at N = {largest:,}: "
            f"{'met' if overhead <= 0.5 else 'NOT MET'}: {overhead:.3f} ms/participant "
            f"(runs: {', '.join(f'{v:.3f}' for v in big['overhead'])}; round "
            f"{median(big['round']):.2f} s against an ideal of {median(big['ideal']):.2f} s, "
            f"while other work kept {median(big['others']):.2f} cores busy; CPU+ "
            f"{median(big['extra_cpu']):.2f} ms/participant)"
        )
    ours = [r for r in rows if r["system"] == "fedmagic"]
    if ours:
        worst = max(ours, key=lambda r: max(r["peak"]))
        peak = max(worst["peak"])
        print(
            f"Memory under 4 GiB: {'met' if peak < 4096 else 'NOT MET'}: fedmagic's largest peak "
            f"{peak:,.0f} MiB ({peak / 1024:.2f} GiB, RSS summed over its processes) at N = "
            f"{worst['n']:,}"
            + "".join(
                f"; Flower's at N = {r['n']:,}: {max(r['peak']):,.0f} MiB"
                for r in rows
                if r["system"] == "flower"
            )
        )


# --- Main -----------------------------------------------------------------------------------------


def code_state() -> tuple[str, str]:
    """Which fedmagic the trials run: the checkout's commit and modified files, and a hash of
    its sources (to tell whether they changed during the run)."""
    import hashlib

    digest = hashlib.sha256()
    for path in sorted((ROOT / "fedmagic").rglob("*.py")):
        digest.update(str(path).encode() + path.read_bytes())
    described = "not a git checkout"
    with contextlib.suppress(subprocess.SubprocessError, OSError):
        git = ["git", "-C", str(ROOT)]
        head = subprocess.run([*git, "rev-parse", "--short", "HEAD"], capture_output=True)
        status = subprocess.run(
            [*git, "status", "--porcelain", "--", "fedmagic"], capture_output=True, text=True
        )
        if head.returncode == 0:
            changed = [line[3:] for line in status.stdout.splitlines()]
            described = f"commit {head.stdout.decode().strip()}" + (
                f", uncommitted changes in {', '.join(changed)}" if changed else ", clean"
            )
    return described, digest.hexdigest()[:12]


def flower_available(python: str) -> str | None:
    """Flower's and Ray's versions in ``python``, or None if it cannot run Flower."""
    if not Path(python).exists():
        return None
    with contextlib.suppress(subprocess.SubprocessError, OSError):
        found = subprocess.run(
            [python, "-c", "import flwr, ray, torch; print(flwr.__version__, ray.__version__)"],
            capture_output=True,
            text=True,
            timeout=120,
        )
        if found.returncode == 0:
            return found.stdout.strip()
    return None


def schedule(options: argparse.Namespace, with_flower: bool) -> list[tuple[str, int]]:
    """The trials in their order: the pairs, then the largest N, then the pairs again with
    Flower first, and so on."""
    pairs = [n for n in options.sizes if n <= options.flower_max]
    alone = [n for n in options.sizes if n > options.flower_max]
    order: list[tuple[str, int]] = []
    for rep in range(options.reps):
        for n in pairs:
            both = [("fedmagic", n), ("flower", n)] if with_flower else [("fedmagic", n)]
            order += both if rep % 2 == 0 else both[::-1]
        if rep < options.large_reps:
            order += [("fedmagic", n) for n in alone]
    return order


def estimate(done: list[dict[str, Any]], system: str, n: int) -> float:
    """Seconds a trial will likely take: as the last one like it, or a rough guess."""
    same = [t["trial_s"] for t in done if t["system"] == system and t["n"] == n]
    if same:
        return same[-1]
    return 30 + n * (0.012 if system == "fedmagic" else 0.05)


def describe(trial: dict[str, Any]) -> str:
    """A trial's line: its rounds and figures; then where its peak memory was."""
    if "failed" in trial:
        return f"FAILED: {trial['failed']}"
    figures = round_figures(trial)
    rounds = ", ".join(f"{wall:.2f}" for wall, _, _ in per_round(trial))
    return (
        f"rounds {rounds} s (warm-up first; ideal {figures['ideal']:.2f}), serial "
        f"{figures['serial']:.2f} ms/p, overhead {figures['overhead']:.3f} ms/p, CPU+ "
        f"{figures['extra_cpu']:.2f} ms/p, others {figures['others']:.2f} cores, peak "
        f"{trial['peak_mib']:,.0f} MiB, acc {trial.get('accuracy') or 0:.0%}, trial "
        f"{trial['trial_s']:.0f} s\n      peak by process (RSS MiB): "
        + ", ".join(
            f"{name} {mib:,.0f}" + (f" ({count})" if count > 1 else "")
            for name, mib, count in trial["peak_by_process"]
        )
    )


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--quick", action="store_true", help="N = 100 and 1,000, one pair each")
    parser.add_argument("--sizes", default="100,1000,10000", help="participants N")
    parser.add_argument("--flower-max", type=int, default=1000, help="the largest N Flower runs at")
    parser.add_argument("--reps", type=int, default=3, help="rounds of the fedmagic/Flower pairs")
    parser.add_argument(
        "--large-reps", type=int, default=2, help="runs at each N above --flower-max"
    )
    parser.add_argument("--rounds", type=int, default=3, help="rounds per trial, the first warm")
    parser.add_argument(
        "--flower-python",
        default=str(DEFAULT_FLOWER_PYTHON) if DEFAULT_FLOWER_PYTHON.exists() else "",
        help="a Python with flwr[simulation] (default: /tmp/simbench/flwr-env/bin/python)",
    )
    parser.add_argument("--cores", type=int, default=os.cpu_count() or 1)
    parser.add_argument("--scratch", type=Path, help="default: a new temporary directory")
    parser.add_argument("--sample", type=float, default=0.2, help="seconds between RSS samples")
    parser.add_argument("--grace", type=float, default=10.0)
    parser.add_argument("--trial-timeout", type=float, default=600.0)
    parser.add_argument(
        "--budget", type=float, default=1080.0, help="seconds: no trial starts that would end later"
    )
    parser.add_argument("--trial", choices=SYSTEMS, help=argparse.SUPPRESS)
    parser.add_argument("--out", type=Path, help=argparse.SUPPRESS)
    options = parser.parse_args()
    if options.trial:
        run_trial_here(options.trial, options.out)
        return
    if options.quick:
        options.sizes, options.reps, options.large_reps = "100,1000", 1, 0
    options.sizes = sorted(int(n) for n in str(options.sizes).split(","))

    began = time.perf_counter()
    scratch = options.scratch or Path(tempfile.mkdtemp(prefix="fedmagic-simulation-"))
    options.scratch = scratch = scratch.resolve()
    (scratch / "tmp").mkdir(parents=True, exist_ok=True)
    subreaper = set_child_subreaper()
    flower = flower_available(options.flower_python) if options.flower_python else None
    described, code_hash = code_state()
    print(
        f"simulation benchmark: Python {platform.python_version()}, {options.cores} cores, "
        f"{psutil.virtual_memory().total / (1 << 30):.0f} GiB; fedmagic from {ROOT} "
        f"({described}; sources {code_hash}); Flower "
        + (f"{flower.split()[0]} (Ray {flower.split()[1]})" if flower else "UNAVAILABLE")
        + f"; load average {' '.join(f'{v:.2f}' for v in os.getloadavg())}"
    )
    if not flower:
        print(
            f"Flower is not available (--flower-python {options.flower_python or '(none)'}):"
            " fedmagic's figures alone follow. Install it with: python -m venv "
            "--system-site-packages ENV && ENV/bin/pip install 'flwr[simulation]'"
        )
    print(
        f"N = {', '.join(f'{n:,}' for n in options.sizes)} (Flower up to "
        f"{options.flower_max:,}); {options.rounds} rounds a trial, the first the warm-up; "
        f"{BATCH} images (one batch) per participant; scratch {scratch}; orphan catching "
        f"{'on' if subreaper else 'OFF'}"
    )
    sys.path.insert(0, str(ROOT))
    for n in options.sizes:
        write_digits(scratch / f"data-{n}", n)

    trials: list[dict[str, Any]] = []
    for index, (system, n) in enumerate(schedule(options, bool(flower))):
        elapsed = time.perf_counter() - began
        if elapsed + estimate(trials, system, n) > options.budget:
            print(f"  {system} N={n:,}: not run, the budget of {options.budget:.0f} s is near")
            continue
        trial = run_trial(system, n, options, index)
        trials.append(trial)
        print(f"  {system:<8} N={n:>6,}: {describe(trial)}", flush=True)
        for line in trial["left_behind"]:
            print(f"    left behind (killed): {line}")

    (scratch / "trials.json").write_text(json.dumps(trials, indent=1))
    rows = summarise(trials)
    print()
    print_table(rows)
    print()
    flower_sizes = [n for n in options.sizes if n <= options.flower_max] if flower else []
    print_targets(rows, max(options.sizes), flower_sizes)
    failed = [t for t in trials if "failed" in t]
    if failed:
        print(
            f"{len(failed)} trials failed: "
            + "; ".join(f"{t['system']} N={t['n']}" for t in failed)
        )
    if code_state()[1] != code_hash:
        print(
            f"fedmagic's sources CHANGED during the run (now {code_state()[0]}): trials "
            "may have run different code"
        )
    print(
        f"\nload average at end {' '.join(f'{v:.2f}' for v in os.getloadavg())}; whole run "
        f"{time.perf_counter() - began:.0f} s"
    )


if __name__ == "__main__":
    # Run as a script, this file is __main__; Flower's actors must find its functions under one
    # importable name, so everything runs from the module ``simulation``.
    sys.path.insert(0, str(HERE))
    import simulation

    simulation.main()
