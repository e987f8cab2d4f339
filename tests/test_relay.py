"""The relay's contract, against a real relay on 127.0.0.1 and real clients.

Friendly clients go through ``Link``; hostile ones speak raw websockets. Every
await on the network is bounded, so a broken relay fails a test instead of
hanging it.
"""

from __future__ import annotations

import asyncio
import contextlib
import errno
import shutil
import signal
import socket
import ssl
import subprocess
import sys
import threading
import time
from typing import Any, Iterator

import pytest
import torch
from websockets.asyncio.client import ClientConnection, connect
from websockets.asyncio.server import serve

from fedmagic.wire.codec import PROTOCOL_VERSION, Frame, Kind, StateReader, encode_state
from fedmagic.errors import ConnectionLost, RelayRefused
from conftest import free_port
from fedmagic.wire import link as link_module
from fedmagic.wire.link import Link
from fedmagic.wire.relay import EmbeddedRelay, Relay, RelayLimits, serve_relay, ssl_context

TASK = "digits"
JOIN = "join-secret"
RELAY_TOKEN = "relay-secret"
INITIATOR = "@initiator"
TIMEOUT = 5.0
POLICY_VIOLATION = 1008
MESSAGE_TOO_BIG = 1009
GOING_AWAY = 1001

pytestmark = pytest.mark.timeout(30)


# -- helpers -------------------------------------------------------------------------------

def bounded(awaitable: Any, timeout: float = TIMEOUT) -> Any:
    return asyncio.wait_for(awaitable, timeout)


def run(scenario: Any) -> Any:
    """Run one scenario on a fresh event loop, bounded as a whole."""
    return asyncio.run(asyncio.wait_for(scenario, 15))


@contextlib.contextmanager
def running_relay(relay: Relay | None = None) -> Iterator[EmbeddedRelay]:
    with EmbeddedRelay("127.0.0.1", 0, relay or Relay()) as embedded:
        yield embedded


@pytest.fixture
def relay() -> Iterator[EmbeddedRelay]:
    """A relay without a relay token, on a free port."""
    with running_relay() as embedded:
        yield embedded


def status(**fields: Any) -> Frame:
    return Frame({"t": Kind.STATUS, **fields})


def relay_threads() -> list[threading.Thread]:
    return [thread for thread in threading.enumerate() if thread.name == "fedmagic-relay"]


class Clients:
    """The clients of one scenario, all closed when it ends."""

    def __init__(self, url: str, ssl: ssl.SSLContext | None = None) -> None:
        self.url = url
        self.ssl = ssl
        self.links: list[Link] = []
        self.raws: list[ClientConnection] = []

    async def __aenter__(self) -> Clients:
        return self

    async def __aexit__(self, *exc_info: object) -> None:
        closing = [link.close() for link in self.links] + [raw.close() for raw in self.raws]
        await bounded(asyncio.gather(*closing, return_exceptions=True))

    async def initiator(self, task: str = TASK, token: str = JOIN, **options: Any) -> Link:
        link = await bounded(Link.open(self.url, role="initiator", task=task, token=token,
                                       ssl=self.ssl, **options))
        self.links.append(link)
        return link

    async def participant(self, node: str, task: str = TASK, token: str = JOIN,
                          **options: Any) -> Link:
        link = await bounded(Link.open(self.url, role="participant", task=task, token=token,
                                       node=node, ssl=self.ssl, **options))
        self.links.append(link)
        return link

    async def join(self, initiator: Link, *nodes: str, task: str = TASK) -> list[Link]:
        """Participants that joined, each announced to the initiator."""
        links = []
        for node in nodes:
            links.append(await self.participant(node, task=task))
            announced = await recv(initiator)
            assert (announced.kind, announced.header.get("from")) == (Kind.PEER_JOINED, node)
        return links

    async def raw(self) -> ClientConnection:
        connection = await bounded(connect(self.url, compression=None, proxy=None,
                                           open_timeout=TIMEOUT, close_timeout=TIMEOUT))
        self.raws.append(connection)
        return connection


async def recv(link: Link, timeout: float = TIMEOUT) -> Frame:
    return await bounded(link.recv(), timeout)


async def receive_state(link: Link) -> dict[str, torch.Tensor]:
    """A whole state dict, read frame by frame."""
    reader = StateReader()
    while True:
        frame = await recv(link)
        if frame.kind == Kind.STATE_END:
            return reader.finish(frame)
        reader.feed(frame)


async def refused(connection: ClientConnection, message: Any) -> tuple[Frame, int | None]:
    """Send one message; return the relay's reply and the close code that followed."""
    await bounded(connection.send(message))
    reply = Frame.parse(await bounded(connection.recv()))
    await bounded(connection.wait_closed())
    return reply, connection.close_code


async def drain_until_closed(link: Link) -> list[Frame]:
    """Every frame the link still receives before its connection closes."""
    frames = []
    with pytest.raises(ConnectionLost):
        while True:
            frames.append(await recv(link))
    return frames


def hello(**fields: Any) -> bytes:
    header = {"t": Kind.HELLO, "protocol": PROTOCOL_VERSION, "role": "initiator",
              "task": "hostile", "token": JOIN, **fields}
    return Frame({key: value for key, value in header.items() if value is not None}).serialize()


