"""The relay under abuse: each test floods or starves a real relay on 127.0.0.1.

Waiting joins, connections, bytes and slow readers are bounded; each test
shows the abuse refused (with a message saying so) or survived, while a real
task keeps carrying frames both ways. Every await on the network is bounded.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import os
import re
import shutil
import signal
import subprocess
import sys
import time
from pathlib import Path
from typing import Any, Iterator

import pytest
import torch
from websockets.asyncio.client import ClientConnection, connect

from conftest import START_TIMEOUT, free_port, wait_for
from fedmagic.engine.checkpoint import Checkpoint
from fedmagic.wire.codec import Frame, Kind, StateReader
from fedmagic.errors import RelayRefused
from fedmagic.wire.link import Link
from fedmagic.engine.participant import ParticipantRuntime
from fedmagic.engine.policy import RoundPolicy
from fedmagic.strategies import FedAvg
from fedmagic.wire.relay import Relay, RelayLimits, connection_cap
from fedmagic.engine.rounds import Aggregator
from fedmagic.engine.task import TaskPackage
from test_relay import (TASK, Clients, assert_task_works, bounded, hello, receive_state, recv,
                        run, running_relay, status)
from tiny import Tiny

try:
    import resource
except ImportError:  # Windows
    resource = None

pytestmark = pytest.mark.timeout(60)
#: Tests that wait out the relay's own timers or rate limits, seconds by design: slow.
SECONDS_BY_DESIGN = pytest.mark.slow

MIB = 1 << 20


# -- helpers -------------------------------------------------------------------------------

def waiting_hello(task: str, node: str = "ghost") -> bytes:
    """A participant's hello for a task that does not exist, asking to wait an hour."""
    return hello(role="participant", task=task, node=node, wait=3600)


async def reply_within(connection: ClientConnection, seconds: float) -> Frame | None:
    """The relay's next frame to ``connection``, or None if it says nothing in time."""
    try:
        return Frame.parse(await asyncio.wait_for(connection.recv(), seconds))
    except asyncio.TimeoutError:
        return None


async def flood_of_waiting_joins(clients: Clients, count: int) -> list[Frame | None]:
    """``count`` connections each asking to wait for a task of its own; the replies."""
    floods = [await clients.raw() for _ in range(count)]
    for number, flood in enumerate(floods):
        await bounded(flood.send(waiting_hello(f"ghost-{number}")))
    return list(await bounded(asyncio.gather(*(reply_within(f, 1.0) for f in floods))))


@contextlib.contextmanager
def relay_log() -> Iterator[list[str]]:
    """The relay's log lines while the block runs."""
    lines: list[str] = []
    handler = logging.Handler()
    handler.emit = lambda record: lines.append(record.getMessage())  # type: ignore[method-assign]
    logger = logging.getLogger("fedmagic.relay")
    level = logger.level  # an embedded relay in an earlier test may have quietened it
    logger.setLevel(logging.INFO)
    logger.addHandler(handler)
    try:
        yield lines
    finally:
        logger.removeHandler(handler)
        logger.setLevel(level)


async def start_task(clients: Clients, *nodes: str) -> tuple[Link, list[Link]]:
    initiator = await clients.initiator()
    return initiator, await clients.join(initiator, *nodes)


# -- waiting joins and connections ---------------------------------------------------------

def test_waiting_joins_from_one_address_over_its_limit_are_refused_busy_while_a_task_runs():
    async def scenario(url):
        async with Clients(url) as clients:
            # Execute
            replies = await flood_of_waiting_joins(clients, 10)
            initiator, (alice, bob) = await start_task(clients, "alice", "bob")
            # Assert
            refused = [reply for reply in replies if reply is not None]
            assert replies.count(None) == 4
            assert {reply.header["code"] for reply in refused} == {"busy"}
            message = refused[0].header["message"]
            assert message.startswith("relay busy: 4 joins from 127.0.0.1 already wait")
            assert "per address" in message and "start the task first" in message
            await assert_task_works(clients, initiator, alice, "alice")
            await assert_task_works(clients, initiator, bob, "bob")

    # Prepare
    with running_relay(Relay(limits=RelayLimits(max_waiting_per_address=4))) as embedded:
        run(scenario(embedded.url))
        # every waiting join left with its client
        assert wait_for(lambda: embedded.relay.waiting == 0, timeout=3)


