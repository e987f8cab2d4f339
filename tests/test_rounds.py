"""The round loop against participants that misbehave on purpose.

The initiator's ``Aggregator`` runs in this process, over the in-memory relay
(or, where the wire is the point, a real relay on 127.0.0.1); each
participant is a short script speaking the protocol through its own link:
honest, slow, silent, or lying about its weight. No process starts, so each
scenario costs milliseconds beyond the deadlines it waits out.
"""

from __future__ import annotations

import asyncio
import contextlib
import functools
import threading
import time
from pathlib import Path
from typing import Any, AsyncIterator, Awaitable, Callable

import pytest
import torch

from fedmagic.engine.checkpoint import Checkpoint
from fedmagic.wire.codec import Frame, Kind, StateReader
from fedmagic.errors import (ConfigurationError, ConnectionLost, NotEnoughParticipants,
                             TaskFailed)
from fedmagic.engine.joining import start_join
from fedmagic.engine.launch import start_task
from fedmagic.engine.participant import ParticipantRuntime
from fedmagic.wire.link import Link
from fedmagic.engine.policy import RoundPolicy, sit_out_rounds
from fedmagic.strategies import FedAvg, FedMedian, FedTrimmedAvg, Strategy
from fedmagic.strategies.fedavg import over_share
from fedmagic.wire.memory import MemoryRelay
from fedmagic.wire.relay import EmbeddedRelay, Relay, RelayLimits
from fedmagic.engine.rounds import Aggregator, TaskResult
from fedmagic.engine.task import TaskPackage
from tiny import SlowTiny, Tiny

TOKEN = "join-token"
pytestmark = pytest.mark.timeout(60)


# A participant script, run each round once the global state is in: what it does with the
# link, given the round's number and header, and an event set when it may upload.
Behaviour = Callable[[Link, int, dict[str, Any], asyncio.Event], Awaitable[None]]


def sends(value: float) -> Behaviour:
    """An honest node whose training leaves every weight at ``value``."""
    async def behave(link, round, round_header, may_upload):
        await link.send(Frame({"t": Kind.TRAINED, "round": round, "seconds": 0.0}))
        await may_upload.wait()
        await link.send_state({"weight": torch.full((1, 4), value)}, round=round)
    return behave


async def trickles(link, round, round_header, may_upload):
    """Says it trained, then sends empty state frames for ever: data that never ends."""
    await link.send(Frame({"t": Kind.TRAINED, "round": round, "seconds": 0.0}))
    await may_upload.wait()
    while True:
        await link.send(Frame({"t": Kind.STATE, "round": round, "pieces": []}))
        await asyncio.sleep(0.2)


def sends_in_round_1_only(value: float) -> Behaviour:
    honest = sends(value)

    async def behave(link, round, round_header, may_upload):
        if round == 1:
            await honest(link, round, round_header, may_upload)
    return behave


async def never_uploads(link, round, round_header, may_upload):
    await link.send(Frame({"t": Kind.TRAINED, "round": round, "seconds": 0.0}))
    await asyncio.Event().wait()


async def never_trains(link, round, round_header, may_upload):
    await asyncio.Event().wait()


# How a party connects: ``MemoryRelay.open``, or ``Link.open`` bound to a relay's URL.
Connect = Callable[..., Awaitable[Any]]


@contextlib.asynccontextmanager
async def a_relay(transport: str) -> AsyncIterator[Connect]:
    """How parties connect to a fresh relay: in memory, or a websocket relay on loopback."""
    if transport == "memory":
        yield MemoryRelay().open
        return
    with EmbeddedRelay("127.0.0.1", 0, Relay()) as relay:
        yield functools.partial(Link.open, relay.url)