async def assert_task_works(clients: Clients, initiator: Link, participant: Link,
                            node: str) -> None:
    """A frame goes each way between an initiator and one of its participants."""
    await initiator.send(status(to=[node], ping=1))
    down = await recv(participant)
    await participant.send(status(pong=1))
    up = await recv(initiator)
    assert (down.header["ping"], down.header["from"]) == (1, INITIATOR)
    assert (up.header["pong"], up.header["from"]) == (1, node)


# -- joining and forwarding ---------------------------------------------------------------

def test_initiator_hears_peer_joined_when_participant_joins_with_join_token(relay):
    async def scenario():
        async with Clients(relay.url) as clients:
            # Prepare
            initiator = await clients.initiator()
            # Execute
            participant = await clients.participant("alice")
            announced = await recv(initiator)
            # Assert
            assert initiator.welcome.kind == Kind.WELCOME
            assert participant.welcome.header["node"] == "alice"
            assert announced.kind == Kind.PEER_JOINED
            assert announced.header["from"] == "alice"
    run(scenario())


def test_frames_flow_both_ways_stamped_with_their_sender(relay):
    async def scenario():
        async with Clients(relay.url) as clients:
            # Prepare
            initiator = await clients.initiator()
            (alice,) = await clients.join(initiator, "alice")
            # Execute
            await initiator.send(status(to=["alice"], step="down"))
            down = await recv(alice)
            await alice.send(status(step="up"))
            up = await recv(initiator)
            # Assert
            assert down.header == {"t": "status", "step": "down", "from": INITIATOR}
            assert up.header == {"t": "status", "step": "up", "from": "alice"}
    run(scenario())


def test_relay_overwrites_forged_from_so_nobody_can_impersonate(relay):
    async def scenario():
        async with Clients(relay.url) as clients:
            # Prepare
            initiator = await clients.initiator()
            alice, bob = await clients.join(initiator, "alice", "bob")
            # Execute
            await alice.send(status(forged=True, **{"from": "bob", "to": [INITIATOR]}))
            from_alice = await recv(initiator)
            await initiator.send(status(forged=True, **{"from": "alice", "to": ["bob"]}))
            from_initiator = await recv(bob)
            # Assert
            assert from_alice.header["from"] == "alice"
            assert "to" not in from_alice.header
            assert from_initiator.header["from"] == INITIATOR
            assert "to" not in from_initiator.header
    run(scenario())


def test_a_participant_reaches_the_peers_it_names_under_its_own_name(relay):
    # What a round's elected aggregator needs (is_centralized=False); without "to", the initiator
    async def scenario():
        async with Clients(relay.url) as clients:
            # Prepare
            initiator = await clients.initiator()
            alice, bob, carol = await clients.join(initiator, "alice", "bob", "carol")
            # Execute
            await alice.send(status(note="for bob", to=["bob", "nobody"]))
            await alice.send(status(note="for both", to=[INITIATOR, "bob"]))
            await alice.send(status(note="for the initiator"))
            await initiator.send(status(note="marker", to="*"))
            at_bob = [await recv(bob) for _ in range(3)]
            at_initiator = [await recv(initiator) for _ in range(2)]
            first_at_carol = await recv(carol)
            # Assert
            assert [(f.header["note"], f.header["from"]) for f in at_bob] == [
                ("for bob", "alice"), ("for both", "alice"), ("marker", INITIATOR)]
            assert [f.header["note"] for f in at_initiator] == ["for both", "for the initiator"]
            assert first_at_carol.header["note"] == "marker"
    run(scenario())


def test_a_participant_frame_with_a_to_that_is_no_list_of_names_is_refused(relay):
    async def scenario():
        async with Clients(relay.url) as clients:
            initiator = await clients.initiator()
            (alice,) = await clients.join(initiator, "alice")
            await alice.send(status(note="?", to="*"))
            with pytest.raises(Exception) as closed:
                for _ in range(5):
                    await recv(alice)
            assert "a participant's 'to' must be a list of node names" in str(closed.value)
    run(scenario())


def test_frame_to_one_node_reaches_only_that_node(relay):
    async def scenario():
        async with Clients(relay.url) as clients:
            # Prepare
            initiator = await clients.initiator()
            alice, bob, carol = await clients.join(initiator, "alice", "bob", "carol")
            # Execute
            await initiator.send(status(note="for bob", to=["bob"]))
            await initiator.send(status(note="for all", to="*"))
            # Assert: frames from one sender arrive in order, so the others' first
            # frame being "for all" proves "for bob" never reached them
            assert [(await recv(bob)).header["note"] for _ in range(2)] == [
                "for bob", "for all"]
            assert (await recv(alice)).header["note"] == "for all"
            assert (await recv(carol)).header["note"] == "for all"
    run(scenario())


def test_frame_to_star_reaches_every_participant(relay):
    async def scenario():
        async with Clients(relay.url) as clients:
            # Prepare
            initiator = await clients.initiator()
            participants = await clients.join(initiator, "alice", "bob", "carol")
            # Execute
            await initiator.send(status(note="everyone", to="*"))
            received = await bounded(asyncio.gather(*(recv(p) for p in participants)))
            # Assert
            assert [frame.header for frame in received] == [
                {"t": "status", "note": "everyone", "from": INITIATOR}] * 3
    run(scenario())


