"""Which distributed engine should simulate thousands of virtual participants: Ray, Dask or
ipyparallel? Start-up, memory and round overhead, measured on the simulation's own shape.

The shape: a round sends one global model (the tutorial ConvNet of
``fedmagic/examples/digits_task.py``, 21,840 float32 weights, 87 KB) to W worker processes,
once per round (Ray's object store, Dask's broadcast scatter, ipyparallel's push). Each worker
runs its share of the round's N virtual participants one after another -- load the global
weights into the model, one SGD step on a batch of a few of sklearn's handwritten digits
(8x8, resized to 20x20 and padded to the ConvNet's 28x28 like MNIST), the update -- folds
their updates into one weighted partial sum, and returns that one sum; the driver adds the W
sums into the FedAvg mean. The driver checks that the engines' round equals the same round
computed in one process.

Measured for each engine, at W = 2 (this machine's cores) and W = 4 (oversubscribed):

* start-up: seconds from nothing (the engine not yet imported; torch already is, as in a
  notebook that has built its model) to W workers that have each run a first task importing
  torch;
* memory: RSS summed over every process the engine started (workers, and scheduler, raylet,
  GCS, hub, nannies...), once idle after start-up and again after the rounds; per worker; PSS
  beside it (RSS counts the shared torch libraries once per process, PSS shares them out); and
  how much the driver itself grew (Dask's scheduler runs inside it);
* round overhead at N = 100 and N = 1,000: a round's wall time less the pure compute, per
  participant, in ms. Pure compute is the same participants run in a plain loop in one
  process, divided by the parallelism the machine can give (min(W, cores)). On a busy
  machine that figure moves more between trials than between engines, so beside it: the time
  outside the workers (the round less the slowest worker's busy time), the CPU the workers'
  processes burn per participant beyond the plain loop's (CPU time hardly moves with other
  load), and the overhead a quiet machine would see, which the verdict uses: the time outside
  the workers plus the CPU that every process of the engine and the driver spend beyond the
  pure compute, shared over the parallel workers.

Every (engine, W) trial runs in a fresh process, so each engine starts from nothing and
leaves nothing behind for the next; the engines' order rotates between repetitions so that
the machine's noise falls on all alike. Round figures are medians over a trial's rounds, each
trial set against its own pure-compute baseline; times (rounds, start-up) then take the least
disturbed trial, since noise only adds time, and memory the median trial. Processes an
engine leaves after its shutdown are reported and then ended by their pid.

Engines are configured as fedmagic would: Ray as Flower's simulation starts it (local, no
dashboard), each worker an actor asking for cores / W CPUs; Dask with one single-threaded
worker process per worker, and without its MALLOC_TRIM_THRESHOLD_=65536 in the workers
(``--dask-stock`` keeps it: it costs this workload ~25% more CPU); ipyparallel's local Cluster.

Run with ``python benchmarks/engines.py`` in an environment holding ray, dask[distributed]
and ipyparallel (see the options with ``--help``); the defaults take 5 minutes on 2 quiet
cores, up to 9 on busy ones, and no further trial starts after ``--budget`` seconds.
"""

from __future__ import annotations

import argparse
import contextlib
import importlib.metadata
import json
import os
import platform
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from typing import Any, Callable

import psutil
from processes import describe, living_children, orphans, set_child_subreaper

ENGINES = ("ray", "dask", "ipyparallel")
#: Seeds the initial model and, per participant, dropout: the engines' rounds are then equal to
#: the one-process round, which each trial checks.
SEED = 1234
#: Output lines of a trial that are its own, not the engine's.
MARK = "@@"
MiB = 1 << 20


# --- What runs in a worker (and, for the pure-compute baseline, in the driver) -------------------

#: Per process: the model, its optimiser and the digits, made by prepare().
_CACHE: dict[str, Any] = {}


def ready() -> int:
    """The first task: import torch, one thread per worker. Returns the worker's pid."""
    import torch

    torch.set_num_threads(1)
    return os.getpid()


def prepare(images: Any, labels: Any) -> float:
    """Build the tutorial ConvNet and keep the participants' images; seconds taken."""
    started = time.perf_counter()
    import torch

    from fedmagic.examples.digits_task import ConvNet

    torch.set_num_threads(1)
    model = ConvNet()
    _CACHE.update(
        model=model,
        # A plain SGD step holds no state between participants: one optimiser serves all.
        optimizer=torch.optim.SGD(model.parameters(), lr=0.05),
        images=torch.tensor(images),
        labels=torch.tensor(labels),
    )
    return time.perf_counter() - started


def run_participants(state: dict[str, Any], start: int, stop: int, batch: int) -> tuple:
    """Virtual participants start..stop-1 on the global ``state``, folded into one sum.

    Returns (sum of weight * update as a flat float32 array, sum of weights, seconds busy,
    pid, CPU seconds of this whole process meanwhile: the engine's own threads included)."""
    started, cpu = time.perf_counter(), time.process_time()
    import torch
    import torch.nn.functional as F
    from torch.nn.utils import parameters_to_vector

    model, optimizer = _CACHE["model"], _CACHE["optimizer"]
    images, labels = _CACHE["images"], _CACHE["labels"]
    global_state = {name: torch.tensor(value) for name, value in state.items()}
    model.load_state_dict(global_state)
    global_flat = parameters_to_vector(model.parameters()).detach().clone()
    partial = torch.zeros_like(global_flat)
    weights = 0.0
    model.train()
    for participant in range(start, stop):
        model.load_state_dict(global_state)
        torch.manual_seed(SEED + participant)
        # Participant p's few images: its own slice of the digits, wrapping round.
        index = (torch.arange(batch) + participant * batch) % len(labels)
        optimizer.zero_grad()
        F.nll_loss(model(images[index]), labels[index]).backward()
        optimizer.step()
        with torch.no_grad():
            partial.add_(parameters_to_vector(model.parameters()) - global_flat, alpha=batch)
        weights += batch
    busy = time.perf_counter() - started
    return partial.numpy(), weights, busy, os.getpid(), time.process_time() - cpu


