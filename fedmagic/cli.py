"""The ``fedmagic`` command: relay, join, digits and demo."""

from __future__ import annotations

import argparse
import asyncio
import importlib
import os
import signal
import socket
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from typing import Any, Iterator, Sequence

from .engine.simulation_options import add_options as add_simulation_options

__all__ = ["main"]

EXAMPLE = Path(__file__).with_name("examples") / "digits_task.py"


class _StrategyNames:
    """The keys of ``fedmagic.strategies.BY_NAME``, as argparse ``choices``, imported when
    first asked: the strategies bring torch, which ``fedmagic relay`` does without."""

    def __contains__(self, name: object) -> bool:
        return name in self._names()

    def __iter__(self) -> Iterator[str]:
        return iter(self._names())

    @staticmethod
    def _names() -> list[str]:
        from .strategies import BY_NAME

        return list(BY_NAME)


def main(argv: Sequence[str] | None = None) -> int:
    parser = argparse.ArgumentParser(
        prog="fedmagic",
        description="Federated averaging across data owners, from Jupyter or the command line.",
    )
    commands = parser.add_subparsers(dest="command", required=True)

    relay = commands.add_parser(
        "relay", help="run a relay that initiators and participants connect to"
    )
    relay.add_argument(
        "--host",
        default="127.0.0.1",
        help="address to listen on (default 127.0.0.1; 0.0.0.0 for every interface)",
    )
    relay.add_argument("--port", type=int, default=8765)
    relay.add_argument(
        "--token",
        default=os.environ.get("FEDMAGIC_RELAY_TOKEN"),
        help="a token initiators must present to create tasks "
        "(default $FEDMAGIC_RELAY_TOKEN; none: anyone may)",
    )
    relay.add_argument("--certfile", help="TLS certificate (PEM) to serve wss://")
    relay.add_argument("--keyfile", help="TLS private key (PEM), if not in --certfile")
    relay.add_argument(
        "--max-connections",
        type=int,
        help="connections served at once, "
        "beyond which clients hear 'relay busy' (default: from the open-file "
        "limit, which the relay raises to its hard limit)",
    )
    relay.add_argument(
        "--max-participants", type=int, help="participants of one task (default 4096)"
    )
    relay.add_argument(
        "--max-waiting",
        type=int,
        help="joins held waiting for a task that "
        "has not started (default 256, at most half the connections)",
    )
    relay.add_argument(
        "--max-waiting-per-address", type=int, help="of those, from one IP address (default 16)"
    )
    relay.add_argument(
        "--max-mib-per-second",
        type=float,
        help="MiB per second one connection may send, after a burst; a faster "
        "sender is read slower (default 512)",
    )

    join = commands.add_parser("join", help="take part in a task from this machine")
    join.add_argument("url", help="the relay, e.g. ws://127.0.0.1:8765")
    join.add_argument("--task", required=True, help="the task id")
    join.add_argument(
        "--token",
        default=os.environ.get("FEDMAGIC_TOKEN"),
        help="the task's join token (default $FEDMAGIC_TOKEN)",
    )
    join.add_argument(
        "--node", default=socket.gethostname(), help="this node's name (default: the host name)"
    )
    join.add_argument("--yes", action="store_true", help="accept the task's code without asking")
    join.add_argument(
        "--wait",
        type=float,
        default=300.0,
        help="seconds to wait for the relay and the task to appear (default 300)",
    )
    join.add_argument(
        "--reconnect-window",
        type=float,
        metavar="SECONDS",
        help="once in a task, keep trying this long to get back to it when the "
        "relay or the initiator's connection drops, without consenting again "
        "(default 60; 0: give up at once)",
    )
    join.add_argument("--workdir", help="run the task in this directory (default: here)")
    join.add_argument("--cafile", help="CA bundle to trust for a wss:// relay")

    digits = commands.add_parser(
        "digits", help="write handwritten digits as MNIST files, one directory per party"
    )
    digits.add_argument("workdir")
    digits.add_argument("--participants", type=int, default=3)
    digits.add_argument("--split", default="iid", choices=("iid", "by-label"))
    digits.add_argument(
        "--data-dir",
        default="demo_task/data",
        help="where, inside each party's directory (default demo_task/data)",
    )
    digits.add_argument("--seed", type=int, default=0)

    demo = commands.add_parser(
        "demo",
        help="run a whole task on this machine: digits data, "
        "participant processes and the initiator",
    )
    demo.add_argument(
        "--participants",
        type=int,
        help="default 3; 5 for krum and multikrum, which need more than 2f+2 = 4 a round",
    )
    demo.add_argument("--rounds", type=int, help="default 10; 100 with --fedsgd")
    demo.add_argument("--split", default="iid", choices=("iid", "by-label"))
    demo.add_argument("--workdir", help="default: a new temporary directory")
    demo.add_argument(
        "--strategy",
        choices=_StrategyNames(),
        metavar="NAME",
        help="how each round combines the updates: %(choices)s (default fedavg)",
    )
    demo.add_argument(
        "--fedsgd",
        action="store_true",
        help="FedSGD: each round one gradient step on each node's whole data "
        "(learning rate 0.5, no momentum, 100 rounds)",
    )
    demo.add_argument(
        "--dp-epsilon",
        type=float,
        metavar="EPS",
        help="differential privacy (DifferentialPrivacy around the strategy): noise "
        "calibrated to spend at most EPS over the rounds at delta 1e-5; prints the epsilon spent",
    )
    demo.add_argument(
        "--secure-aggregation",
        action="store_true",
        help="secure aggregation (SecureAggregation around the strategy, SecAgg+): the "
        "initiator sees only each round's sum of masked updates; with --dp-epsilon the "
        "participants add the noise (distributed DP)",
    )
    demo.add_argument(
        "--decentralized",
        action="store_true",
        help="each round, a participant elected in turn aggregates it (is_centralized=False)",
    )

    simulate = commands.add_parser(
        "simulate",
        help="run the demo's digits task with many virtual participants on Dask workers",
    )
    simulate.add_argument("--participants", type=int, default=100, help="default 100")
    simulate.add_argument("--rounds", type=int, default=10, help="default 10")
    simulate.add_argument(
        "--strategy",
        choices=_StrategyNames(),
        metavar="NAME",
        help="how each round combines the updates: %(choices)s (default fedavg)",
    )
    add_simulation_options(simulate)
    simulate.add_argument("--workdir", help="default: a new temporary directory")

    options = parser.parse_args(argv)
    commands_run = {
        "relay": _relay,
        "join": _join,
        "digits": _digits,
        "demo": _demo,
        "simulate": _simulate,
    }
    return commands_run[options.command](options)