def test_waiting_joins_over_the_overall_limit_are_refused_busy_while_a_task_runs():
    async def scenario(url):
        async with Clients(url) as clients:
            # Execute
            replies = await flood_of_waiting_joins(clients, 10)
            initiator, (alice,) = await start_task(clients, "alice")
            # Assert
            refused = [reply for reply in replies if reply is not None]
            assert replies.count(None) == 6
            assert {reply.header["code"] for reply in refused} == {"busy"}
            assert refused[0].header["message"].startswith(
                "relay busy: 6 joins already wait for tasks that have not started")
            await assert_task_works(clients, initiator, alice, "alice")

    # Prepare
    limits = RelayLimits(max_waiting=6, max_waiting_per_address=100)
    with running_relay(Relay(limits=limits)) as embedded:
        run(scenario(embedded.url))


def test_waiting_joins_never_take_more_than_half_the_connections():
    async def scenario(url):
        async with Clients(url) as clients:
            # Execute
            replies = await flood_of_waiting_joins(clients, 24)
            initiator, (alice, bob) = await start_task(clients, "alice", "bob")
            # Assert
            assert replies.count(None) == 15
            await assert_task_works(clients, initiator, alice, "alice")
            await assert_task_works(clients, initiator, bob, "bob")

    # Prepare: waiting limits wider than the relay
    limits = RelayLimits(max_connections=30, max_waiting=1000, max_waiting_per_address=1000)
    relay = Relay(limits=limits)
    with running_relay(relay) as embedded:
        run(scenario(embedded.url))
    assert relay.max_waiting == 15


def test_connection_over_max_connections_is_refused_busy_not_unreachable():
    async def scenario(url):
        async with Clients(url) as clients:
            # Prepare: idle connections that fill the relay
            idle = [await clients.raw() for _ in range(4)]
            # Execute
            with pytest.raises(RelayRefused) as refusal:
                await clients.initiator()
            await bounded(idle[0].close())
            admitted = await clients.initiator()
            # Assert
            assert refusal.value.code == "busy"
            assert refusal.value.message.startswith(
                "relay busy: it serves its limit of 4 connections")
            assert admitted.welcome.kind == Kind.WELCOME

    # Prepare
    with running_relay(Relay(limits=RelayLimits(max_connections=4))) as embedded:
        run(scenario(embedded.url))


def test_a_participant_beyond_a_tasks_limit_is_refused_busy_saying_how_to_raise_it():
    async def scenario(url):
        async with Clients(url) as clients:
            initiator, (alice, bob) = await start_task(clients, "alice", "bob")
            # Execute
            with pytest.raises(RelayRefused) as refusal:
                await clients.participant("carol")
            # Assert
            assert refusal.value.code == "busy"
            assert refusal.value.message == (
                f"relay busy: task {TASK!r} already has 2 participants, its limit; a place "
                "frees when one leaves, or the relay's operator raises it (fedmagic relay "
                "--max-participants)")
            await assert_task_works(clients, initiator, bob, "bob")

    # Prepare
    with running_relay(Relay(limits=RelayLimits(max_participants=2))) as embedded:
        run(scenario(embedded.url))


@SECONDS_BY_DESIGN
def test_link_with_wait_asks_a_busy_relay_again_until_it_has_room():
    async def scenario(url):
        async with Clients(url) as clients:
            # Prepare
            idle = [await clients.raw() for _ in range(2)]
            joining = asyncio.ensure_future(clients.initiator(wait=8))
            await asyncio.sleep(0.5)
            assert not joining.done()
            # Execute
            await bounded(idle[0].close())
            initiator = await bounded(joining, 8)
            # Assert
            assert initiator.welcome.kind == Kind.WELCOME

    # Prepare
    with running_relay(Relay(limits=RelayLimits(max_connections=2))) as embedded:
        run(scenario(embedded.url))


def test_link_asks_again_when_the_relay_caps_its_wait_for_a_task_it_never_saw():
    async def scenario(url):
        async with Clients(url) as clients:
            # Prepare: the relay holds a join for an unknown task 0.3 s at a time
            joining = asyncio.ensure_future(clients.participant("alice", task="later", wait=8))
            await asyncio.sleep(1.2)
            assert not joining.done()
            # Execute
            initiator = await clients.initiator(task="later")
            alice = await bounded(joining)
            announced = await recv(initiator)
            # Assert
            assert (announced.kind, announced.header["from"]) == (Kind.PEER_JOINED, "alice")
            await assert_task_works(clients, initiator, alice, "alice")

    # Prepare
    with relay_log() as lines, \
            running_relay(Relay(limits=RelayLimits(max_unknown_task_wait=0.3))) as embedded:
        run(scenario(embedded.url))
    # Assert: the relay refused it meanwhile, and it asked again
    assert sum("did not start within 0.3 s" in line for line in lines) >= 2