async def participant(connect: Connect, node: str, behaviour: Behaviour,
                      samples: int = 100, evaluation: tuple[int, dict] | None = None) -> None:
    """Join, say the data is verified, and act out ``behaviour`` every round; with an
    ``evaluation``, say ``(examples, metrics)`` of every global model it is asked to test."""
    link = await connect(role="participant", task="rounds", token=TOKEN, node=node, wait=10)
    work: asyncio.Task | None = None
    try:
        assert (await link.recv()).kind == Kind.TASK
        await link.send(Frame({"t": Kind.STATUS, "stage": "verified", "ok": True,
                               "samples": samples,
                               "test_samples": evaluation[0] if evaluation else 0}))
        reader, may_upload, evaluating = None, asyncio.Event(), None
        while True:
            frame = await link.recv()
            if frame.kind == Kind.FINISH:
                return
            if frame.kind == Kind.EVALUATE:
                evaluating = frame.header["round"]
            elif evaluating is not None and frame.kind == Kind.STATE_END:
                assert evaluation is not None, "only a node with test data is asked"
                await link.send(Frame({"t": Kind.EVALUATED, "round": evaluating,
                                       "examples": evaluation[0], "metrics": evaluation[1]}))
                evaluating = None
            elif evaluating is not None:
                continue  # the model to test, arriving
            elif frame.kind == Kind.ROUND:
                if work is not None:
                    work.cancel()
                header, reader, may_upload = frame.header, StateReader(), asyncio.Event()
                if header.get("upload"):  # room for every update: no request will come
                    may_upload.set()
            elif frame.kind == Kind.UPLOAD and frame.header["round"] == header["round"]:
                may_upload.set()
            elif frame.kind == Kind.STATE:
                reader.feed(frame)
            elif frame.kind == Kind.STATE_END:
                reader.finish(frame)
                work = asyncio.create_task(behaviour(link, header["round"], header,
                                                     may_upload))
    except ConnectionLost:
        pass
    finally:
        if work is not None:
            work.cancel()
        await link.close()


def run_task(tmp_path: Path, behaviours: dict[str, Behaviour], *, rounds: int = 1,
             min_clients: int = 1, samples: dict[str, int] | None = None,
             calculation_timeout: float = 10, transport: str = "memory",
             strategy: Strategy | None = None,
             evaluations: dict[str, tuple[int, dict]] | None = None,
             **policy: Any) -> tuple[Any, list[str], float]:
    """Run a Tiny task with these participants; its result (or error), events and seconds."""
    events: list[str] = []
    samples = samples or {}

    async def scenario():
        async with a_relay(transport) as connect:
            scheduler = Tiny(min_clients=min_clients, max_clients=len(behaviours),
                             max_rounds=rounds, calculation_timeout=calculation_timeout)
            scheduler._setup("rounds")
            with torch.no_grad():
                scheduler.model.weight.zero_()
            package = TaskPackage.from_scheduler(scheduler, "rounds")
            link = await connect(role="initiator", task="rounds", token=TOKEN)
            policy.setdefault("join_grace", 1)
            aggregator = Aggregator(scheduler, package, link,
                                    checkpoint=Checkpoint(tmp_path / "models" / "rounds"),
                                    policy=RoundPolicy(join_timeout=10, **policy),
                                    strategy=strategy, on_event=events.append)
            nodes = [asyncio.create_task(participant(connect, node, behaviour,
                                                     samples.get(node, 100),
                                                     (evaluations or {}).get(node)))
                     for node, behaviour in behaviours.items()]
            loop = asyncio.get_running_loop()
            started = loop.time()
            try:
                result: Any = await aggregator.run()
            except NotEnoughParticipants as exc:
                result = exc
            seconds = loop.time() - started
            # Each hears the task end and closes its link; cancelling one mid-close would
            # leave its unread frames holding the relay's closing handshake.
            _, stuck = await asyncio.wait(nodes, timeout=10)
            for node in stuck:
                node.cancel()
            await asyncio.gather(*nodes, return_exceptions=True)
            return result, seconds

    result, seconds = asyncio.run(asyncio.wait_for(scenario(), 50))
    return result, events, seconds


# -- averaging ------------------------------------------------------------------------------

@pytest.mark.parametrize("transport", ["memory", "websocket"])
def test_updates_are_averaged_weighted_by_sample_counts(tmp_path, transport):
    result, events, _ = run_task(tmp_path, {"a": sends(1.0), "b": sends(4.0)},
                                 samples={"a": 100, "b": 200}, min_clients=2,
                                 transport=transport)

    assert isinstance(result, TaskResult), result
    assert result.metrics["w"] == pytest.approx(3.0)
    assert result.history[0]["samples"] == 300


def test_updates_arrive_one_at_a_time_when_the_memory_budget_holds_one_model(tmp_path):
    result, events, _ = run_task(tmp_path, {"a": sends(1.0), "b": sends(3.0), "c": sends(5.0)},
                                 min_clients=3, upload_memory=16,
                                 strategy=FedAvg(weighted=False))

    assert isinstance(result, TaskResult), result
    assert result.metrics["w"] == pytest.approx(3.0)