def test_large_state_fans_out_intact_to_three_participants(relay):
    # Prepare
    generator = torch.Generator().manual_seed(0)
    state = {
        "big": torch.randn(2_500_000, generator=generator),  # 10 MB, cut across frames
        "bias": torch.randn(7, generator=generator, dtype=torch.float64),
        "steps": torch.tensor(42),
    }
    assert sum(frame.kind == Kind.STATE for frame in encode_state(state)) >= 3

    async def scenario():
        async with Clients(relay.url) as clients:
            initiator = await clients.initiator()
            participants = await clients.join(initiator, "alice", "bob", "carol")
            # Execute
            readers = [asyncio.ensure_future(receive_state(p)) for p in participants]
            await bounded(initiator.send_state(state, to="*", round=1))
            return await bounded(asyncio.gather(*readers))

    received = run(scenario())
    # Assert
    for copy in received:
        assert copy.keys() == state.keys()
        for name, tensor in state.items():
            assert copy[name].dtype == tensor.dtype
            assert torch.equal(copy[name], tensor)


def test_tasks_with_the_same_node_names_are_isolated(relay):
    async def scenario():
        async with Clients(relay.url) as clients:
            # Prepare
            first = await clients.initiator(task="first")
            second = await clients.initiator(task="second", token="other-join")
            (alice_1,) = await clients.join(first, "alice", task="first")
            alice_2 = await clients.participant("alice", task="second", token="other-join")
            assert (await recv(second)).kind == Kind.PEER_JOINED
            # Execute
            await first.send(status(note="first", to="*"))
            await second.send(status(note="second", to=["alice"]))
            got_1, got_2 = await recv(alice_1), await recv(alice_2)
            await alice_1.send(status(note="up first"))
            await alice_2.send(status(note="up second"))
            up_1, up_2 = await recv(first), await recv(second)
            await first.send(status(note="end", to="*"))
            await alice_1.send(status(note="end"))
            # Assert: each side's next frame is its own task's marker, nothing leaked
            assert (got_1.header["note"], got_2.header["note"]) == ("first", "second")
            assert (up_1.header["note"], up_2.header["note"]) == ("up first", "up second")
            assert (await recv(alice_1)).header["note"] == "end"
            assert (await recv(first)).header["note"] == "end"
    run(scenario())


# -- who may join ------------------------------------------------------------------------

def test_wrong_join_token_is_refused_with_what_to_do(relay):
    async def scenario():
        async with Clients(relay.url) as clients:
            # Prepare
            await clients.initiator()
            # Execute
            with pytest.raises(RelayRefused) as refusal:
                await clients.participant("alice", token="guess")
            return refusal.value

    refusal = run(scenario())
    # Assert
    assert refusal.code == "join_token"
    assert TASK in refusal.message and "join line" in refusal.message


@pytest.mark.parametrize("relay_token", [None, "wrong"], ids=["missing", "wrong"])
def test_initiator_without_the_relay_token_is_refused(relay_token):
    async def scenario(url):
        async with Clients(url) as clients:
            # Execute
            with pytest.raises(RelayRefused) as refusal:
                await clients.initiator(relay_token=relay_token)
            admitted = await clients.initiator(relay_token=RELAY_TOKEN)
            return refusal.value, admitted

    # Prepare
    with running_relay(Relay(token=RELAY_TOKEN)) as embedded:
        refusal, admitted = run(scenario(embedded.url))
    # Assert
    assert refusal.code == "relay_token"
    assert "FEDMAGIC_RELAY_TOKEN" in refusal.message
    assert admitted.welcome.kind == Kind.WELCOME


def test_second_initiator_for_a_running_task_is_refused(relay):
    async def scenario():
        async with Clients(relay.url) as clients:
            # Prepare
            first = await clients.initiator()
            (alice,) = await clients.join(first, "alice")
            # Execute
            with pytest.raises(RelayRefused) as refusal:
                await clients.initiator(token="hijack")
            # Assert
            assert refusal.value.code == "task_exists"
            assert "pick another task id" in refusal.value.message
            await assert_task_works(clients, first, alice, "alice")
    run(scenario())


@pytest.mark.parametrize("session", [None, "0123abcd"], ids=["no_session", "wrong_session"])
def test_name_in_use_is_refused_without_that_nodes_session(relay, session):
    async def scenario():
        async with Clients(relay.url) as clients:
            # Prepare
            initiator = await clients.initiator()
            (alice,) = await clients.join(initiator, "alice")
            # Execute
            with pytest.raises(RelayRefused) as refusal:
                await clients.participant("alice", session=session)
            # Assert
            assert refusal.value.code == "node_taken"
            assert "in use by a connected node" in refusal.value.message
            assert "pick another --node name" in refusal.value.message
            assert "restarting, present its session" in refusal.value.message
            await assert_task_works(clients, initiator, alice, "alice")
    run(scenario())


def test_participant_gets_a_session_in_its_welcome_and_an_initiator_none(relay):
    async def scenario():
        async with Clients(relay.url) as clients:
            # Execute
            initiator = await clients.initiator()
            alice, bob = await clients.join(initiator, "alice", "bob")
            # Assert
            assert initiator.session is None
            assert alice.session and bob.session and alice.session != bob.session
            assert int(alice.session, 16) >= 0  # hex
            assert alice.welcome.header["session"] == alice.session
    run(scenario())