def test_wait_for_a_task_that_ran_before_is_not_capped_like_an_unknown_one():
    async def scenario(url):
        async with Clients(url) as clients:
            # Prepare: task "again" ran and ended
            first = await clients.initiator(task="again")
            await bounded(first.close())
            waiting = await clients.raw()
            await bounded(waiting.send(hello(role="participant", node="alice", task="again",
                                             wait=60)))
            # Execute
            early = await reply_within(waiting, 0.8)
            await clients.initiator(task="again")
            welcome = await reply_within(waiting, 2)
            # Assert
            assert early is None  # held past the 0.3 s cap for unknown tasks
            assert welcome is not None and welcome.kind == Kind.WELCOME

    # Prepare
    with running_relay(Relay(limits=RelayLimits(max_unknown_task_wait=0.3))) as embedded:
        run(scenario(embedded.url))


# -- bytes and slow readers ----------------------------------------------------------------

@SECONDS_BY_DESIGN
def test_participant_flooding_junk_is_read_slower_and_anothers_frames_still_arrive_promptly():
    async def scenario(url):
        async with Clients(url) as clients:
            # Prepare
            initiator, (alice, bob) = await start_task(clients, "alice", "bob")
            junk = Frame({"t": Kind.STATUS, "junk": True}, b"\0" * MIB)
            latencies: list[float] = []
            received = {"junk": 0}

            async def flood(seconds: float) -> None:
                deadline = time.monotonic() + seconds
                while time.monotonic() < deadline:
                    await alice.send(junk)

            async def beat() -> None:
                for number in range(20):
                    await bob.send(status(beat=number, sent=time.monotonic()))
                    await asyncio.sleep(0.1)

            async def read() -> None:
                while len(latencies) < 20:
                    frame = await recv(initiator)
                    if frame.header.get("junk"):
                        received["junk"] += frame.payload_size
                    elif "beat" in frame.header:
                        latencies.append(time.monotonic() - frame.header["sent"])

            # Execute
            started = time.monotonic()
            await bounded(asyncio.gather(flood(2.0), beat(), read()), 15)
            elapsed = time.monotonic() - started
            # Assert
            assert len(latencies) == 20
            assert max(latencies) < 0.5
            # a burst of 8 MiB, then 8 MiB/s (and what the buffers held)
            assert received["junk"] <= (8 + 8 * elapsed + 8) * MIB
            await initiator.send(status(to=["bob"], ping=1))
            assert (await recv(bob)).header["ping"] == 1

    # Prepare
    limits = RelayLimits(max_bytes_per_second=8 * MIB, burst_bytes=8 * MIB)
    with relay_log() as lines, running_relay(Relay(limits=limits)) as embedded:
        run(scenario(embedded.url))
    # Assert
    throttled = [line for line in lines if line.startswith("throttling")]
    assert len(throttled) == 1
    assert "'alice'" in throttled[0] and "8 MiB per second" in throttled[0]


