"""One routing core: the in-memory relay and the websocket relay route alike.

Both drive ``fedmagic.wire.routing.Router``; each scenario here runs over both, so
what the fast in-memory tests exercise is the relay that runs.
"""

from __future__ import annotations

import asyncio
import contextlib
import functools
from typing import Any, AsyncIterator, Awaitable, Callable

import pytest

from fedmagic.errors import CodecError, ConnectionLost, RelayRefused
from fedmagic.wire.frames import INITIATOR, Frame, Kind
from fedmagic.wire.link import Link
from fedmagic.wire.memory import MemoryRelay
from fedmagic.wire.relay import EmbeddedRelay, Relay
from fedmagic.wire.routing import Refused, RelayLimits, Router, hello_header

TASK, TOKEN = "routing", "join-secret"
TIMEOUT = 30.0
Connect = Callable[..., Awaitable[Any]]
transports = pytest.mark.parametrize("transport", ["memory", "websocket"])


@contextlib.asynccontextmanager
async def a_relay(transport: str, limits: RelayLimits = RelayLimits()) -> AsyncIterator[Connect]:
    if transport == "memory":
        yield MemoryRelay(limits).open
        return
    with EmbeddedRelay("127.0.0.1", 0, Relay(limits=limits)) as relay:
        yield functools.partial(Link.open, relay.url)


def run(scenario: Any) -> Any:
    return asyncio.run(asyncio.wait_for(scenario, TIMEOUT))


async def initiator(connect: Connect, **fields: Any) -> Any:
    return await connect(role="initiator", task=TASK, token=TOKEN, **fields)


async def participant(connect: Connect, node: str, **fields: Any) -> Any:
    return await connect(role="participant", task=TASK, token=TOKEN, node=node, **fields)


async def refusal(opening: Awaitable[Any]) -> tuple[str, str]:
    with pytest.raises(RelayRefused) as refused:
        await opening
    return refused.value.code, refused.value.message


@transports
def test_each_frame_reaches_whom_it_names_stamped_with_its_sender(transport):
    async def scenario():
        async with a_relay(transport) as connect:
            boss = await initiator(connect)
            alice, bob = await participant(connect, "alice"), await participant(connect, "bob")
            assert [(await boss.recv()).header for _ in "ab"] == [
                {"t": Kind.PEER_JOINED, "from": "alice"},
                {"t": Kind.PEER_JOINED, "from": "bob"},
            ]
            await boss.send(Frame({"t": "status", "to": ["bob"], "n": 1}))
            await boss.send(Frame({"t": "status", "to": "*", "n": 2}, b"payload"))
            assert (await bob.recv()).header == {"t": "status", "n": 1, "from": INITIATOR}
            for party in (alice, bob):
                frame = await party.recv()
                assert (frame.header["n"], frame.payload) == (2, b"payload")
            await alice.send(Frame({"t": "status", "from": "bob", "n": 3}))  # a forged sender
            await alice.send(Frame({"t": "status", "to": ["bob", INITIATOR, "gone"], "n": 4}))
            assert [(await boss.recv()).header for _ in "ab"] == [
                {"t": "status", "n": 3, "from": "alice"},
                {"t": "status", "n": 4, "from": "alice"},
            ]
            assert (await bob.recv()).header == {"t": "status", "n": 4, "from": "alice"}
            for link in (alice, bob, boss):
                await link.close()

    run(scenario())


@transports
def test_a_node_coming_back_with_its_session_replaces_its_stale_connection(transport):
    async def scenario():
        async with a_relay(transport) as connect:
            boss = await initiator(connect)
            first = await participant(connect, "alice")
            assert first.session and boss.session is None
            again = await first.reopen(5, accepted="ab12")
            assert again.session == first.session
            assert [(await boss.recv()).header for _ in "abc"] == [
                {"t": Kind.PEER_JOINED, "from": "alice"},
                {"t": Kind.PEER_LEFT, "from": "alice"},
                {"t": Kind.PEER_JOINED, "from": "alice", "accepted": "ab12"},
            ]
            with pytest.raises(ConnectionLost):
                while True:
                    await first.recv()
            await boss.close()
            assert (await again.recv()).header == {"t": Kind.TASK_CLOSED, "task": TASK}
            with pytest.raises(ConnectionLost):
                await again.recv()

    run(scenario())