def test_reconnect_with_its_session_replaces_the_stale_connection_at_once(relay):
    async def scenario():
        async with Clients(relay.url) as clients:
            # Prepare: alice's process froze; its connection is still open at the relay
            initiator = await clients.initiator()
            stale, bob = await clients.join(initiator, "alice", "bob")
            # Execute
            started = time.monotonic()
            fresh = await clients.participant("alice", session=stale.session)
            elapsed = time.monotonic() - started
            left, joined = await recv(initiator), await recv(initiator)
            stale_frames = await drain_until_closed(stale)
            # Assert
            assert elapsed < 1
            assert fresh.session == stale.session
            assert (left.kind, left.header["from"]) == (Kind.PEER_LEFT, "alice")
            assert (joined.kind, joined.header["from"]) == (Kind.PEER_JOINED, "alice")
            assert stale_frames == []
            assert "replaced by a reconnect of the same node" in stale.connection.close_reason
            await assert_task_works(clients, initiator, fresh, "alice")
            await assert_task_works(clients, initiator, bob, "bob")
    run(scenario())


def test_session_presented_for_a_free_name_is_adopted_so_it_survives_a_relay_restart():
    # Prepare: alice joined a relay that then restarted
    async def first(url):
        async with Clients(url) as clients:
            initiator = await clients.initiator()
            (alice,) = await clients.join(initiator, "alice")
            return alice.session

    with running_relay() as embedded:
        session = run(first(embedded.url))

    async def second(url):
        async with Clients(url) as clients:
            initiator = await clients.initiator()
            # Execute
            alice = await clients.participant("alice", session=session)
            assert (await recv(initiator)).kind == Kind.PEER_JOINED
            with pytest.raises(RelayRefused) as impostor:
                await clients.participant("alice")
            again = await clients.participant("alice", session=session)
            left, joined = await recv(initiator), await recv(initiator)
            # Assert
            assert alice.session == session
            assert impostor.value.code == "node_taken"
            assert again.session == session
            assert [left.kind, joined.kind] == [Kind.PEER_LEFT, Kind.PEER_JOINED]
            await assert_task_works(clients, initiator, again, "alice")

    with running_relay() as embedded:
        run(second(embedded.url))


def test_name_the_initiator_did_not_allow_is_refused_naming_the_task(relay):
    async def scenario():
        async with Clients(relay.url) as clients:
            # Prepare
            initiator = await clients.initiator(allowed_nodes=["alice", "bob"])
            # Execute
            with pytest.raises(RelayRefused) as refusal:
                await clients.participant("mallory")
            # Assert
            assert refusal.value.code == "node_not_allowed"
            assert f"task {TASK!r}" in refusal.value.message
            assert "'mallory'" in refusal.value.message
            assert "ask the task's author" in refusal.value.message
            (alice,) = await clients.join(initiator, "alice")
            await assert_task_works(clients, initiator, alice, "alice")
    run(scenario())


def test_names_the_initiator_allowed_are_admitted(relay):
    async def scenario():
        async with Clients(relay.url) as clients:
            # Prepare
            initiator = await clients.initiator(allowed_nodes=["alice", "bob"])
            # Execute
            alice, bob = await clients.join(initiator, "alice", "bob")
            # Assert
            await assert_task_works(clients, initiator, alice, "alice")
            await assert_task_works(clients, initiator, bob, "bob")
    run(scenario())


def test_waiting_participant_the_initiator_did_not_allow_is_refused_once_the_task_appears(
        relay):
    async def scenario():
        async with Clients(relay.url) as clients:
            # Prepare
            joining = asyncio.ensure_future(clients.participant("mallory", wait=4))
            await asyncio.sleep(0.3)
            # Execute
            await clients.initiator(allowed_nodes=["alice"])
            with pytest.raises(RelayRefused) as refusal:
                await bounded(joining)
            # Assert
            assert refusal.value.code == "node_not_allowed"
    run(scenario())


def test_unknown_task_without_waiting_is_refused_at_once(relay):
    async def scenario():
        async with Clients(relay.url) as clients:
            # Execute
            started = time.monotonic()
            with pytest.raises(RelayRefused) as refusal:
                await clients.participant("alice", task="nope")
            return refusal.value, time.monotonic() - started

    refusal, elapsed = run(scenario())
    # Assert
    assert refusal.code == "unknown_task"
    assert "'nope'" in refusal.message and "check the task id" in refusal.message
    assert elapsed < 1


def test_waiting_participant_is_admitted_once_the_task_starts(relay):
    async def scenario():
        async with Clients(relay.url) as clients:
            # Prepare
            joining = asyncio.ensure_future(clients.participant("alice", wait=4))
            await asyncio.sleep(0.3)
            assert not joining.done()
            # Execute
            initiator = await clients.initiator()
            alice = await bounded(joining)
            announced = await recv(initiator)
            # Assert
            assert alice.welcome.kind == Kind.WELCOME
            assert (announced.kind, announced.header["from"]) == (Kind.PEER_JOINED, "alice")
            await assert_task_works(clients, initiator, alice, "alice")
    run(scenario())


def test_waiting_participant_with_wrong_token_is_refused_once_the_task_appears(relay):
    async def scenario():
        async with Clients(relay.url) as clients:
            # Prepare
            joining = asyncio.ensure_future(clients.participant("alice", token="guess", wait=4))
            await asyncio.sleep(0.3)
            assert not joining.done()
            # Execute
            await clients.initiator()
            with pytest.raises(RelayRefused) as refusal:
                await bounded(joining)
            # Assert
            assert refusal.value.code == "join_token"
    run(scenario())


def test_wait_for_a_task_that_never_starts_is_refused_in_time(relay):
    async def scenario():
        async with Clients(relay.url) as clients:
            # Execute
            started = time.monotonic()
            with pytest.raises(RelayRefused) as refusal:
                await clients.participant("alice", task="never", wait=0.5)
            return refusal.value, time.monotonic() - started

    refusal, elapsed = run(scenario())
    # Assert
    assert refusal.code == "unknown_task"
    assert "did not start within" in refusal.message
    assert 0.4 < elapsed < 2
    assert not relay.relay._waiting, "the relay still remembers a task nobody waits for"