def _relay(options: argparse.Namespace) -> int:
    from .wire.relay import Relay, RelayLimits, log, raise_open_file_limit, serve_relay, ssl_context

    for name in (
        "max_connections",
        "max_participants",
        "max_waiting",
        "max_waiting_per_address",
        "max_mib_per_second",
    ):
        value = getattr(options, name)
        if value is not None and value <= 0:
            print(
                f"fedmagic relay: --{name.replace('_', '-')} must be positive, not {value:g}",
                file=sys.stderr,
            )
            return 2
    # One open file per connection: the usual soft limit of 1024 would cap the relay early.
    files = raise_open_file_limit()
    if files is not None:
        before, after = files
        log.info(
            "open-file limit %d%s", after, f" (raised from {before})" if after > before else ""
        )
    chosen = {
        "max_connections": options.max_connections,
        "max_participants": options.max_participants,
        "max_waiting": options.max_waiting,
        "max_waiting_per_address": options.max_waiting_per_address,
    }
    if options.max_mib_per_second is not None:
        chosen["max_bytes_per_second"] = options.max_mib_per_second * (1 << 20)
    limits = RelayLimits(**{name: value for name, value in chosen.items() if value is not None})

    async def run() -> None:
        context = ssl_context(options.certfile, options.keyfile)
        server = await serve_relay(
            Relay(token=options.token, limits=limits), options.host, options.port, ssl=context
        )
        stop = asyncio.Event()
        loop = asyncio.get_running_loop()
        for signum in (signal.SIGINT, signal.SIGTERM):  # before saying so: then it may be stopped
            loop.add_signal_handler(signum, stop.set)
        scheme = "wss" if context else "ws"
        print(
            f"fedmagic relay listening on {scheme}://{options.host}:{options.port}"
            + (" (initiators need the relay token)" if options.token else ""),
            flush=True,
        )
        await stop.wait()
        server.close()
        await server.wait_closed()
        print("fedmagic relay stopped", flush=True)

    try:
        asyncio.run(run())
    except OSError as exc:
        print(
            f"fedmagic relay: cannot listen on {options.host}:{options.port}: "
            f"{exc.strerror or exc}",
            file=sys.stderr,
        )
        return 1
    return 0