def test_a_zero_update_with_an_inflated_sample_count_is_refused_as_implausible(tmp_path):
    result, events, _ = run_task(
        tmp_path, {"a": sends(1.0), "b": sends(1.0), "hijacker": sends(0.0)},
        samples={"hijacker": 10 ** 12}, min_clients=2)

    assert isinstance(result, TaskResult), result
    assert result.metrics["w"] == pytest.approx(1.0)  # the zeros took no part
    assert result.participants["hijacker"].status == "unverified"
    assert ("hijacker refused: reported 1000000000000 training samples, over max_samples="
            "1000000000: implausible") in "\n".join(events)


def test_a_node_over_max_weight_share_is_left_out_of_the_round(tmp_path):
    result, events, _ = run_task(
        tmp_path, {"a": sends(1.0), "b": sends(1.0), "big": sends(0.0)},
        samples={"big": 5000}, min_clients=2, strategy=FedAvg(max_weight_share=0.5))

    assert isinstance(result, TaskResult), result
    assert result.metrics["w"] == pytest.approx(1.0)
    assert result.participants["big"].status == "refused"
    assert ("round 1: big left out: its 5000 samples would be 96% of round 1's weight, over "
            "max_weight_share=0.5") in events


@pytest.mark.parametrize("strategy", [FedMedian(), FedTrimmedAvg(beta=0.2)], ids=str)
def test_robust_aggregation_ignores_one_poisoned_update(tmp_path, strategy):
    honest = {f"n{i}": sends(1.0 + i / 100) for i in range(4)}

    result, events, _ = run_task(tmp_path, {**honest, "poison": sends(1000.0)}, min_clients=5,
                                 strategy=strategy)

    assert isinstance(result, TaskResult), result
    assert 1.0 <= result.metrics["w"] <= 1.03


# -- deadlines ------------------------------------------------------------------------------

def test_a_slow_loris_upload_is_cut_at_its_whole_upload_deadline_and_sits_out(tmp_path):
    result, events, seconds = run_task(
        tmp_path, {"a": sends(2.0), "b": sends(2.0), "loris": trickles}, rounds=2,
        upload_timeout=1.5)

    assert isinstance(result, TaskResult), result
    assert seconds < 8  # two rounds; the trickle never stretched the deadline
    assert ("round 1: loris sent 0 bytes of its 16 bytes update within 1.5 s (upload_timeout); "
            "it sits out round 2") in events
    assert "round 2: training on a, b" in events or "round 2: training on b, a" in events
    assert [row["participants"] for row in result.history] == [2, 2]


def test_a_node_that_says_trained_but_never_uploads_sits_out_the_next_round(tmp_path):
    result, events, seconds = run_task(
        tmp_path, {"a": sends(2.0), "silent": never_uploads}, rounds=3, upload_timeout=1)

    assert isinstance(result, TaskResult), result
    lines = "\n".join(events)
    assert ("round 1: silent sent 0 bytes of its 16 bytes update within 1 s (upload_timeout); "
            "it sits out round 2") in lines
    assert "round 2: training on a\n" in lines + "\n"
    # back in round 3, misses again, and sits out twice as long
    assert "round 3: silent sent 0 bytes of its 16 bytes update within 1 s (upload_timeout); " \
           "it sits out rounds 4-5" in lines
    assert seconds < 8


def test_a_node_that_never_finishes_training_is_cut_at_calculation_timeout(tmp_path):
    result, events, seconds = run_task(
        tmp_path, {"a": sends(2.0), "stuck": never_trains}, calculation_timeout=1)

    assert isinstance(result, TaskResult), result
    assert ("round 1: stuck did not finish training within 1 s (calculation_timeout); "
            "it sits out round 2") in events
    assert result.participants["stuck"].status == "timed out"


def late_in_round_1(value: float) -> Behaviour:
    """Trains past the deadline in round 1 and sends its update anyway; honest after."""
    honest = sends(value)

    async def behave(link, round, round_header, may_upload):
        if round == 1:
            await asyncio.sleep(1.0)
        await honest(link, round, round_header, may_upload)
    return behave