def test_relay_caps_a_participants_wait_at_max_join_wait():
    # A raw hello: a Link would ask again until its own wait is over.
    async def scenario(url):
        async with Clients(url) as clients:
            waiting = await clients.raw()
            # Execute
            started = time.monotonic()
            reply, _ = await refused(waiting, hello(role="participant", node="alice",
                                                    task="never", wait=60))
            return reply.header, time.monotonic() - started

    # Prepare
    with running_relay(Relay(limits=RelayLimits(max_join_wait=0.3))) as embedded:
        reply, elapsed = run(scenario(embedded.url))
    # Assert
    assert reply["code"] == "unknown_task"
    assert "within 0.3 s" in reply["message"]
    assert elapsed < 2


# -- hostile clients ---------------------------------------------------------------------

HOSTILE_FIRST_MESSAGES = {
    "other_protocol_version": (hello(protocol=PROTOCOL_VERSION + 98), "protocol"),
    "first_frame_not_a_hello": (status(hi=1).serialize(), "protocol"),
    "text_message": ('{"t": "hello"}', "malformed"),
    "garbage_bytes": (b"\x00\x00\x00\x09\xc1garbage\xff\xfe", "malformed"),
    "short_garbage": (b"\x01", "malformed"),
    "hello_without_token": (hello(token=None), "protocol"),
    "hello_without_role": (hello(role=None), "protocol"),
    "participant_without_node": (hello(role="participant"), "protocol"),
    "wait_not_a_number": (hello(role="participant", node="x", wait="soon"), "protocol"),
    "session_not_hex": (hello(role="participant", node="x", session="not hex!"), "protocol"),
    "session_not_a_string": (hello(role="participant", node="x", session=7), "protocol"),
    "allowed_nodes_not_a_list": (hello(allowed_nodes="alice"), "protocol"),
    "allowed_nodes_with_a_bad_name": (hello(allowed_nodes=["alice", "@initiator"]), "protocol"),
}


@pytest.mark.parametrize("message, code", HOSTILE_FIRST_MESSAGES.values(),
                         ids=HOSTILE_FIRST_MESSAGES.keys())
def test_hostile_first_message_is_refused_and_relay_keeps_serving(relay, message, code):
    async def scenario():
        async with Clients(relay.url) as clients:
            # Prepare
            initiator = await clients.initiator()
            (alice,) = await clients.join(initiator, "alice")
            hostile = await clients.raw()
            # Execute
            reply, close_code = await refused(hostile, message)
            # Assert
            assert reply.kind == Kind.ERROR
            assert reply.header["code"] == code
            assert reply.header["message"]
            assert close_code == POLICY_VIOLATION
            await assert_task_works(clients, initiator, alice, "alice")
            other = await clients.initiator(task="another")
            (bob,) = await clients.join(other, "bob", task="another")
            await assert_task_works(clients, other, bob, "bob")
    run(scenario())


def test_other_protocol_version_is_refused_naming_both_versions(relay):
    async def scenario():
        async with Clients(relay.url) as clients:
            hostile = await clients.raw()
            # Execute
            return await refused(hostile, hello(protocol=99))

    reply, close_code = run(scenario())
    # Assert
    assert reply.header["code"] == "protocol"
    assert f"protocol {PROTOCOL_VERSION}" in reply.header["message"]
    assert "99" in reply.header["message"]
    assert "install the same fedmagic version" in reply.header["message"]
    assert close_code == POLICY_VIOLATION


def test_client_that_never_says_hello_is_refused_after_hello_timeout():
    async def scenario(url):
        async with Clients(url) as clients:
            silent = await clients.raw()
            # Execute
            reply = Frame.parse(await bounded(silent.recv()))
            await bounded(silent.wait_closed())
            return reply, silent.close_code

    # Prepare
    with running_relay(Relay(limits=RelayLimits(hello_timeout=0.3))) as embedded:
        reply, close_code = run(scenario(embedded.url))
    # Assert
    assert reply.header["code"] == "timeout"
    assert close_code == POLICY_VIOLATION


def test_refusal_naming_a_long_non_ascii_task_still_closes_cleanly(relay):
    async def scenario():
        async with Clients(relay.url) as clients:
            # Prepare
            task = "é" * 200
            await clients.initiator(task=task)
            hostile = await clients.raw()
            # Execute
            return await refused(hostile, hello(task=task))

    reply, close_code = run(scenario())
    # Assert: the close reason is cut to fit a control frame, not the handler crashing
    assert reply.header["code"] == "task_exists"
    assert close_code == POLICY_VIOLATION


def test_frame_over_max_frame_bytes_closes_only_that_connection():
    async def scenario(url):
        async with Clients(url) as clients:
            # Prepare
            initiator = await clients.initiator()
            alice, bob = await clients.join(initiator, "alice", "bob")
            # Execute
            await alice.send(Frame({"t": Kind.STATE}, b"\0" * (128 << 10)))
            await bounded(alice.connection.wait_closed())
            left = await recv(initiator)
            # Assert
            assert alice.connection.close_code == MESSAGE_TOO_BIG
            assert (left.kind, left.header["from"]) == (Kind.PEER_LEFT, "alice")
            await assert_task_works(clients, initiator, bob, "bob")
            (carol,) = await clients.join(initiator, "carol")
            await assert_task_works(clients, initiator, carol, "carol")

    # Prepare
    with running_relay(Relay(limits=RelayLimits(max_frame_bytes=64 << 10))) as embedded:
        run(scenario(embedded.url))