class RayWorker:
    """Ray's worker: an actor, as Flower's simulation uses, with a share of the CPUs."""

    def ready(self) -> int:
        return ready()

    def prepare(self, images: Any, labels: Any) -> float:
        return prepare(images, labels)

    def run(self, state: dict[str, Any], start: int, stop: int, batch: int) -> tuple:
        return run_participants(state, start, stop, batch)


# --- The engines, each driven the same way --------------------------------------------------------


class Engine:
    name = ""

    def load(self) -> None:
        """Import the engine (timed: part of start-up)."""

    def start(self, workers: int, cores: int) -> list[int]:
        """Start ``workers`` workers, run ready() on each; their pids."""
        raise NotImplementedError

    def prepare(self, images: Any, labels: Any) -> list[float]:
        raise NotImplementedError

    def round(self, state: dict[str, Any], chunks: list[tuple[int, int]], batch: int) -> list:
        """One round: ``state`` sent once, one chunk of participants per worker, one partial sum
        back from each."""
        raise NotImplementedError

    def shutdown(self) -> None:
        raise NotImplementedError


class RayEngine(Engine):
    name = "ray"

    def load(self) -> None:
        import ray

        self.ray = ray

    def start(self, workers: int, cores: int) -> list[int]:
        # Flower's simulation defaults, less ignore_reinit_error: a local instance, no dashboard.
        # Ray gets the machine's cores; each worker asks for its fraction of them, so W > cores
        # is Flower's fractional num_cpus per virtual client.
        self.ray.init(num_cpus=cores, include_dashboard=False)
        actor = self.ray.remote(RayWorker)
        self.actors = [actor.options(num_cpus=cores / workers).remote() for _ in range(workers)]
        return self.ray.get([worker.ready.remote() for worker in self.actors])

    def prepare(self, images: Any, labels: Any) -> list[float]:
        images, labels = self.ray.put(images), self.ray.put(labels)
        return self.ray.get([worker.prepare.remote(images, labels) for worker in self.actors])

    def round(self, state: dict[str, Any], chunks: list[tuple[int, int]], batch: int) -> list:
        shared = self.ray.put(state)
        return self.ray.get(
            [
                worker.run.remote(shared, start, stop, batch)
                for worker, (start, stop) in zip(self.actors, chunks, strict=True)
            ]
        )

    def shutdown(self) -> None:
        self.ray.shutdown()


class DaskEngine(Engine):
    name = "dask"
    #: Keep Dask's default MALLOC_TRIM_THRESHOLD_=65536 in the workers' environment. It stops
    #: glibc adapting its mmap threshold, so torch's buffers are mapped and unmapped on every
    #: step: this workload then costs ~25% more CPU in a Dask worker than in any other process.
    #: fedmagic would unset it, as the default here does (--dask-stock keeps it).
    stock = False

    def load(self) -> None:
        import dask
        import distributed

        self.distributed = distributed
        if not self.stock:
            dask.config.set({"distributed.nanny.pre-spawn-environ.MALLOC_TRIM_THRESHOLD_": None})

    def start(self, workers: int, cores: int) -> list[int]:
        # One single-threaded worker process per worker, each under a nanny; the scheduler runs
        # in this process. No dashboard (it needs bokeh, and the others have none either).
        self.cluster = self.distributed.LocalCluster(
            n_workers=workers, threads_per_worker=1, processes=True, dashboard_address=None
        )
        self.client = self.distributed.Client(self.cluster)
        self.client.wait_for_workers(workers)
        self.addresses = sorted(self.client.scheduler_info(n_workers=-1)["workers"])
        return self.client.gather([self._on(address, ready) for address in self.addresses])

    def _on(self, address: str, function: Callable, *args: Any) -> Any:
        return self.client.submit(
            function, *args, workers=[address], allow_other_workers=False, pure=False
        )

    def prepare(self, images: Any, labels: Any) -> list[float]:
        images, labels = self.client.scatter([images, labels], broadcast=True)
        return self.client.gather(
            [self._on(address, prepare, images, labels) for address in self.addresses]
        )

    def round(self, state: dict[str, Any], chunks: list[tuple[int, int]], batch: int) -> list:
        # A list of one: scattering the dict itself would scatter each array on its own.
        [shared] = self.client.scatter([state], broadcast=True, hash=False)
        return self.client.gather(
            [
                self._on(address, run_participants, shared, start, stop, batch)
                for address, (start, stop) in zip(self.addresses, chunks, strict=True)
            ]
        )

    def shutdown(self) -> None:
        self.client.close()
        self.cluster.close()