def _join(options: argparse.Namespace) -> int:
    import ssl

    from tqdm import tqdm

    from .engine.participant import ParticipantRuntime
    from .engine.task import TaskPackage
    from .errors import FedMagicError
    from .wire.sessions import join_relay

    if not options.token:
        print(
            "fedmagic join: pass --token (or set FEDMAGIC_TOKEN): the task's author "
            "shares it with the join line",
            file=sys.stderr,
        )
        return 2
    if options.workdir:
        os.chdir(options.workdir)
    bar: dict[str, Any] = {}

    def consent(package: TaskPackage) -> bool:
        verify = (
            ""
            if package.verify_source is None
            else f" and DatasetVerify code ({len(package.verify_source.splitlines())} lines)"
        )
        privacy = "".join(f"\nprivacy: {line}" for line in package.guarantees)
        print(
            f"task {package.task_id!r} runs {package.call}\nfrom {package.filename} "
            f"({len(package.source.splitlines())} lines){verify}, code hash "
            f"{package.code_hash}\nstrategy: {package.strategy_text}{privacy}",
            flush=True,
        )
        if options.yes:
            return True
        if not sys.stdin.isatty():
            print(
                "fedmagic join: not accepting code without a yes; pass --yes to accept "
                "non-interactively",
                file=sys.stderr,
            )
            return False
        while True:
            answer = input("Run this code on this machine? [y]es / [n]o / [s]how code: ")
            if answer.lower().startswith("s"):
                print(package.review())
            else:
                return answer.lower().startswith("y")

    def on_event(kind: str, details: dict[str, Any]) -> None:
        if kind == "verified":
            print(f"data verified: {details['samples']} training samples", flush=True)
            bar["bar"] = tqdm(
                total=details["max_rounds"] or None,
                unit="round",
                desc=options.node,
                dynamic_ncols=True,
            )
        elif kind == "round":
            bar["bar"].set_postfix_str(f"round {details['round']}: training")
        elif kind == "epoch":
            bar["bar"].set_postfix_str(
                f"round {details['round']}: epoch {details['epoch']}/{details['epochs']}"
            )
        elif kind == "uploaded":
            bar["bar"].update(1)
            bar["bar"].set_postfix_str(f"round {details['round']}: update sent")
        elif kind == "reconnecting":
            bar["bar"].set_postfix_str(f"reconnecting (up to {details['window']:g} s)")
        elif kind == "reconnected":
            bar["bar"].set_postfix_str("back in the task")

    # Tasks almost always use torchvision: import it before joining, so a node
    # waiting for a task is ready to run it the moment it arrives.
    importlib.import_module("torchvision")

    async def run() -> Any:
        context = (
            ssl.create_default_context(cafile=options.cafile)
            if options.url.startswith("wss:")
            else None
        )
        print(
            f"waiting up to {options.wait:g} s for task {options.task!r} at {options.url} "
            f"(the relay must be up and the task launched)",
            flush=True,
        )
        link = await join_relay(
            options.url, options.task, options.token, options.node, wait=options.wait, ssl=context
        )
        print(f"joined task {options.task!r} at {options.url} as {options.node!r}", flush=True)
        window = (
            {}
            if options.reconnect_window is None
            else {"reconnect_window": options.reconnect_window}
        )
        return await ParticipantRuntime(link, options.node, consent, on_event, **window).run()

    try:
        outcome = asyncio.run(run())
    except FedMagicError as exc:
        print(f"fedmagic join: {exc}", file=sys.stderr)
        return 1
    except KeyboardInterrupt:
        print("fedmagic join: interrupted; left the task", file=sys.stderr)
        return 130
    finally:
        if "bar" in bar:
            bar["bar"].close()
    if not outcome.ok:
        print(
            f"fedmagic join: task {outcome.task_id!r} did not finish: {outcome.reason}",
            file=sys.stderr,
        )
        return 1
    rounds = f"{outcome.rounds} round" + ("s" if outcome.rounds != 1 else "")
    print(f"task {outcome.task_id!r} finished; this node trained {rounds}", flush=True)
    return 0


