"""Round overhead beyond compute as participants grow: N = 3, 30, 100, 300.

The tutorial's ConvNet state (87 KiB) goes through a ``fedmagic relay``
process to N participants, all in one other process (one asyncio loop, one
connection each, trivial training: each sends back the weights it got), and
back to the initiator in this process, which checks, averages, tests and
checkpoints. A round's time is from one round's end to the next one's (the
checkpoint save included); with no training, all of it is overhead.

The baseline, measured in the same run and alternated with it: the same
participants and relay, with the initiator sending the state out and reading
the N updates back itself, with no checks, averaging or checkpoint. Targets:
at most 3 ms per participant, and under 1 s a round at N = 300.
"""

from __future__ import annotations

import argparse
import asyncio
import os
import secrets
import statistics
import subprocess
import sys
import tempfile
import time

import torch

from harness import free_port

from fedmagic import FedAvgScheduler
from fedmagic.wire.codec import Frame, Kind, StateReader
from fedmagic.examples.digits_task import ConvNet
from fedmagic.engine.launch import start_task
from fedmagic.wire.link import Link


class Echo(FedAvgScheduler):
    """The ConvNet with nothing to train: its rounds are pure overhead."""

    def make_model(self): return ConvNet()
    def make_train_dataloader(self): return []
    def make_test_dataloader(self): return []
    def state_dict(self): return self.model.state_dict()
    def load_state_dict(self, state_dict): self.model.load_state_dict(state_dict)
    def train(self): pass
    def test(self): return {}


async def echo(link: Link, arrivals: dict[int, list[float]] | None = None) -> None:
    """Verify, then send back each round's weights as they came, until the task ends.

    Args:
        arrivals: if given, each round's number gets the time (``time.time()``) this
            participant held the whole state.
    """
    reader, buffer, granted, header, state = None, {}, False, {}, None
    try:
        while True:
            frame = await link.recv()
            if frame.kind == Kind.TASK:
                await link.send(Frame({"t": Kind.STATUS, "stage": "verified", "ok": True,
                                       "samples": 100}))
            elif frame.kind == Kind.ROUND:
                header, reader = frame.header, StateReader(out=buffer)
                granted = bool(header.get("upload"))
            elif frame.kind == Kind.STATE:
                reader.feed(frame)
            elif frame.kind == Kind.STATE_END:
                state = reader.finish(frame)
                number = header["round"]
                got = time.time()
                await link.send(Frame({"t": Kind.TRAINED, "round": number, "seconds": 0.0}))
                if granted:
                    await link.send_state(state, round=number)
                if arrivals is not None:
                    arrivals.setdefault(number, []).append(got)
            elif frame.kind == Kind.UPLOAD:
                await link.send_state(state, round=header["round"])
            elif frame.kind in (Kind.FINISH, Kind.TASK_CLOSED):
                return
    finally:
        await link.close()


async def echo_participants(url: str, task: str, token: str, count: int) -> None:
    """``count`` participants that send back the weights they get, until the task ends."""
    async def one(node: str) -> None:
        await echo(await Link.open(url, role="participant", task=task, token=token, node=node,
                                   wait=120))

    await asyncio.gather(*(one(f"p{index}") for index in range(count)))


def fedmagic_round_seconds(url: str, token: str, count: int, rounds: int) -> float:
    """Median seconds per round of a whole fedmagic task with ``count`` participants."""
    task = f"scale-{count}-{secrets.token_hex(3)}"
    ended: list[float] = []

    def on_event(text: str) -> None:
        if text.startswith("round ") and "averaged" in text:
            ended.append(time.perf_counter())

    run = start_task(Echo(min_clients=count, max_clients=count, max_rounds=rounds + 1,
                          name=task), task, relay=url, token=token, join_timeout=120,
                     join_grace=0, on_event=on_event, quiet=True)
    participants = _participants_process(url, task, token, count)
    try:
        run.wait(600)
    finally:
        participants.wait(60)
    return statistics.median(b - a for a, b in zip(ended, ended[1:]))


def baseline_round_seconds(url: str, token: str, count: int, rounds: int) -> float:
    """Median seconds to send the state to ``count`` participants and read their updates."""
    task = f"base-{count}-{secrets.token_hex(3)}"
    state = ConvNet().state_dict()

    async def rounds_by_hand() -> list[float]:
        link = await Link.open(url, role="initiator", task=task, token=token)
        participants = _participants_process(url, task, token, count)
        try:
            joined = 0
            while joined < count:
                frame = await link.recv()
                if frame.kind == Kind.PEER_JOINED:
                    await link.send(Frame({"t": Kind.TASK, "to": [frame.header["from"]]}))
                elif frame.kind == Kind.STATUS:
                    joined += 1
            times = []
            for number in range(1, rounds + 2):
                started = time.perf_counter()
                await link.send(Frame({"t": Kind.ROUND, "to": "*", "round": number,
                                       "upload": True}))
                await link.send_state(state, to="*", round=number)
                done = 0
                while done < count:
                    done += (await link.recv()).kind == Kind.STATE_END
                times.append(time.perf_counter() - started)
            await link.send(Frame({"t": Kind.FINISH, "to": "*", "ok": True, "reason": "done"}))
            return times[1:]
        finally:
            await link.close()
            participants.wait(60)

    return statistics.median(asyncio.run(rounds_by_hand()))


def _participants_process(url: str, task: str, token: str, count: int) -> subprocess.Popen:
    return subprocess.Popen([sys.executable, __file__, "--participants-of", task, url, token,
                             str(count)], env={**os.environ, "OMP_NUM_THREADS": "1"})


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--counts", type=int, nargs="+", default=[3, 30, 100, 300])
    parser.add_argument("--rounds", type=int, default=5)
    parser.add_argument("--participants-of", nargs=4, help=argparse.SUPPRESS)
    options = parser.parse_args()
    if options.participants_of:
        task, url, token, count = options.participants_of
        asyncio.run(echo_participants(url, task, token, int(count)))
        return
    os.chdir(tempfile.mkdtemp(prefix="fedmagic-scale-"))
    port, token = free_port(), secrets.token_hex(8)
    url = f"ws://127.0.0.1:{port}"
    relay = subprocess.Popen([sys.executable, "-m", "fedmagic", "relay", "--port", str(port),
                              "--max-waiting-per-address", "1000"], stdout=subprocess.PIPE,
                             stderr=subprocess.DEVNULL, text=True)
    try:
        relay.stdout.readline()
        print(f"{'N':>4} {'baseline':>10} {'fedmagic':>10} {'fedmagic/N':>11} "
              f"{'each added participant':>23}")
        first: tuple[int, float] | None = None
        for count in options.counts:
            baseline = baseline_round_seconds(url, token, count, options.rounds)
            fedmagic = fedmagic_round_seconds(url, token, count, options.rounds)
            added = ("" if first is None else
                     f"{(fedmagic - first[1]) / (count - first[0]) * 1000:8.2f} ms")
            first = first or (count, fedmagic)
            print(f"{count:4d} {baseline * 1000:8.1f}ms {fedmagic * 1000:8.1f}ms "
                  f"{fedmagic / count * 1000:8.2f} ms {added:>23}", flush=True)
    finally:
        relay.terminate()
        relay.wait(30)
    print("targets: at most 3 ms per participant, under 1 s a round at N = 300 (each added "
          "participant: the round's growth over the smallest N, per participant)")


if __name__ == "__main__":
    torch.set_num_threads(1)
    main()