def test_a_node_late_once_sits_out_the_next_round_and_its_late_update_is_ignored(tmp_path):
    result, events, _ = run_task(
        tmp_path, {"a": sends(2.0), "b": sends(2.0), "late": late_in_round_1(50.0)},
        rounds=3, min_clients=2, calculation_timeout=0.5)

    assert isinstance(result, TaskResult), result
    assert ("round 1: late did not finish training within 0.5 s (calculation_timeout); "
            "it sits out round 2") in events
    assert "round 2: training on a, b" in events or "round 2: training on b, a" in events
    assert [row["participants"] for row in result.history] == [2, 2, 3]
    assert result.metrics["w"] == pytest.approx((2.0 + 2.0 + 50.0) / 3)  # back in round 3


def test_the_initiator_says_whom_it_waits_for_and_how_far_each_upload_got(tmp_path):
    result, events, _ = run_task(
        tmp_path, {"a": sends(2.0), "stuck": never_trains, "silent": never_uploads},
        calculation_timeout=1.2, upload_timeout=1.2, progress_every=0.5)

    waiting = [line for line in events if "waiting for" in line and line.startswith("round")]
    assert waiting, events
    assert "silent (uploading: 0% of 16 bytes, 1 s left)" in waiting[0]
    assert "stuck (training, 1 s left)" in waiting[0]


def test_too_few_updates_within_the_deadlines_ends_the_task_saying_why(tmp_path):
    result, events, seconds = run_task(
        tmp_path, {"a": sends(2.0), "silent": never_uploads}, min_clients=2, upload_timeout=1)

    assert isinstance(result, NotEnoughParticipants)
    assert "only 1 of the 2 participants needed (min_clients) sent a valid update" in str(result)
    assert seconds < 5


# -- ending and continuing -----------------------------------------------------------------


def participants_in_the_background(url: str, behaviours: dict[str, Behaviour]) -> threading.Thread:
    connect = functools.partial(Link.open, url)

    async def all_of_them():
        await asyncio.wait_for(asyncio.gather(*(participant(connect, node, behaviour)
                                                for node, behaviour in behaviours.items())), 30)

    thread = threading.Thread(target=asyncio.run, args=(all_of_them(),))
    thread.start()
    return thread