def _digits(options: argparse.Namespace) -> int:
    from .digits import write_partitions

    layout = write_partitions(
        options.workdir,
        options.participants,
        split=options.split,
        seed=options.seed,
        data_dir=options.data_dir,
    )
    print(
        f"test set ({layout.test_size} images): every party; initiator in "
        f"{layout.initiator.workdir}"
    )
    for party in layout.nodes:
        print(f"{party.name}: {party.train_size} training images in {party.data_dir}")
    return 0


def _simulate(options: argparse.Namespace) -> int:
    from .digits import write_partitions
    from .engine.simulation import Simulation
    from .engine.simulation_options import settings
    from .errors import FedMagicError
    from .examples.digits_task import DigitsScheduler
    from .log import log_sink

    workdir = Path(options.workdir or tempfile.mkdtemp(prefix="fedmagic-simulate-"))
    # One party holding every training image: the author's, which the simulation shares out
    (whole,) = write_partitions(workdir, 1, seed=options.seed, data_dir="demo_task/data").nodes
    os.chdir(whole.workdir)
    scheduler = DigitsScheduler(
        min_clients=1, max_clients=options.participants, name="demo_task", max_rounds=options.rounds
    )
    bars = _RoundBars()
    log_sink.set(bars.write)  # the task's own log lines print above the bar, as events do
    try:
        simulation = Simulation(
            scheduler,
            options.participants,
            task_id="simulated-digits",
            strategy=options.strategy,
            on_event=bars.write,
            on_progress=bars.show,
            **settings(options),
        )
        result = simulation.run()
    except FedMagicError as failed:
        print(f"fedmagic simulate: {failed}", file=sys.stderr)
        return 2
    finally:
        bars.close()
    print(
        f"final accuracy {result.metrics['accuracy']:.1%} after {result.rounds} rounds with "
        f"{options.participants} virtual participants; checkpoint in {result.checkpoint}"
    )
    return 0


class _RoundBars:
    """A terminal progress bar a simulated round: participants done of those selected."""

    def __init__(self) -> None:
        self.bar: Any = None
        self.number = 0

    def show(self, progress: Any) -> None:
        from tqdm import tqdm

        if self.bar is None or progress.number != self.number:
            self.close()
            self.number = progress.number
            self.bar = tqdm(
                total=progress.selected,
                desc=f"round {progress.number}",
                unit="participant",
                leave=False,
                dynamic_ncols=True,
                disable=not sys.stderr.isatty(),  # a bar only on a terminal
            )
        self.bar.n = progress.done
        left_out = progress.done - progress.counts.get("uploaded", 0)
        self.bar.set_postfix_str(f"{left_out} left out" if left_out else "", refresh=False)
        self.bar.refresh()
        if progress.finished:
            self.close()

    def write(self, line: str) -> None:
        from tqdm import tqdm

        tqdm.write(line, file=sys.stdout)

    def close(self) -> None:
        if self.bar is not None:
            self.bar.close()
            self.bar = None