class IpyparallelEngine(Engine):
    name = "ipyparallel"

    def load(self) -> None:
        import ipyparallel

        self.ipp = ipyparallel

    def start(self, workers: int, cores: int) -> list[int]:
        self.cluster = self.ipp.Cluster(n=workers)
        self.client = self.cluster.start_and_connect_sync(activate=False)
        self.client.wait_for_engines(workers, timeout=120)
        self.engines = [self.client[engine] for engine in sorted(self.client.ids)]
        self.all = self.client[:]
        return self.all.apply_sync(ready)

    def prepare(self, images: Any, labels: Any) -> list[float]:
        return self.all.apply_sync(prepare, images, labels)

    def round(self, state: dict[str, Any], chunks: list[tuple[int, int]], batch: int) -> list:
        # Pushed once into each engine's namespace; each engine runs its queue in order, so its
        # task finds the new state there.
        self.all.push({"fedmagic_global": state}, block=False)
        pending = [
            engine.apply_async(
                run_participants, self.ipp.Reference("fedmagic_global"), start, stop, batch
            )
            for engine, (start, stop) in zip(self.engines, chunks, strict=True)
        ]
        return [result.get() for result in pending]

    def shutdown(self) -> None:
        self.client.close()
        self.cluster.stop_cluster_sync()


ENGINE_CLASSES: dict[str, type[Engine]] = {
    "ray": RayEngine,
    "dask": DaskEngine,
    "ipyparallel": IpyparallelEngine,
}


# --- One trial: one engine at one W, in a fresh process -------------------------------------------


def digits_arrays() -> tuple[Any, Any]:
    """sklearn's 1,797 handwritten digits as the ConvNet's normalised 1x28x28 float32 images."""
    import numpy as np
    import torch
    import torch.nn.functional as F
    from sklearn.datasets import load_digits

    digits = load_digits()
    images = torch.tensor(digits.images, dtype=torch.float32).unsqueeze(1) / 16.0
    images = F.interpolate(images, size=(20, 20), mode="bilinear", align_corners=False)
    images = (F.pad(images, (4, 4, 4, 4)) - 0.1307) / 0.3081
    return images.numpy(), np.asarray(digits.target, dtype=np.int64)


def initial_state() -> dict[str, Any]:
    import torch

    from fedmagic.examples.digits_task import ConvNet

    torch.manual_seed(SEED)
    return {name: value.numpy().copy() for name, value in ConvNet().state_dict().items()}


def apply_mean(state: dict[str, Any], results: list) -> dict[str, Any]:
    """FedAvg: the global state plus the weighted mean of the round's updates."""
    total = sum(result[0] for result in results)
    mean = total / sum(result[1] for result in results)
    updated, offset = {}, 0
    for name, value in state.items():
        updated[name] = value + mean[offset : offset + value.size].reshape(value.shape)
        offset += value.size
    return updated