def test_client_over_the_rate_limit_is_disconnected_with_code_rate():
    async def scenario(url):
        async with Clients(url) as clients:
            # Prepare
            initiator = await clients.initiator()
            alice, bob = await clients.join(initiator, "alice", "bob")
            # Execute
            with contextlib.suppress(ConnectionLost):
                for number in range(200):
                    await alice.send(status(number=number))
            with pytest.raises(RelayRefused) as refusal:
                while True:
                    await recv(alice)
            forwarded = []
            while (frame := await recv(initiator)).kind == Kind.STATUS:
                forwarded.append(frame.header["number"])
            # Assert
            assert refusal.value.code == "rate"
            assert "20 frames per second" in refusal.value.message
            assert (frame.kind, frame.header["from"]) == (Kind.PEER_LEFT, "alice")
            assert forwarded == list(range(len(forwarded)))
            assert 20 <= len(forwarded) < 40
            await assert_task_works(clients, initiator, bob, "bob")

    # Prepare
    with running_relay(Relay(limits=RelayLimits(max_frames_per_second=20))) as embedded:
        run(scenario(embedded.url))


def test_client_within_the_rate_limit_keeps_its_connection():
    async def scenario(url):
        async with Clients(url) as clients:
            # Prepare
            initiator = await clients.initiator()
            (alice,) = await clients.join(initiator, "alice")
            # Execute
            for number in range(15):
                await alice.send(status(number=number))
            forwarded = [(await recv(initiator)).header["number"] for _ in range(15)]
            # Assert
            assert forwarded == list(range(15))
            await assert_task_works(clients, initiator, alice, "alice")

    # Prepare
    with running_relay(Relay(limits=RelayLimits(max_frames_per_second=20))) as embedded:
        run(scenario(embedded.url))


@pytest.mark.parametrize("kind", [Kind.ERROR, Kind.PEER_LEFT, Kind.PEER_JOINED,
                                  Kind.TASK_CLOSED, Kind.WELCOME, Kind.HELLO])
def test_participant_cannot_send_frames_only_the_relay_may_send(relay, kind):
    async def scenario():
        async with Clients(relay.url) as clients:
            # Prepare
            initiator = await clients.initiator()
            alice, bob = await clients.join(initiator, "alice", "bob")
            # Execute
            await alice.send(Frame({"t": kind, "code": "forged", "message": "forged",
                                    "task": TASK}))
            with pytest.raises(RelayRefused) as refusal:
                await recv(alice)
            left = await recv(initiator)
            # Assert: the initiator hears the relay, not alice pretending to be it
            assert refusal.value.code == "protocol"
            assert (left.kind, left.header["from"]) == (Kind.PEER_LEFT, "alice")
            await assert_task_works(clients, initiator, bob, "bob")
    run(scenario())


def test_initiator_cannot_send_frames_only_the_relay_may_send(relay):
    async def scenario():
        async with Clients(relay.url) as clients:
            # Prepare
            initiator = await clients.initiator()
            (alice,) = await clients.join(initiator, "alice")
            # Execute
            await initiator.send(Frame({"t": Kind.ERROR, "to": "*", "code": "forged",
                                        "message": "forged"}))
            with pytest.raises(RelayRefused) as refusal:
                await recv(initiator)
            frames = await drain_until_closed(alice)
            # Assert
            assert refusal.value.code == "protocol"
            assert [frame.header for frame in frames] == [{"t": "task_closed", "task": TASK}]
    run(scenario())


# -- leaving -----------------------------------------------------------------------------

def test_initiator_leaving_sends_task_closed_and_closes_participants(relay):
    async def scenario():
        async with Clients(relay.url) as clients:
            # Prepare
            initiator = await clients.initiator()
            participants = await clients.join(initiator, "alice", "bob")
            # Execute
            await bounded(initiator.close())
            received = await bounded(asyncio.gather(*map(drain_until_closed, participants)))
            # Assert
            for frames, participant in zip(received, participants):
                assert [frame.header for frame in frames] == [
                    {"t": "task_closed", "task": TASK}]
                assert participant.connection.close_code == GOING_AWAY
            assert TASK not in relay.relay.tasks
            again = await clients.initiator()
            assert again.welcome.kind == Kind.WELCOME
    run(scenario())


def test_participant_leaving_tells_the_initiator_peer_left(relay):
    async def scenario():
        async with Clients(relay.url) as clients:
            # Prepare
            initiator = await clients.initiator()
            alice, bob = await clients.join(initiator, "alice", "bob")
            # Execute
            await bounded(alice.close())
            left = await recv(initiator)
            # Assert
            assert left.header == {"t": "peer_left", "from": "alice"}
            await assert_task_works(clients, initiator, bob, "bob")
            await clients.join(initiator, "alice")  # the name is free again
    run(scenario())


def test_closing_a_link_with_unread_frames_does_not_wait_for_close_timeout(relay):
    async def scenario():
        async with Clients(relay.url) as clients:
            # Prepare: more unread frames than the client's queue holds
            initiator = await clients.initiator()
            (alice,) = await clients.join(initiator, "alice")
            for number in range(20):
                await initiator.send(status(to="*", number=number))
            await initiator.send(status(to="*", last=True))
            await asyncio.sleep(0.2)
            # Execute
            started = time.monotonic()
            await bounded(alice.close())
            return time.monotonic() - started

    elapsed = run(scenario())
    # Assert
    assert elapsed < 1