def _demo(options: argparse.Namespace) -> int:
    from .digits import write_partitions
    from .wire.relay import new_token

    sizes = _demo_sizes(options.strategy, options.participants, options.secure_aggregation)
    if isinstance(sizes, str):
        print(f"fedmagic demo: {sizes}", file=sys.stderr)
        return 2
    if options.dp_epsilon is not None and not options.dp_epsilon > 0:
        print(
            f"fedmagic demo: --dp-epsilon must be above 0, not {options.dp_epsilon:g}",
            file=sys.stderr,
        )
        return 2
    if options.dp_epsilon is not None and options.decentralized:
        print(
            "fedmagic demo: --dp-epsilon adds its noise where a round is combined, so with "
            "--decentralized the elected participant would see the updates without it; "
            "drop one of them",
            file=sys.stderr,
        )
        return 2
    if options.secure_aggregation and options.decentralized:
        print(
            "fedmagic demo: --secure-aggregation runs its protocol between the initiator and "
            "the participants, so with --decentralized the elected participant would receive "
            "the updates instead; drop one of them",
            file=sys.stderr,
        )
        return 2
    participants, min_clients = sizes
    workdir = Path(options.workdir or tempfile.mkdtemp(prefix="fedmagic-demo-"))
    layout = write_partitions(workdir, participants, split=options.split, data_dir="demo_task/data")
    port = _free_port()
    url = f"ws://127.0.0.1:{port}"
    env = {
        **os.environ,
        "FEDMAGIC_PORT": str(port),
        "FEDMAGIC_TOKEN": new_token(),
        "OMP_NUM_THREADS": "1",
    }
    env.pop("FEDMAGIC_RELAY", None)
    what = [options.strategy or "fedavg"]
    what += ["FedSGD"] if options.fedsgd else []
    what += ["a participant aggregates each round"] if options.decentralized else []
    what += ["secure aggregation"] if options.secure_aggregation else []
    what += [f"differential privacy, epsilon {options.dp_epsilon:g}"] if options.dp_epsilon else []
    print(
        f"demo in {workdir}: {participants} participants ({options.split} split), "
        f"{', '.join(what)}; relay embedded in the initiator at {url}",
        flush=True,
    )
    joins = []
    for party in layout.nodes:
        log = open(party.workdir / "join.log", "w")
        joins.append(
            (
                party,
                log,
                subprocess.Popen(
                    [
                        sys.executable,
                        "-m",
                        "fedmagic",
                        "join",
                        url,
                        "--task",
                        "digits",
                        "--node",
                        party.name,
                        "--yes",
                        "--wait",
                        "120",
                    ],
                    cwd=party.workdir,
                    env=env,
                    stdout=log,
                    stderr=subprocess.STDOUT,
                ),
            )
        )
    try:
        example = [sys.executable, str(EXAMPLE), "--task", "digits"]
        example += ["--min-clients", str(min_clients), "--max-clients", str(participants)]
        example += ["--rounds", str(options.rounds)] if options.rounds else []
        example += ["--strategy", options.strategy] if options.strategy else []
        example += ["--fedsgd"] if options.fedsgd else []
        example += ["--decentralized"] if options.decentralized else []
        example += ["--secure-aggregation"] if options.secure_aggregation else []
        example += ["--dp-epsilon", str(options.dp_epsilon)] if options.dp_epsilon else []
        initiator = subprocess.run(example, cwd=layout.initiator.workdir, env=env)
        # Participants hear the task end at once; give them a moment to say so.
        deadline = time.monotonic() + (30 if initiator.returncode == 0 else 5)
        for _, _, process in joins:
            try:
                process.wait(timeout=max(deadline - time.monotonic(), 0.1))
            except subprocess.TimeoutExpired:
                pass
    finally:
        for _, log, process in joins:
            if process.poll() is None:
                process.terminate()
                process.wait(timeout=10)
            log.close()
    for party, _, process in joins:
        print(f"{party.name}: exit {process.returncode}, log in {party.workdir / 'join.log'}")
    return initiator.returncode or max(process.returncode for _, _, process in joins)


def _demo_sizes(
    strategy: str | None, participants: int | None, secure: bool = False
) -> tuple[int, int] | str:
    """How many participants the demo starts, and how many each round needs (min_clients);
    or why the strategy cannot run with that many.

    Three, of which two make a round. Krum and Multi-Krum tell ``f`` arbitrary
    updates apart only among more than ``2f + 2``: the demo starts that many
    by default, and every round waits for them. Secure aggregation needs
    three a round.
    """
    from .errors import ConfigurationError
    from .strategies import BY_NAME, MultiKrum, SecureAggregation, Strategy

    chosen: Strategy = BY_NAME[strategy or "fedavg"]()
    needed = 2 * chosen.f + 3 if isinstance(chosen, MultiKrum) else 3 if secure else 2
    name = f"--strategy {strategy or 'fedavg'}" + (" --secure-aggregation" if secure else "")
    if participants is None:
        participants = max(3, needed)
    elif participants < needed:
        return (
            f"{name} ({chosen}) needs more than 2f+2 = {needed - 1} updates every round: "
            if isinstance(chosen, MultiKrum)
            else f"{name} needs {needed} participants every round: "
        ) + f"pass --participants {needed} or more"
    min_clients = min(needed, participants)
    try:
        if secure:
            chosen = SecureAggregation(chosen)
        chosen.check(min_clients, participants)
    except ConfigurationError as refused:
        return f"{name} cannot run with {participants} participants: {refused}"
    return participants, min_clients


def _free_port() -> int:
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        return probe.getsockname()[1]


if __name__ == "__main__":
    sys.exit(main())