def split(participants: int, workers: int) -> list[tuple[int, int]]:
    bounds = [participants * index // workers for index in range(workers + 1)]
    return list(zip(bounds, bounds[1:], strict=False))


def serial(state: dict[str, Any], count: int, batch: int, repeats: int) -> tuple[list, list]:
    """The pure compute: ``count`` participants in a plain loop in this thread. Wall and CPU
    (this thread's alone) ms per participant, each run."""
    walls, cpus = [], []
    for _ in range(repeats):
        started, cpu = time.perf_counter(), time.thread_time()
        run_participants(state, 0, count, batch)
        walls.append((time.perf_counter() - started) * 1000 / count)
        cpus.append((time.thread_time() - cpu) * 1000 / count)
    return walls, cpus


def memory_snapshot(worker_pids: list[int]) -> dict[str, Any]:
    """RSS and PSS of every process this one started, of its workers, and of this process."""
    me = psutil.Process()
    rows = []
    for process in me.children(recursive=True):
        with contextlib.suppress(psutil.Error):
            info = process.memory_full_info()
            rows.append(
                {
                    "pid": process.pid,
                    "name": label(process),
                    "worker": process.pid in worker_pids,
                    "rss": info.rss,
                    "pss": info.pss,
                }
            )
    driver = me.memory_full_info()
    workers = [row for row in rows if row["worker"]]
    return {
        "processes": rows,
        "count": len(rows),
        "rss": sum(row["rss"] for row in rows),
        "pss": sum(row["pss"] for row in rows),
        "worker_rss": sum(row["rss"] for row in workers) / max(len(workers), 1),
        "worker_pss": sum(row["pss"] for row in workers) / max(len(workers), 1),
        "workers_found": len(workers),
        "driver_rss": driver.rss,
        "driver_pss": driver.pss,
    }


def cpu_seconds(processes: list[psutil.Process]) -> float:
    total = 0.0
    for process in processes:
        with contextlib.suppress(psutil.Error):
            times = process.cpu_times()
            total += times.user + times.system
    return total


def interpreter_helper(process: psutil.Process) -> bool:
    with contextlib.suppress(psutil.Error):
        return "multiprocessing.resource_tracker" in " ".join(process.cmdline())
    return False


def label(process: psutil.Process) -> str:
    """A process's short name: a Python process by the module or script it runs."""
    with contextlib.suppress(psutil.Error):
        name, command = process.name(), process.cmdline()
        if name.startswith("python") and len(command) > 1:
            rest = command[1:]
            if "-m" in rest and rest.index("-m") + 1 < len(rest):
                return rest[rest.index("-m") + 1]
            if "-c" in rest:
                return "python -c " + rest[rest.index("-c") + 1][:40]
            scripts = [part for part in rest if part.endswith(".py")]
            return Path(scripts[0]).name if scripts else name
        return name
    return "?"


def trial(options: argparse.Namespace) -> dict[str, Any]:
    import torch

    torch.set_num_threads(1)
    cores, workers, batch = options.cores, options.trial_workers, options.batch
    DaskEngine.stock = options.dask_stock
    result: dict[str, Any] = {"engine": options.trial, "workers": workers}
    images, labels = digits_arrays()
    prepare(images, labels)
    state = initial_state()
    reference = run_participants(state, 0, options.sizes[0], batch)
    result["serial_ms"], result["serial_cpu_ms"] = serial(state, options.baseline, batch, 2)
    driver_before = psutil.Process().memory_info().rss

    print(MARK, "start", flush=True)
    engine = ENGINE_CLASSES[options.trial]()
    started = time.perf_counter()
    engine.load()
    result["import_s"] = time.perf_counter() - started
    try:
        pids = engine.start(workers, cores)
        result["startup_s"] = time.perf_counter() - started
        result["worker_pids"] = sorted(set(pids))
        time.sleep(options.settle)
        result["idle"] = memory_snapshot(pids)
        result["idle"]["driver_growth"] = result["idle"]["driver_rss"] - driver_before
        print(MARK, "prepare", flush=True)
        result["prepare_s"] = max(engine.prepare(images, labels))
        print(MARK, "rounds", flush=True)
        rounds: dict[str, Any] = {}
        # Every process of the engine, and this one: the CPU a round costs them all.
        tree = [psutil.Process(), *psutil.Process().children(recursive=True)]
        for size in options.sizes:
            chunks, walls, outside, cpu, total = split(size, workers), [], [], [], []
            for index in range(options.rounds + 1):  # the first round warms up, untimed
                cpu_before = cpu_seconds(tree)
                began = time.perf_counter()
                results = engine.round(state, chunks, batch)
                new_state = apply_mean(state, results)
                wall = time.perf_counter() - began
                cpu_spent = cpu_seconds(tree) - cpu_before
                if size == options.sizes[0] and index == 0:
                    # The same participants on the same global state as the reference.
                    error = float(abs(sum(r[0] for r in results) - reference[0]).max())
                    result["max_abs_error"] = error
                    result["equal"] = error <= 1e-4 * float(abs(reference[0]).max())
                    result["distinct_worker_pids"] = len({r[3] for r in results})
                state = new_state
                if index:
                    walls.append(wall)
                    outside.append(wall - max(r[2] for r in results))
                    cpu.append(sum(r[4] for r in results) * 1000 / size)
                    total.append(cpu_spent * 1000 / size)
            rounds[str(size)] = {
                "walls": walls,
                "outside": outside,
                "cpu_ms": cpu,
                "total_cpu_ms": total,
            }
        result["rounds"] = rounds
        result["after"] = memory_snapshot(pids)
        walls, cpus = serial(state, options.baseline, batch, 2)
        result["serial_ms"] += walls
        result["serial_cpu_ms"] += cpus
    finally:
        print(MARK, "shutdown", flush=True)
        before = psutil.Process().children(recursive=True)
        began = time.perf_counter()
        try:
            engine.shutdown()
        except Exception as error:  # after a failed start there may be little to shut down
            result["shutdown_error"] = repr(error)
        result["shutdown_s"] = time.perf_counter() - began
        result["processes_at_shutdown"] = len(before)
        alive = living_children()
        deadline = time.monotonic() + options.grace
        while time.monotonic() < deadline:
            alive = [p for p in living_children() if not interpreter_helper(p)]
            if not alive:
                break
            time.sleep(0.2)
        result["gone_after_s"] = time.perf_counter() - began
        result["left_behind"] = [describe(p) for p in alive]
        # multiprocessing's resource tracker lives as long as this interpreter, by design: the
        # driver checks that it goes with this process.
        result["helpers"] = [describe(p) for p in living_children() if interpreter_helper(p)]
        for process in alive:  # ours, by pid
            with contextlib.suppress(psutil.Error):
                process.kill()
    return result


# --- The driver: trials in rotation, then the table and the verdict -------------------------------


def versions() -> dict[str, str]:
    found = {}
    for name in ("ray", "dask", "distributed", "ipyparallel", "torch", "numpy", "psutil"):
        try:
            found[name] = importlib.metadata.version(name)
        except importlib.metadata.PackageNotFoundError:
            found[name] = "missing"
    return found


def loadavg() -> str:
    return " ".join(f"{value:.2f}" for value in os.getloadavg())


def figure(value: float) -> str:
    """3 significant figures, without an exponent for large values."""
    return f"{value:,.0f}" if abs(value) >= 100 else f"{value:.3g}"


def median(values: list[float]) -> float:
    return statistics.median(values) if values else float("nan")


def spread(values: list[float]) -> float:
    return (max(values) - min(values)) if len(values) > 1 else 0.0


def run_trial(engine: str, workers: int, options: argparse.Namespace, scratch: Path) -> dict:
    out = scratch / f"{engine}-w{workers}-{time.monotonic_ns()}.json"
    command = [
        sys.executable,
        str(Path(__file__).resolve()),
        "--trial",
        engine,
        "--trial-workers",
        str(workers),
        "--out",
        str(out),
        "--cores",
        str(options.cores),
        "--sizes",
        ",".join(map(str, options.sizes)),
        "--rounds",
        str(options.rounds),
        "--batch",
        str(options.batch),
        "--baseline",
        str(options.baseline),
        "--settle",
        str(options.settle),
        "--grace",
        str(options.grace),
    ] + (["--dask-stock"] if options.dask_stock else [])
    began = time.perf_counter()
    process = subprocess.Popen(
        command,
        stdout=subprocess.PIPE,
        stderr=subprocess.STDOUT,
        text=True,
        errors="replace",
        cwd=scratch,
    )
    try:
        output, _ = process.communicate(timeout=options.trial_timeout)
    except subprocess.TimeoutExpired:
        process.kill()
        output, _ = process.communicate()
        output += f"\n{MARK} timed out after {options.trial_timeout} s"
    log = out.with_suffix(".log")
    log.write_text(output)
    result: dict[str, Any] = {"engine": engine, "workers": workers}
    if process.returncode == 0 and out.exists():
        result = json.loads(out.read_text())
    else:
        last = " | ".join(output.splitlines()[-3:])
        result["failed"] = f"exit {process.returncode} (all it printed: {log}): {last}"
    result["trial_s"] = time.perf_counter() - began
    result["orphans"] = orphans(options.grace)
    # What the engine printed, by phase: what a notebook cell would show.
    phase, chatter = "import", {}
    for line in output.splitlines():
        if line.startswith(MARK):
            phase = line.split()[1]
            continue
        if line.strip():
            chatter.setdefault(phase, []).append(line.rstrip())
    result["chatter"] = chatter
    return result


def summarise(
    trials: list[dict], engine: str, workers: int, options: argparse.Namespace, serial_ms: float
) -> dict[str, Any] | None:
    mine = [t for t in trials if t["engine"] == engine and t["workers"] == workers]
    good = [t for t in mine if "failed" not in t]
    if not good:
        return None
    parallel = min(workers, options.cores)
    row: dict[str, Any] = {
        "engine": engine,
        "workers": workers,
        "trials": len(good),
        "failed": len(mine) - len(good),
        "startup": [t["startup_s"] for t in good],
        "import": [t["import_s"] for t in good],
        "idle_rss": [t["idle"]["rss"] / MiB for t in good],
        "idle_pss": [t["idle"]["pss"] / MiB for t in good],
        "worker_rss": [t["idle"]["worker_rss"] / MiB for t in good],
        "worker_pss": [t["idle"]["worker_pss"] / MiB for t in good],
        "driver_growth": [t["idle"]["driver_growth"] / MiB for t in good],
        "idle_total": [(t["idle"]["rss"] + t["idle"]["driver_growth"]) / MiB for t in good],
        "processes": [t["idle"]["count"] for t in good],
        "after_rss": [t["after"]["rss"] / MiB for t in good],
        "after_pss": [t["after"]["pss"] / MiB for t in good],
        "shutdown": [t["shutdown_s"] for t in good],
        "equal": all(t.get("equal") for t in good),
        "left": [line for t in mine for line in t.get("left_behind", []) + t["orphans"]],
    }
    # Each trial: medians over its rounds, set against its own pure-compute baseline (measured
    # in the same process, minutes apart at most). Across trials the least disturbed one
    # counts: the machine's noise only ever adds time.
    for size in options.sizes:
        overs, outs, extras, quiets, walls = [], [], [], [], []
        for t in good:
            rounds = t["rounds"][str(size)]
            wall = median(rounds["walls"])
            ideal = median(t["serial_ms"]) * size / parallel / 1000
            walls.append(wall)
            overs.append((wall - ideal) * 1000 / size)
            outs.append(median(rounds["outside"]) * 1000 / size)
            # CPU the workers' processes burnt per participant beyond the plain loop's.
            pure = median(t["serial_cpu_ms"])
            extras.append(median(rounds["cpu_ms"]) / pure - 1)
            # What a quiet machine would see: the time outside the workers, plus the CPU every
            # process of the engine and the driver spent beyond the pure compute, which takes
            # it from the workers, spread over the parallel workers. CPU time hardly moves
            # with other load. (The CPU spent while outside the workers counts twice: a little
            # too much.)
            quiets.append(outs[-1] + (median(rounds["total_cpu_ms"]) - pure) / parallel)
        row[f"wall{size}"] = min(walls)
        row[f"over{size}"] = min(overs)
        row[f"over{size}_trials"] = overs
        row[f"out{size}"] = median(outs)
        row[f"cpu{size}"] = median(extras)
        row[f"quiet{size}"] = median(quiets)
        row[f"quiet{size}_trials"] = quiets
        row[f"ideal{size}"] = serial_ms * size / parallel / 1000
    return row


#: A round-overhead difference is material above this share of the round's ideal time; a
#: start-up or memory difference above this share of Ray's own figure.
MATERIAL_ROUND, MATERIAL_OTHER = 0.05, 0.10


def verdict(rows: list[dict], options: argparse.Namespace) -> str:
    """Which engine is best on each measure, at each W, from the figures; and the choice the
    issue's rule makes: Ray unless another engine serves this shape better."""
    big = max(options.sizes)
    # The overhead (wall - serial compute / W) moves more between trials than between
    # engines on a busy machine; the rule compares its part that other load hardly moves.
    decisive = f"quiet-machine round overhead at N = {big:,}"
    # (name, figure, unit, the per-trial figures whose spread is the noise)
    measures: list[tuple[str, Callable[[dict], float], str, str]] = [
        ("start-up", lambda r: min(r["startup"]), "s", "startup"),
        ("memory once idle", lambda r: median(r["idle_total"]), "MiB", "idle_total"),
        ("memory per worker", lambda r: median(r["worker_rss"]), "MiB", "worker_rss"),
        (
            f"the issue's wall-clock overhead at N = {big:,}",
            lambda r: r[f"over{big}"],
            "ms/participant",
            f"over{big}_trials",
        ),
        (decisive, lambda r: r[f"quiet{big}"], "ms/participant", f"quiet{big}_trials"),
    ]
    sentences = []
    for workers in options.workers:
        here = [r for r in rows if r["workers"] == workers]
        parts = []
        for name, key, unit, raw in measures:
            ranked = sorted(here, key=key)
            best = ranked[0]
            text = f"{name}: {best['engine']} ({figure(key(best))} {unit})"
            if len(ranked) > 1:
                second = ranked[1]
                close = key(second) - key(best) <= max(spread(best[raw]), spread(second[raw]))
                text += f", then {second['engine']} ({figure(key(second))}"
                text += ", within the spread between trials)" if close else ")"
            parts.append(text)
        if here:
            sentences.append(f"At W = {workers}, best on " + "; ".join(parts) + ".")
            parts = [
                f"{r['engine']} {r[f'out{big}'] * big:.0f} ms a round outside the workers and "
                f"{r[f'cpu{big}']:+.0%} CPU inside them"
                for r in sorted(here, key=lambda r: r[f"quiet{big}"])
            ]
            sentences.append(f"Where the overhead at W = {workers} goes: " + "; ".join(parts) + ".")

    # The rule, made explicit, at W = cores: another engine serves this shape better
    # than Ray if it has the lower round overhead at the largest N, beyond the noise and by a
    # material share of the round; or if it is better on both start-up and memory (beyond the
    # noise, materially) while its round overhead is not materially worse.
    at = options.cores if options.cores in options.workers else options.workers[0]
    here = {r["engine"]: r for r in rows if r["workers"] == at}
    ray = here.get("ray")
    if ray is None:
        return " ".join(sentences) + f" Ray has no figures at W = {at}: no choice made."
    ideal = ray[f"ideal{big}"] * 1000 / big  # the round's ideal, ms per participant
    # (with the pooled serial compute, so that the same share means the same time for all)

    def beats(row: dict, name: str) -> bool:
        _, key, _, raw = next(m for m in measures if m[0] == name)
        margin = key(ray) - key(row)
        material = MATERIAL_ROUND * ideal if name == decisive else MATERIAL_OTHER * key(ray)
        return margin > max(spread(ray[raw]), spread(row[raw])) and margin > material

    reasons: dict[str, str] = {}
    for engine, row in here.items():
        if engine == "ray":
            continue
        extra = row[f"quiet{big}"] - ray[f"quiet{big}"]  # ms per participant, > 0: slower
        if beats(row, decisive):
            reasons[engine] = (
                f"its {decisive} is {-extra:.3g} ms/participant below Ray's, "
                f"{-extra / ideal:.0%} of the ideal round"
            )
        elif beats(row, "start-up") and beats(row, "memory once idle"):
            if extra <= MATERIAL_ROUND * ideal:
                reasons[engine] = (
                    f"it starts in {min(row['startup']):.2g} s against Ray's "
                    f"{min(ray['startup']):.2g} s and idles in {median(row['idle_total']):,.0f} "
                    f"against {median(ray['idle_total']):,.0f} MiB, and its {decisive} is "
                    f"{extra:+.3g} ms/participant from Ray's ({extra / ideal:+.0%} of the ideal "
                    f"round, no worse than {MATERIAL_ROUND:.0%})"
                )
    rule = (
        f"(the rule, at W = {at}: a {decisive} lower than Ray's beyond the noise and by over "
        f"{MATERIAL_ROUND:.0%} of the ideal round; or start-up and memory once idle both better "
        f"beyond the noise and by over {MATERIAL_OTHER:.0%}, with that overhead no more than "
        f"{MATERIAL_ROUND:.0%} of the ideal round above Ray's)"
    )
    if reasons:
        engine = min(reasons, key=lambda e: here[e][f"quiet{big}"])
        choice = f"{engine} serves this shape better than Ray {rule}: {reasons[engine]}."
    else:
        choice = (
            f"No engine serves this shape better than Ray {rule}: against Ray's round overhead, "
            + ", ".join(
                f"{e} {r[f'quiet{big}'] - ray[f'quiet{big}']:+.3g} ms/participant "
                f"({(r[f'quiet{big}'] - ray[f'quiet{big}']) / ideal:+.0%} of the ideal round)"
                for e, r in here.items()
                if e != "ray"
            )
            + "; the choice stays Ray."
        )
    return " ".join(sentences) + " " + choice


def print_table(rows: list[dict], options: argparse.Namespace) -> None:
    head = (
        f"{'engine':<12}{'W':>3}{'runs':>5}{'start s':>9}{'import s':>9}{'stop s':>8}"
        f"{'procs':>6}{'idle RSS':>10}{'idle PSS':>10}{'wkr RSS':>9}{'wkr PSS':>9}"
        f"{'driver+':>8}{'after RSS':>10}{'left':>6}"
    )
    print("Start-up (s, the best run) and memory (MiB, medians over the runs):")
    print(head)
    print("-" * len(head))
    for row in rows:
        print(
            f"{row['engine']:<12}{row['workers']:>3}{row['trials']:>5}"
            f"{min(row['startup']):>9.2f}{min(row['import']):>9.2f}"
            f"{median(row['shutdown']):>8.2f}{median(row['processes']):>6.0f}"
            f"{median(row['idle_rss']):>10.0f}{median(row['idle_pss']):>10.0f}"
            f"{median(row['worker_rss']):>9.0f}{median(row['worker_pss']):>9.0f}"
            f"{median(row['driver_growth']):>8.0f}{median(row['after_rss']):>10.0f}"
            f"{len(row['left']):>6}"
        )
    print(
        "start = engine import + start + W workers done with a first task importing torch;"
        " idle = summed over the engine's processes once idle after start-up; wkr = per worker;"
        " driver+ = the driver's own growth from importing and starting the engine (Dask's"
        " scheduler and nannies live there); after = summed after the rounds; left = processes"
        " left after shutdown."
    )
    print()
    head = (
        f"{'engine':<12}{'W':>3}"
        + "".join(
            f"{f'wall {n}':>11}{f'ovh {n}':>10}{f'out {n}':>9}{f'cpu+ {n}':>10}{f'quiet {n}':>11}"
            for n in options.sizes
        )
        + f"{'equal':>7}"
    )
    print("Rounds (ms per participant unless marked; see below for which runs count):")
    print(head)
    print("-" * len(head))
    for row in rows:
        print(
            f"{row['engine']:<12}{row['workers']:>3}"
            + "".join(
                f"{row[f'wall{n}'] * 1000:>9.0f}ms{row[f'over{n}']:>10.3f}{row[f'out{n}']:>9.3f}"
                f"{row[f'cpu{n}']:>+10.0%}{row[f'quiet{n}']:>11.3f}"
                for n in options.sizes
            )
            + f"{'yes' if row['equal'] else 'NO':>7}"
        )
    print(
        "wall N = round wall time and ovh N = (wall - the run's serial compute x N / min(W,"
        " cores)) / N, the issue's overhead, both from the least disturbed run; then medians"
        " over runs: out N = (wall - slowest worker's busy time) / N, dispatch, transfer and"
        " gathering alone; cpu+ N = the CPU the workers' processes burnt per participant beyond"
        " the plain loop's; quiet N = out + the CPU all the engine's processes and the driver"
        " spent per participant beyond the plain loop's, / min(W, cores): the overhead on a"
        " quiet machine. equal = the engine's first round matched the one-process round."
    )


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--workers", default="2,4", help="worker counts W (default 2,4)")
    parser.add_argument("--sizes", default="100,1000", help="participants N per round")
    parser.add_argument("--engines", default=",".join(ENGINES))
    parser.add_argument("--reps", type=int, default=2, help="trials per engine and W")
    parser.add_argument("--rounds", type=int, default=5, help="timed rounds per N per trial")
    parser.add_argument("--batch", type=int, default=8, help="images per participant's step")
    parser.add_argument(
        "--baseline",
        type=int,
        default=200,
        help="participants in each serial pure-compute measurement",
    )
    parser.add_argument("--cores", type=int, default=os.cpu_count() or 1)
    parser.add_argument(
        "--settle", type=float, default=1.5, help="seconds idle before memory is read"
    )
    parser.add_argument(
        "--grace",
        type=float,
        default=10.0,
        help="seconds an engine's processes get to exit after shutdown",
    )
    parser.add_argument("--trial-timeout", type=float, default=240.0)
    parser.add_argument(
        "--budget", type=float, default=570.0, help="seconds after which no further trial starts"
    )
    parser.add_argument(
        "--dask-stock",
        action="store_true",
        help="keep Dask's MALLOC_TRIM_THRESHOLD_=65536 in its workers",
    )
    parser.add_argument("--trial", choices=ENGINES, help=argparse.SUPPRESS)
    parser.add_argument("--trial-workers", type=int, help=argparse.SUPPRESS)
    parser.add_argument("--out", help=argparse.SUPPRESS)
    options = parser.parse_args()
    options.sizes = [int(n) for n in str(options.sizes).split(",")]
    options.workers = [int(w) for w in str(options.workers).split(",")]
    if options.trial:
        Path(options.out).write_text(json.dumps(trial(options)))
        return

    began = time.perf_counter()
    engines = [e for e in options.engines.split(",") if e in ENGINES]
    here = str(Path(__file__).resolve().parent)
    scratch = Path(tempfile.mkdtemp(prefix="fedmagic-engines-"))
    os.environ.update(
        # Workers import this file as the module ``engines``, for run_participants().
        PYTHONPATH=os.pathsep.join([here] + [p for p in [os.environ.get("PYTHONPATH")] if p]),
        OMP_NUM_THREADS="1",
        MKL_NUM_THREADS="1",
        PYTHONUNBUFFERED="1",
        # Ray would otherwise try to report usage over the network; this machine has none.
        RAY_USAGE_STATS_ENABLED="0",
        # ipyparallel's profile (connection files) in the scratch folder, not ~/.ipython.
        IPYTHONDIR=str(scratch / "ipython"),
    )
    subreaper = set_child_subreaper()
    print(
        f"engines benchmark: {platform.python_version()}, {options.cores} cores, "
        f"{psutil.virtual_memory().total / (1 << 30):.0f} GiB; "
        + ", ".join(f"{k} {v}" for k, v in versions().items())
    )
    print(f"load average at start: {loadavg()}")
    print(
        f"W = {options.workers}, N = {options.sizes}, {options.rounds} timed rounds (after one"
        f" warm-up) per N per trial, {options.reps} trials per engine and W, batch "
        f"{options.batch}; scratch {scratch}; orphan catching "
        f"{'on' if subreaper else 'OFF'}"
    )

    bare = subprocess.run(
        [
            sys.executable,
            "-c",
            "import psutil, torch; torch.set_num_threads(1); "
            "m = psutil.Process().memory_full_info(); print(m.rss, m.pss)",
        ],
        capture_output=True,
        text=True,
        cwd=scratch,
    )
    if bare.returncode == 0:
        rss, pss = (int(v) / MiB for v in bare.stdout.split())
        print(
            f"For scale: a bare Python process that has imported torch holds {rss:.0f} MiB RSS "
            f"({pss:.0f} MiB PSS) alone."
        )

    schedule = []
    for rep in range(options.reps):
        for position, workers in enumerate(options.workers):
            turn = (rep + position) % len(engines)
            schedule += [(engine, workers) for engine in engines[turn:] + engines[:turn]]
    trials = []
    for engine, workers in schedule:
        if time.perf_counter() - began > options.budget:
            print(f"  budget of {options.budget:.0f} s spent: {engine} W={workers} not run")
            continue
        result = run_trial(engine, workers, options, scratch)
        trials.append(result)
        if "failed" in result:
            print(f"  {engine:<11} W={workers}: FAILED {result['failed']}")
        else:
            rounds = ", ".join(
                f"N={n} wall {median(result['rounds'][str(n)]['walls']):.3f} s"
                for n in options.sizes
            )
            print(
                f"  {engine:<11} W={workers}: start {result['startup_s']:.2f} s (import "
                f"{result['import_s']:.2f}), idle {result['idle']['rss'] / MiB:.0f} MiB RSS in "
                f"{result['idle']['count']} processes, {rounds}, serial "
                f"{median(result['serial_ms']):.2f} ms/participant, stop "
                f"{result['shutdown_s']:.2f} s, trial {result['trial_s']:.0f} s, load "
                f"{loadavg()}"
            )
        for line in result.get("left_behind", []):
            print(f"    left after shutdown (killed): {line}")
        for line in result.get("helpers", []):
            print(f"    kept until the driver exits (multiprocessing's): {line}")
        for line in result["orphans"]:
            print(f"    outlived the trial's process (killed): {line}")

    serial = [ms for t in trials if "failed" not in t for ms in t["serial_ms"]]
    serial_ms = median(serial)
    print()
    print(
        f"Pure compute: {serial_ms:.3f} ms per participant in one process (median of "
        f"{len(serial)} runs of {options.baseline}, spread {min(serial):.3f}-"
        f"{max(serial):.3f}); a round's ideal = that x N / min(W, {options.cores} cores)."
    )
    print()
    print("The processes of each engine once idle (first trial; RSS MiB; * = a worker):")
    for engine in engines:
        for workers in options.workers:
            first = next(
                (
                    t
                    for t in trials
                    if t["engine"] == engine and t["workers"] == workers and "failed" not in t
                ),
                None,
            )
            if first is None:
                continue
            counted: dict[str, list[float]] = {}
            for row in first["idle"]["processes"]:
                name = ("*" if row["worker"] else "") + row["name"]
                counted.setdefault(name, []).append(row["rss"] / MiB)
            print(
                f"  {engine} W={workers}: "
                + ", ".join(
                    f"{name} {sum(v):.0f}" + (f" ({len(v)})" if len(v) > 1 else "")
                    for name, v in sorted(counted.items(), key=lambda kv: -sum(kv[1]))
                )
                + f"; driver +{first['idle']['driver_growth'] / MiB:.0f}"
            )
    print()
    print("What each engine printed (a notebook cell would show it), by phase, first lines:")
    for engine in engines:
        for workers in options.workers:
            mine = [t for t in trials if t["engine"] == engine and t["workers"] == workers]
            if not mine:
                continue
            lines: dict[str, list[str]] = {}
            for t in mine:
                for phase, said in t["chatter"].items():
                    for line in said:
                        if line not in lines.setdefault(phase, []):
                            lines[phase].append(line)
            total = sum(len(v) for t in mine for v in t["chatter"].values()) / len(mine)
            print(f"  {engine} W={workers}: {total:.0f} lines per trial")
            for phase, said in lines.items():
                for line in said[:4]:
                    print(f"    [{phase}] {line[:220]}")
                if len(said) > 4:
                    print(f"    [{phase}] ... {len(said) - 4} more distinct lines")
    rows = [
        r
        for w in options.workers
        for e in engines
        if (r := summarise(trials, e, w, options, serial_ms)) is not None
    ]
    print()
    print_table(rows, options)
    print()
    print("Verdict: " + verdict(rows, options))
    failures = [t for t in trials if "failed" in t]
    if failures:
        print(
            f"{len(failures)} trials failed: "
            + "; ".join(f"{t['engine']} W={t['workers']}" for t in failures)
        )
    print(f"\nload average at end: {loadavg()}; whole run {time.perf_counter() - began:.0f} s")


if __name__ == "__main__":
    # Run as a script, this file is __main__; workers must find these functions under one
    # importable name, so the driver runs them from the module ``engines`` too.
    sys.path.insert(0, str(Path(__file__).resolve().parent))
    import engines

    engines.main()