def test_silently_dead_participant_is_dropped_within_the_ping_timeout():
    async def scenario(url):
        async with Clients(url) as clients:
            # Prepare
            initiator = await clients.initiator()
            alice, bob = await clients.join(initiator, "alice", "bob")
            # Execute: alice stops reading, as a frozen machine does, without closing
            started = time.monotonic()
            alice.connection.transport.pause_reading()
            left = await recv(initiator)
            elapsed = time.monotonic() - started
            alice.connection.transport.resume_reading()
            # Assert
            assert (left.kind, left.header["from"]) == (Kind.PEER_LEFT, "alice")
            assert elapsed < 2
            await assert_task_works(clients, initiator, bob, "bob")

    # Prepare
    limits = RelayLimits(ping_interval=0.2, ping_timeout=0.4, close_timeout=0.5)
    with running_relay(Relay(limits=limits)) as embedded:
        run(scenario(embedded.url))


def test_default_pings_notice_a_dead_connection_within_20_seconds():
    # Assert: the worst case is a ping interval, a ping timeout and a close timeout
    limits = RelayLimits()
    assert limits.ping_interval + limits.ping_timeout + limits.close_timeout <= 20
    assert link_module.PING_INTERVAL + link_module.PING_TIMEOUT + link_module.CLOSE_TIMEOUT <= 20
    assert limits.max_send_stall < limits.ping_timeout  # a stalled sender's pongs wait too


# -- the embedded relay's lifecycle ------------------------------------------------------

def test_stop_closes_connected_clients_and_releases_the_port():
    # Prepare
    embedded = EmbeddedRelay("127.0.0.1", 0, Relay()).start()
    port = embedded.port

    async def scenario():
        async with Clients(embedded.url) as clients:
            initiator = await clients.initiator()
            participants = await clients.join(initiator, "alice", "bob")
            # Execute
            await bounded(asyncio.to_thread(embedded.stop))
            for link in (initiator, *participants):
                await drain_until_closed(link)
                assert link.connection.close_code == GOING_AWAY

    run(scenario())
    # Assert
    assert not relay_threads()
    with socket.socket() as rebind:
        rebind.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        rebind.bind(("127.0.0.1", port))
        rebind.listen()
    with EmbeddedRelay("127.0.0.1", port, Relay()) as restarted:
        assert restarted.port == port


def test_stop_does_not_wait_for_a_participant_waiting_on_a_task():
    # Prepare
    embedded = EmbeddedRelay("127.0.0.1", 0, Relay()).start()

    async def scenario():
        async with Clients(embedded.url) as clients:
            joining = asyncio.ensure_future(clients.participant("alice", task="later", wait=60))
            await asyncio.sleep(0.3)
            # Execute
            started = time.monotonic()
            await bounded(asyncio.to_thread(embedded.stop))
            with pytest.raises(RelayRefused) as refusal:
                await bounded(joining)
            return refusal.value, time.monotonic() - started

    refusal, elapsed = run(scenario())
    # Assert
    assert refusal.code == "closed"
    assert elapsed < 2
    assert not relay_threads()


def test_start_on_a_busy_port_raises_oserror_without_leaving_a_thread():
    # Prepare
    with socket.socket() as busy:
        busy.bind(("127.0.0.1", 0))
        busy.listen()
        port = busy.getsockname()[1]
        before = relay_threads()
        # Execute
        with pytest.raises(OSError) as error:
            EmbeddedRelay("127.0.0.1", port, Relay()).start()
        # Assert
        assert error.value.errno == errno.EADDRINUSE
        assert relay_threads() == before


# -- reaching the relay ------------------------------------------------------------------

def test_link_to_a_port_where_nothing_listens_fails_fast_as_unreachable():
    # Prepare
    url = f"ws://127.0.0.1:{free_port()}"

    async def scenario():
        started = time.monotonic()
        with pytest.raises(RelayRefused) as refusal:
            await bounded(Link.open(url, role="initiator", task=TASK, token=JOIN, wait=0))
        return refusal.value, time.monotonic() - started

    # Execute
    refusal, elapsed = run(scenario())
    # Assert
    assert refusal.code == "unreachable"
    assert "is the relay running" in refusal.message
    assert elapsed < 1


def test_link_with_wait_keeps_trying_until_the_relay_starts():
    # Prepare
    port = free_port()
    embedded = EmbeddedRelay("127.0.0.1", port, Relay())
    starter = threading.Timer(0.5, embedded.start)

    async def scenario():
        async with Clients(embedded.url) as clients:
            started = time.monotonic()
            starter.start()
            initiator = await clients.initiator(wait=2)
            elapsed = time.monotonic() - started
            (alice,) = await clients.join(initiator, "alice")
            await assert_task_works(clients, initiator, alice, "alice")
            return elapsed

    # Execute
    try:
        elapsed = run(scenario())
    finally:
        starter.join()
        embedded.stop()
    # Assert
    assert 0.4 < elapsed < 2