@SECONDS_BY_DESIGN
def test_participant_that_never_reads_does_not_stop_two_others_receiving_a_large_state():
    # Prepare
    state = {"big": torch.randn(16 * MIB // 4 * 4)}  # 64 MiB: more than any buffer holds

    async def scenario(url):
        async with Clients(url) as clients:
            initiator, (alice, bob, carol) = await start_task(clients, "alice", "bob", "carol")
            # carol's process froze: its link reads nothing from here on
            carol.connection.transport.pause_reading()
            readers = [asyncio.ensure_future(receive_state(link)) for link in (alice, bob)]
            # Execute
            started = time.monotonic()
            await bounded(initiator.send_state(state, to="*", round=1), 20)
            copies = await bounded(asyncio.gather(*readers), 20)
            elapsed = time.monotonic() - started
            left = await recv(initiator)
            carol.connection.transport.resume_reading()
            # Assert
            assert elapsed < 8  # the 1 s stall limit, and 64 MiB to two readers
            for copy in copies:
                assert torch.equal(copy["big"], state["big"])
            assert (left.kind, left.header["from"]) == (Kind.PEER_LEFT, "carol")
            await assert_task_works(clients, initiator, alice, "alice")

    limits = RelayLimits(max_send_stall=1.0, max_queue_bytes=2 * MIB)
    with relay_log() as lines, running_relay(Relay(limits=limits)) as embedded:
        run(scenario(embedded.url))
    # Assert
    dropped = [line for line in lines if line.startswith("dropping 'carol'")]
    assert len(dropped) == 1 and "too slow: it took nothing for 1 s" in dropped[0]


@SECONDS_BY_DESIGN
def test_initiator_that_never_reads_is_dropped_and_its_participants_told_the_task_closed():
    async def scenario(url):
        async with Clients(url) as clients:
            # Prepare
            initiator, (alice,) = await start_task(clients, "alice")
            initiator.connection.transport.pause_reading()  # its process froze
            junk = Frame({"t": Kind.STATUS}, b"\0" * MIB)

            async def upload() -> None:
                with contextlib.suppress(Exception):
                    for _ in range(64):  # more than every buffer on the way holds
                        await alice.send(junk)

            sending = asyncio.ensure_future(upload())
            # Execute
            closed = await recv(alice, timeout=10)
            initiator.connection.transport.resume_reading()
            await bounded(sending)
            # Assert
            assert closed.header == {"t": "task_closed", "task": "digits"}

    limits = RelayLimits(max_send_stall=1.0, max_queue_bytes=1 * MIB, close_timeout=0.5)
    with relay_log() as lines, running_relay(Relay(limits=limits)) as embedded:
        run(scenario(embedded.url))
    # Assert
    assert any(line.startswith("dropping the initiator of task 'digits'")
               and "too slow: it took nothing for 1 s" in line for line in lines)


@SECONDS_BY_DESIGN
def test_participant_that_reads_slowly_but_steadily_keeps_its_place():
    # Prepare
    state = {"big": torch.randn(6 * MIB // 4)}  # 6 MiB: 6 frames

    async def scenario(url):
        async with Clients(url) as clients:
            initiator, (alice, carol) = await start_task(clients, "alice", "carol")

            async def read_slowly() -> dict[str, torch.Tensor]:
                reader = StateReader()
                while True:
                    await asyncio.sleep(0.3)  # a frame every 0.3 s, never 1 s without one
                    frame = await recv(carol)
                    if frame.kind == Kind.STATE_END:
                        return reader.finish(frame)
                    reader.feed(frame)

            readers = [asyncio.ensure_future(receive_state(alice)),
                       asyncio.ensure_future(read_slowly())]
            # Execute
            await bounded(initiator.send_state(state, to="*", round=1), 10)
            copies = await bounded(asyncio.gather(*readers), 10)
            # Assert
            for copy in copies:
                assert torch.equal(copy["big"], state["big"])
            await assert_task_works(clients, initiator, carol, "carol")

    limits = RelayLimits(max_send_stall=1.0, max_queue_bytes=1 * MIB)
    with running_relay(Relay(limits=limits)) as embedded:
        run(scenario(embedded.url))


# -- a small open-file limit ---------------------------------------------------------------

FLOOD = 1100
ULIMIT = 1024


@contextlib.contextmanager
def open_files_for_this_test(count: int) -> Iterator[None]:
    """This process may hold ``count`` more sockets (the clients of a flood)."""
    soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    wanted = count + 256  # and the test run's own files
    if hard != resource.RLIM_INFINITY and hard < wanted:
        pytest.skip(f"the flood needs {wanted} open files; this process may have {hard}")
    resource.setrlimit(resource.RLIMIT_NOFILE, (max(soft, wanted), hard))
    try:
        yield
    finally:
        resource.setrlimit(resource.RLIMIT_NOFILE, (soft, hard))


async def open_raw(url: str, count: int, first: Any = None,
                   batch: int = 50) -> list[ClientConnection]:
    """``count`` websocket connections, opened ``batch`` at a time, each sending
    ``first(number)`` if given, as a flood from one machine would."""
    options: dict[str, Any] = {"compression": None, "proxy": None, "ping_interval": None,
                               "open_timeout": 10, "close_timeout": 2}
    connections: list[ClientConnection] = []
    for start in range(0, count, batch):
        opened = await asyncio.gather(
            *(connect(url, **options) for _ in range(min(batch, count - start))))
        if first is not None:
            await asyncio.gather(*(connection.send(first(start + number))
                                   for number, connection in enumerate(opened)))
        connections += opened
    return connections


async def close_all(connections: list[ClientConnection]) -> None:
    """Close every connection; cut those that do not finish closing in time."""
    with contextlib.suppress(asyncio.TimeoutError):
        await asyncio.wait_for(asyncio.gather(*(c.close() for c in connections),
                                              return_exceptions=True), 10)
    for connection in connections:
        connection.transport.abort()


@pytest.mark.slow
@pytest.mark.timeout(START_TIMEOUT + 90)  # the relay process's start, then 45 s of the flood
@pytest.mark.skipif(resource is None or shutil.which("bash") is None,
                    reason="needs bash's ulimit and Python's resource module")
def test_relay_under_ulimit_1024_runs_a_whole_task_through_a_flood_of_1100_waiting_joins(
        tmp_path: Path, monkeypatch: pytest.MonkeyPatch):
    # Prepare: a relay process that may open 1024 files, its waiting limits wide open
    monkeypatch.chdir(tmp_path)
    port = free_port()
    url = f"ws://127.0.0.1:{port}"
    cap = connection_cap(ULIMIT)
    waiting_cap = cap // 2
    log_path = tmp_path / "relay.log"
    with open(log_path, "w") as log_file:
        relay = subprocess.Popen(
            ["bash", "-c", f"ulimit -n {ULIMIT} && exec \"$0\" -m fedmagic relay --port {port} "
             "--max-waiting 100000 --max-waiting-per-address 100000", sys.executable],
            stdout=log_file, stderr=subprocess.STDOUT, env={**os.environ, "PYTHONUNBUFFERED": "1"})

    async def scenario() -> dict[str, Any]:
        opened: list[ClientConnection] = []
        links: list[Link] = []
        try:
            # Execute: the flood
            flood = await open_raw(url, FLOOD, lambda number: waiting_hello(f"ghost-{number}"))
            opened += flood
            replies = await asyncio.gather(*(reply_within(c, 3.0) for c in flood))
            # a real task, in the middle of it: three rounds of a Tiny task, start to finish
            initiator = await bounded(Link.open(url, role="initiator", task="real",
                                                token="join"))
            links.append(initiator)
            scheduler = Tiny(min_clients=1, max_clients=1, max_rounds=3)
            scheduler._setup("real")
            aggregator = Aggregator(scheduler, TaskPackage.from_scheduler(scheduler, "real"),
                                    initiator, checkpoint=Checkpoint(tmp_path / "models"),
                                    policy=RoundPolicy(join_timeout=20, join_grace=0),
                                    strategy=FedAvg(weighted=False))
            alice = await bounded(Link.open(url, role="participant", task="real",
                                            token="join", node="alice"))
            links.append(alice)
            task = asyncio.gather(aggregator.run(),
                                  ParticipantRuntime(alice, "alice", lambda _: True).run())
            # idle connections up to the cap, then one more
            in_use = replies.count(None) + len(links)
            idle = await open_raw(url, cap - in_use - 3)
            opened += idle
            over: Frame | None = None
            extras = 0
            while over is None and extras < 10:
                (extra,) = await open_raw(url, 1)
                opened.append(extra)
                extras += 1
                over = await reply_within(extra, 0.5)
            result, outcome = await asyncio.wait_for(task, 30)
            return {"replies": replies, "result": result, "outcome": outcome, "over": over,
                    "open": in_use + len(idle) + extras}
        finally:
            await asyncio.gather(*(link.close() for link in links), return_exceptions=True)
            await close_all(opened)

    try:
        # Started before the 45 s the scenario may take: a process start is no part of it
        deadline = time.monotonic() + START_TIMEOUT
        while "listening on" not in log_path.read_text():
            assert relay.poll() is None and time.monotonic() < deadline, log_path.read_text()
            time.sleep(0.05)
        with open_files_for_this_test(FLOOD + cap):
            outcome = asyncio.run(asyncio.wait_for(scenario(), 45))
    finally:
        relay.send_signal(signal.SIGINT)
        try:
            relay.wait(timeout=15)
        except subprocess.TimeoutExpired:
            relay.kill()
            relay.wait(timeout=5)
    log_text = log_path.read_text()
    # Assert
    assert f"at most {cap} connections, {waiting_cap} of them joins waiting" in log_text
    replies = outcome["replies"]
    refused = [reply for reply in replies if reply is not None]
    assert replies.count(None) == waiting_cap
    assert {reply.header["code"] for reply in refused} == {"busy"}
    assert all(reply.header["message"].startswith("relay busy: ") for reply in refused)
    assert [row["round"] for row in outcome["result"].history] == [1, 2, 3]
    assert outcome["outcome"].ok and outcome["outcome"].rounds == 3
    over = outcome["over"]
    assert over is not None, "no connection was refused at the cap"
    assert over.header["code"] == "busy"
    assert over.header["message"].startswith(f"relay busy: it serves its limit of {cap} "
                                             "connections")
    assert abs(outcome["open"] - (cap + 1)) <= 2  # the refused one was over the cap
    assert "Too many open files" not in log_text and "out of system resource" not in log_text
    assert relay.returncode == 0, log_text[-2000:]
    assert re.search(r"refused .*relay busy", log_text)