def test_running_the_same_code_again_continues_an_unfinished_run_from_its_checkpoint(
        tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    options = dict(token=TOKEN, join_timeout=10, join_grace=1, upload_timeout=1)
    with EmbeddedRelay("127.0.0.1", 0, Relay()) as relay:
        # Prepare: a run that fails in round 2, when one of two nodes stops uploading
        nodes = participants_in_the_background(
            relay.url, {"a": sends(2.0), "b": sends_in_round_1_only(2.0)})
        first = start_task(Tiny(min_clients=2, max_clients=2, max_rounds=3,
                                calculation_timeout=1), "rounds",
                           relay=relay.url, **options)
        with pytest.raises(TaskFailed) as failure:
            first.wait(30)
        nodes.join(30)
        # Execute: the author runs the very same code again; nothing asks for resume=True
        nodes = participants_in_the_background(relay.url, {"a": sends(2.0), "b": sends(2.0)})
        again = start_task(Tiny(min_clients=2, max_clients=2, max_rounds=3,
                                calculation_timeout=1), "rounds",
                           relay=relay.url, **options)
        result = again.wait(30)
        nodes.join(30)

    # Assert: one short message says where the model is and how to go on; no round is lost
    assert str(failure.value).endswith(
        f"the model after round 1 is in {tmp_path / 'models' / 'rounds'}; run the same code "
        "again to continue from there")
    assert [row["round"] for row in result.history] == [1, 2, 3]
    assert result.history[0] == first.history[0]  # round 1 came from the checkpoint
    assert any(text.startswith("continuing the unfinished run of this same code")
               for _, text in again.events)
    assert result.metrics["w"] == pytest.approx(2.0)


def test_a_finished_task_resumed_with_more_rounds_runs_only_the_new_ones(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    options = dict(token=TOKEN, join_timeout=10, join_grace=1)
    with EmbeddedRelay("127.0.0.1", 0, Relay()) as relay:
        nodes = participants_in_the_background(relay.url, {"a": sends(2.0)})
        first = start_task(Tiny(min_clients=1, max_clients=1, max_rounds=2), "rounds",
                           relay=relay.url, **options).wait(30)
        nodes.join(30)
        # Execute: the author asks for one round more, from the checkpoint
        nodes = participants_in_the_background(relay.url, {"a": sends(5.0)})
        resumed = start_task(Tiny(min_clients=1, max_clients=1, max_rounds=3), "rounds",
                             relay=relay.url, resume=True, **options)
        result = resumed.wait(30)
        nodes.join(30)

    assert [row["round"] for row in result.history] == [1, 2, 3]
    assert result.history[:2] == first.history
    assert [text for _, text in resumed.events if text.startswith("round ") and
            "training on" in text] == ["round 3: training on a"]
    assert result.metrics["w"] == pytest.approx(5.0)


def test_connections_stay_alive_through_training_longer_than_the_ping_timeout(
        tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    quick_pings = RelayLimits(ping_interval=0.1, ping_timeout=0.3)  # an epoch is 1 s
    with EmbeddedRelay("127.0.0.1", 0, Relay(limits=quick_pings)) as relay:
        nodes = [start_join(relay.url, "pings", TOKEN, node, lambda package: True, wait=10,
                            quiet=True) for node in ("a", "b")]
        run = start_task(SlowTiny(min_clients=2, max_clients=2, max_rounds=2, merge_epochs=1,
                                  calculation_timeout=30), "pings", relay=relay.url,
                         token=TOKEN, join_timeout=10, strategy=FedAvg(weighted=False))
        result = run.wait(30)
        outcomes = [node.wait(10) for node in nodes]

    assert [row["participants"] for row in result.history] == [2, 2]
    assert result.history[0]["samples"] == 0  # Tiny's nodes train on no data
    assert all(outcome.ok for outcome in outcomes), outcomes


def test_the_initiator_sees_each_participants_epoch_and_when_it_last_heard_from_it(
        tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    with EmbeddedRelay("127.0.0.1", 0, Relay()) as relay:
        node = start_join(relay.url, "epochs", TOKEN, "a", lambda package: True, wait=10,
                          quiet=True)
        run = start_task(SlowTiny(min_clients=1, max_clients=1, max_rounds=1, merge_epochs=3,
                                  epoch_seconds=0.3), "epochs", relay=relay.url, token=TOKEN,
                         join_timeout=10, join_grace=0)
        seen = set()
        while not run.done():
            for p in run.snapshot().participants:
                seen.add((p.status, p.progress))
            time.sleep(0.02)
        node.wait(10)
    state = run.snapshot().participants[0]

    assert {("training", "epoch 1/3"), ("training", "epoch 2/3"),
            ("training", "epoch 3/3")} <= seen
    assert (state.round, state.epoch, state.epochs) == (1, 3, 3)
    assert run.started <= state.last_seen <= run.ended
    assert run.snapshot().hyperparameters == {
        "min_clients": 1, "max_clients": 1, "max_rounds": 1, "merge_epochs": 3,
        "epoch_seconds": 0.3}


# -- the rules themselves -------------------------------------------------------------------

def test_an_inflated_count_does_not_push_honest_nodes_over_the_share_cap():
    assert over_share({"a": 100, "b": 100, "liar": 10 ** 12}, 0.5) == {"liar": pytest.approx(1)}
    assert over_share({"a": 100, "b": 300}, 0.8) == {}


def test_sitting_out_doubles_with_each_deadline_missed_in_a_row_up_to_eight_rounds():
    assert [sit_out_rounds(strikes) for strikes in range(1, 7)] == [1, 2, 4, 8, 8, 8]


@pytest.mark.parametrize("options, message", [
    ({"upload_timeout": -1}, "upload_timeout=-1: must be a positive number of seconds"),
    ({"upload_memory": 0}, "upload_memory=0: must be a whole number, at least 1"),
])
def test_round_rules_that_cannot_work_are_refused_at_launch(options, message):
    with pytest.raises(ConfigurationError) as error:
        RoundPolicy(**options)

    assert str(error.value).startswith(message)


def test_upload_deadline_grows_with_the_state_and_budget_gives_at_least_one_slot():
    policy = RoundPolicy()
    assert policy.upload_seconds(0) == 30
    assert policy.upload_seconds(100 << 20) == 130
    assert RoundPolicy(upload_timeout=5).upload_seconds(100 << 20) == 5
    assert policy.upload_slots(1 << 30) == 1
    assert policy.upload_slots(1 << 20) == 256


def test_a_notebook_participant_that_joins_again_takes_its_own_name_back(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)  # where the participant keeps its session
    with EmbeddedRelay("127.0.0.1", 0, Relay()) as relay:
        async def initiator_hears_the_same_node_twice() -> list[tuple[str, str]]:
            link = await Link.open(relay.url, role="initiator", task="again", token=TOKEN)
            try:
                # Prepare: a kernel joined, and holds its connection (waiting for code)
                first = start_join(relay.url, "again", TOKEN, "alice", lambda _: False, wait=5,
                                   quiet=True)
                heard = [(await asyncio.wait_for(link.recv(), 5)).kind]
                for _ in range(100):  # its session reaches the disk just after its welcome
                    if list(tmp_path.glob(".fedmagic/sessions/*")):
                        break
                    await asyncio.sleep(0.05)
                # Execute: the same node joins again (a restarted kernel, a second panel)
                second = start_join(relay.url, "again", TOKEN, "alice", lambda _: False,
                                    wait=5, quiet=True)
                heard += [(await asyncio.wait_for(link.recv(), 5)).kind for _ in range(2)]
                return heard, first, second
            finally:
                await link.close()

        heard, first, second = asyncio.run(initiator_hears_the_same_node_twice())
        second.leave()

    # Assert: the stale connection made way at once; no node_taken
    assert heard == [Kind.PEER_JOINED, Kind.PEER_LEFT, Kind.PEER_JOINED]
    assert first.done()
    assert "node_taken" not in repr(second)


# -- the relay connection lost --------------------------------------------------------------

@pytest.mark.parametrize("initiator_returns", [True, False])
def test_a_verified_participant_waits_for_its_initiator_to_come_back_and_never_consents_twice(
        tmp_path, monkeypatch, initiator_returns):
    monkeypatch.chdir(tmp_path)
    scheduler = Tiny(min_clients=1, max_clients=1, max_rounds=1)
    package = TaskPackage.from_scheduler(scheduler, "away")
    consents: list[str] = []

    def consent(shown: TaskPackage) -> bool:
        consents.append(shown.code_hash)
        return True

    with EmbeddedRelay("127.0.0.1", 0, Relay()) as relay:
        async def initiator_drops_then_returns() -> dict[str, Any]:
            link = await Link.open(relay.url, role="initiator", task="away", token=TOKEN)
            joining = start_join(relay.url, "away", TOKEN, "alice", consent, wait=5,
                                 reconnect_window=1, quiet=True)
            assert (await link.recv()).kind == Kind.PEER_JOINED
            await link.send(Frame({**package.to_header(), "to": ["alice"]}))
            assert (await link.recv()).header["stage"] == "verified"
            # Execute: the initiator's connection ends without a word (no FINISH)
            await link.close()
            if not initiator_returns:
                return {"joining": joining}
            link = await Link.open(relay.url, role="initiator", task="away", token=TOKEN)
            try:
                back, status = [(await link.recv()).header for _ in range(2)]
                await link.send(Frame({"t": Kind.FINISH, "ok": True, "reason": "finished",
                                       "to": "*"}))
                return {"joining": joining, "back": back, "status": status}
            finally:
                await link.close()

        seen = asyncio.run(initiator_drops_then_returns())
        joining = seen["joining"]
        if initiator_returns:
            outcome = joining.wait(10)
        else:
            with pytest.raises(TaskFailed) as failed:
                joining.wait(10)

    assert consents == [package.code_hash]  # shown the code once, whatever happened
    if initiator_returns:
        assert seen["back"] == {"t": Kind.PEER_JOINED, "from": "alice",
                                "accepted": package.code_hash}
        assert seen["status"]["stage"] == "verified"  # it says so again; no code is resent
        assert outcome.ok, outcome
    else:
        assert ("the initiator's connection to the relay dropped, and the task did not come "
                "back within 1 s (reconnect_window)") in str(failed.value)


def test_an_initiator_whose_relay_does_not_come_back_fails_saying_how_long_it_waited(
        tmp_path):
    scheduler = Tiny(min_clients=1, max_clients=1, max_rounds=1)
    scheduler._setup("gone")
    package = TaskPackage.from_scheduler(scheduler, "gone")
    relay = EmbeddedRelay("127.0.0.1", 0, Relay()).start()
    events: list[str] = []

    async def relay_stops_for_good() -> tuple[TaskFailed, float]:
        link = await Link.open(relay.url, role="initiator", task="gone", token=TOKEN)
        aggregator = Aggregator(scheduler, package, link, checkpoint=Checkpoint(tmp_path),
                                on_event=events.append, reconnect_window=1)
        running = asyncio.create_task(aggregator.run())
        await asyncio.sleep(0.2)
        loop = asyncio.get_running_loop()
        stopped = loop.time()
        await asyncio.to_thread(relay.stop)
        with pytest.raises(TaskFailed) as failed:
            await running
        return failed.value, loop.time() - stopped

    failure, seconds = asyncio.run(relay_stops_for_good())

    assert "reconnecting for up to 1 s (reconnect_window)" in "\n".join(events)
    assert "no relay took the task back within 1 s (reconnect_window)" in str(failure)
    assert seconds < 5


def test_a_relay_restart_mid_round_costs_no_round_and_no_consent_in_memory(tmp_path,
                                                                           monkeypatch):
    monkeypatch.chdir(tmp_path)
    relay = MemoryRelay()
    events: list[str] = []
    consents: list[str] = []

    def restart_once_round_2_starts(text: str) -> None:
        events.append(text)
        if text.startswith("round 2: training on") and sum(
                t.startswith("round 2: training on") for t in events) == 1:
            relay.restart()  # before round 2's weights go out

    def consent_of(node: str) -> Callable[[TaskPackage], bool]:
        return lambda package: consents.append(node) is None

    async def scenario():
        scheduler = Tiny(min_clients=2, max_clients=2, max_rounds=3)
        scheduler._setup("rounds")
        aggregator = Aggregator(
            scheduler, TaskPackage.from_scheduler(scheduler, "rounds"),
            await relay.open(role="initiator", task="rounds", token=TOKEN),
            checkpoint=Checkpoint(tmp_path / "models"), on_event=restart_once_round_2_starts,
            policy=RoundPolicy(join_timeout=10, join_grace=1),
            strategy=FedAvg(weighted=False),
            reconnect_window=5)

        async def node(name: str):
            link = await relay.open(role="participant", task="rounds", token=TOKEN, node=name,
                                    wait=5)
            return await ParticipantRuntime(link, name, consent_of(name),
                                            reconnect_window=5).run()

        return await asyncio.wait_for(asyncio.gather(aggregator.run(), node("a"), node("b")),
                                      30)

    result, *outcomes = asyncio.run(scenario())

    assert any("the relay connection was lost; the round runs again" in t for t in events)
    assert [row["round"] for row in result.history] == [1, 2, 3]
    assert all(row["participants"] == 2 for row in result.history)
    assert sorted(consents) == ["a", "b"]  # each shown the code once
    assert all(outcome.ok for outcome in outcomes), outcomes


# -- federated evaluation -------------------------------------------------------------------

def test_participants_evaluate_the_model_on_their_own_data_weighted_by_their_examples(tmp_path):
    evaluations = {"a": (10, {"accuracy": 0.5, "loss": 1.0}),
                   "b": (30, {"accuracy": 0.9, "loss": 0.2}),
                   "c": (60, {"accuracy": 0.6})}  # not every node reports every metric

    result, events, _ = run_task(tmp_path, {node: sends(1.0) for node in "abcd"}, rounds=2,
                                 min_clients=4, evaluations=evaluations)

    assert isinstance(result, TaskResult), result
    for row in result.history:  # round 1 and the last are tested
        assert row["federated_accuracy"] == pytest.approx((5 + 27 + 36) / 100)
        assert row["federated_loss"] == pytest.approx((10 * 1.0 + 30 * 0.2) / 40)
        assert row["federated_examples"] == 100
        assert row["w"] == pytest.approx(1.0)  # the initiator's own test, beside them
    assert result.participants["b"].evaluation == {"accuracy": 0.9, "loss": 0.2}
    assert result.participants["d"].evaluation == {}  # no test data of its own: not asked


def test_without_federated_evaluation_no_participant_is_asked(tmp_path):
    result, events, _ = run_task(tmp_path, {"a": sends(1.0)}, federated_evaluation=False,
                                 evaluations={"a": (10, {"accuracy": 0.5})})

    assert "federated_accuracy" not in result.history[0]