@pytest.fixture(scope="module")
def certificate(tmp_path_factory) -> tuple[str, str]:
    """A self-signed certificate for 127.0.0.1 and localhost: (certfile, keyfile)."""
    openssl = shutil.which("openssl")
    if openssl is None:
        pytest.skip("openssl is not on PATH, so no certificate for the wss:// test")
    folder = tmp_path_factory.mktemp("tls")
    cert, key = str(folder / "cert.pem"), str(folder / "key.pem")
    subprocess.run([openssl, "req", "-x509", "-newkey", "rsa:2048", "-nodes", "-days", "1",
                    "-subj", "/CN=localhost",
                    "-addext", "subjectAltName=IP:127.0.0.1,DNS:localhost",
                    "-keyout", key, "-out", cert],
                   check=True, capture_output=True, timeout=30)
    return cert, key


async def serving_wss(certificate: tuple[str, str]) -> tuple[Any, str]:
    server = await serve_relay(Relay(), "127.0.0.1", 0, ssl=ssl_context(*certificate))
    return server, f"wss://127.0.0.1:{server.sockets[0].getsockname()[1]}"


def test_wss_relay_carries_a_task_for_clients_that_trust_its_certificate(certificate):
    async def scenario():
        # Prepare
        server, url = await serving_wss(certificate)
        trust = ssl.create_default_context(cafile=certificate[0])
        try:
            async with Clients(url, ssl=trust) as clients:
                # Execute
                initiator = await clients.initiator()
                (alice,) = await clients.join(initiator, "alice")
                # Assert
                await assert_task_works(clients, initiator, alice, "alice")
        finally:
            server.close()
            await bounded(server.wait_closed())
    run(scenario())


def test_wss_with_no_context_trusts_what_the_system_trusts(certificate, monkeypatch):
    monkeypatch.setenv("SSL_CERT_FILE", certificate[0])  # how a private CA is named

    async def scenario():
        # Prepare
        server, url = await serving_wss(certificate)
        try:
            # Execute
            link = await bounded(Link.open(url, role="initiator", task=TASK, token=JOIN))
            await link.close()
            return link.welcome.header
        finally:
            server.close()
            await bounded(server.wait_closed())

    # Assert
    assert run(scenario())["t"] == Kind.WELCOME


def test_wss_relay_is_unreachable_for_clients_that_do_not_trust_its_certificate(certificate):
    async def scenario():
        # Prepare
        server, url = await serving_wss(certificate)
        try:
            # Execute
            with pytest.raises(RelayRefused) as refusal:
                await bounded(Link.open(url, role="initiator", task=TASK, token=JOIN,
                                        ssl=ssl.create_default_context()))
            return refusal.value
        finally:
            server.close()
            await bounded(server.wait_closed())

    refusal = run(scenario())
    # Assert
    assert refusal.code == "unreachable"
    assert "certificate" in refusal.message.lower()


def test_link_to_a_server_that_never_answers_the_hello_gives_up(monkeypatch):
    monkeypatch.setattr(link_module, "WELCOME_TIMEOUT", 0.3)

    async def silent(connection):
        await connection.wait_closed()  # never says welcome

    async def scenario():
        async with serve(silent, "127.0.0.1", 0) as server:
            port = server.sockets[0].getsockname()[1]
            with pytest.raises(RelayRefused) as refusal:
                await Link.open(f"ws://127.0.0.1:{port}", role="initiator", task="t",
                                token="x")
            return refusal.value

    refusal = asyncio.run(asyncio.wait_for(scenario(), 10))

    assert refusal.code == "timeout"
    assert "is that a fedmagic relay?" in refusal.message


# -- a relay without torch ---------------------------------------------------------------

def loaded_modules(code: str) -> set[str]:
    """The top-level modules a fresh interpreter has loaded after running ``code``."""
    output = subprocess.run([sys.executable, "-c", code + "\nimport sys\n"
                             "print(' '.join(sorted({name.split('.')[0] for name in "
                             "sys.modules})))"],
                            capture_output=True, text=True, timeout=60, check=True).stdout
    return set(output.split())


def test_importing_the_relay_loads_neither_torch_nor_numpy():
    # Execute
    modules = loaded_modules("import fedmagic.wire.relay, fedmagic.wire.frames, fedmagic.wire.link")
    # Assert
    assert "fedmagic" in modules
    assert not {"torch", "numpy"} & modules


def test_relay_command_loads_neither_torch_nor_numpy():
    # Prepare
    relay = subprocess.Popen([sys.executable, "-X", "importtime", "-m", "fedmagic", "relay",
                              "--port", str(free_port())],
                             stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    try:
        # Execute
        listening = relay.stdout.readline()
        relay.send_signal(signal.SIGINT)
        _, imports = relay.communicate(timeout=30)
    finally:
        if relay.poll() is None:
            relay.kill()
            relay.wait(timeout=10)
    modules = {line.rsplit("|", 1)[1].strip().split(".")[0]
               for line in imports.splitlines() if line.startswith("import time:")}
    # Assert
    assert "listening on" in listening
    assert relay.returncode == 0
    assert "websockets" in modules
    assert not {"torch", "numpy"} & modules


def test_package_still_gives_fedavgscheduler_and_logger_and_a_sane_dir():
    # Execute
    modules = loaded_modules(
        "import fedmagic\n"
        "names = dir(fedmagic)\n"
        "assert 'FedAvgScheduler' in names and 'logger' in names, names\n"
        "assert 'torch' not in __import__('sys').modules\n"
        "from fedmagic import FedAvgScheduler, logger\n"
        "assert FedAvgScheduler.__module__ == 'fedmagic.fed_avg'\n"
        "assert fedmagic.FedAvgScheduler is FedAvgScheduler\n")
    # Assert
    assert "torch" in modules  # imported once FedAvgScheduler was asked for