def test_both_relays_refuse_the_same_hellos_with_the_same_words():
    """Refusals come from the one router, so a test in memory reads what a real node hears."""

    async def refusals(transport: str) -> list[tuple[str, str]]:
        async with a_relay(transport, RelayLimits(max_participants=2)) as connect:
            boss = await initiator(connect, allowed_nodes=["alice", "bob"])
            alice = await participant(connect, "alice")
            full = await connect(role="initiator", task="full", token=TOKEN)
            seated = [await connect(role="participant", task="full", token=TOKEN, node=name)
                      for name in ("a", "b")]
            heard = [
                await refusal(initiator(connect)),
                await refusal(connect(role="participant", task=TASK, token="x", node="bob")),
                await refusal(participant(connect, "mallory")),
                await refusal(participant(connect, "alice")),
                await refusal(connect(role="participant", task="full", token=TOKEN, node="c")),
                await refusal(participant(connect, "@initiator")),
                await refusal(connect(role="participant", task="other", token=TOKEN, node="a")),
            ]
            for link in (alice, boss, *seated, full):
                await link.close()
            return heard

    in_memory, over_websockets = run(refusals("memory")), run(refusals("websocket"))
    assert in_memory == over_websockets
    assert [code for code, _ in in_memory] == [
        "task_exists", "join_token", "node_not_allowed", "node_taken", "busy", "protocol",
        "unknown_task",
    ]


@transports
def test_a_frame_only_the_relay_may_send_costs_its_sender_the_connection(transport):
    async def scenario():
        async with a_relay(transport) as connect:
            boss = await initiator(connect)
            alice = await participant(connect, "alice")
            await alice.send(Frame({"t": Kind.PEER_LEFT, "from": "bob"}))
            with pytest.raises(RelayRefused, match="come from the relay only"):
                await alice.recv()
            assert [(await boss.recv()).header for _ in "ab"] == [
                {"t": Kind.PEER_JOINED, "from": "alice"},
                {"t": Kind.PEER_LEFT, "from": "alice"},
            ]
            await boss.close()

    run(scenario())


class Party:
    def __init__(self, name: str, session: str | None = None) -> None:
        self.name, self.session = name, session


def test_the_router_alone_routes_without_any_io():
    router: Router[Party] = Router()
    boss = Party(INITIATOR)
    said = router.read_hello(Frame(hello_header(role="initiator", task=TASK, token=TOKEN))
                             .serialize())
    router.admit_initiator(said)
    task, [(welcomed, welcome)] = router.open_task(said, boss)
    assert welcomed is boss and welcome.kind == Kind.WELCOME
    joined = {}
    for name in ("alice", "bob"):
        session = router.admit_participant(task, {"token": TOKEN, "node": name})
        joined[name] = Party(name, session)
        stale, sends = router.join(task, joined[name], session, {})
        assert stale is None
        assert [(party.name, frame.kind) for party, frame in sends] == [
            (name, Kind.WELCOME), (INITIATOR, Kind.PEER_JOINED)]
    alice, bob = joined["alice"], joined["bob"]

    frame, targets = router.route(task, alice, Frame({"t": "status"}).serialize())
    assert frame.header["from"] == "alice" and targets == [boss]
    _, targets = router.route(task, boss, Frame({"t": "x", "to": "*"}).serialize())
    assert targets == [alice, bob]
    _, targets = router.route(task, bob, Frame({"t": "x", "to": ["alice", "gone"]}).serialize())
    assert targets == [alice]
    with pytest.raises(CodecError, match="'to': a list of node names or '\\*'"):
        router.route(task, boss, Frame({"t": "x"}).serialize())
    with pytest.raises(Refused, match="the relay only"):
        router.route(task, bob, Frame({"t": Kind.WELCOME}).serialize())

    assert [frame.header for _, frame in router.leave(task, alice)] == [
        {"t": Kind.PEER_LEFT, "from": "alice"}]
    assert router.leave(task, alice) == []  # told once
    assert [(party.name, frame.kind) for party, frame in router.close_task(task)] == [
        ("bob", Kind.TASK_CLOSED)]
    assert router.tasks == {}
