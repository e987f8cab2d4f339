"""``is_centralized=False``: each round a participant is elected to aggregate it.

The initiator and real participant runtimes run in this process, over the
in-memory relay and a websocket relay on 127.0.0.1; each node's training
leaves its weights at a value of its own, so each round's model is a hand
computation. Killing an elected aggregator's process is in test_federation.
"""

from __future__ import annotations

import asyncio
import contextlib
from typing import Any

import pytest
import torch

from elected_tiny import SAMPLES, VALUES, ElectedTiny
from fedmagic.engine.checkpoint import Checkpoint
from fedmagic.engine.elected import elect
from fedmagic.engine.participant import ParticipantRuntime
from fedmagic.engine.policy import RoundPolicy
from fedmagic.engine.rounds import Aggregator, TaskResult
from fedmagic.engine.task import TaskPackage
from fedmagic.errors import ConfigurationError, ConnectionLost
from fedmagic.strategies import FedAdam, FedAvg, FedMedian, Strategy
from fedmagic.wire.frames import Kind
from fedmagic.wire.messages import sender
from party import NODE
from test_rounds import TOKEN, a_relay

pytestmark = pytest.mark.timeout(60)

#: ``(round, sender)`` of every whole state the initiator received, in the last run.
STATES_IN: list[tuple[int, str]] = []


class VanishesWhenElected(ParticipantRuntime):
    """A node whose connection drops the moment it is elected to aggregate."""

    def _open_room(self, frame):
        asyncio.ensure_future(self.link.close())


def run_elected(tmp_path, nodes: list[str], *, rounds: int = 3, strategy: Strategy | None = None,
                transport: str = "memory", vanishes: str | None = None,
                ) -> tuple[TaskResult, list[str], dict[str, Any]]:
    """Run an ElectedTiny task with is_centralized=False; its result, events and each
    node's outcome. ``STATES_IN`` gets who sent each state the initiator received."""
    events: list[str] = []
    STATES_IN.clear()

    async def scenario():
        async with a_relay(transport) as connect:
            scheduler = ElectedTiny(min_clients=2, max_clients=len(nodes), max_rounds=rounds,
                                    calculation_timeout=20, is_centralized=False)
            scheduler._setup("rounds")
            package = TaskPackage.from_scheduler(scheduler, "rounds", strategy=(
                strategy.describe() if strategy else None))
            link = await connect(role="initiator", task="rounds", token=TOKEN)
            recv = link.recv

            async def watched_recv():
                frame = await recv()
                if frame.kind == Kind.STATE_END:
                    STATES_IN.append((frame.header.get("round"), sender(frame)))
                return frame

            link.recv = watched_recv
            aggregator = Aggregator(scheduler, package, link,
                                    checkpoint=Checkpoint(tmp_path / "models" / "rounds"),
                                    policy=RoundPolicy(join_timeout=20, join_grace=2),
                                    strategy=strategy, on_event=events.append)

            async def take_part(node: str):
                NODE.set(node)
                joined = await connect(role="participant", task="rounds", token=TOKEN,
                                       node=node, wait=10)
                kind = VanishesWhenElected if node == vanishes else ParticipantRuntime
                runtime = kind(joined, node, lambda package: True,
                               reconnect_window=0 if node == vanishes else 5)
                try:
                    return await runtime.run()
                except ConnectionLost as lost:
                    return lost

            parties = [asyncio.create_task(take_part(node)) for node in nodes]
            result = await aggregator.run()
            outcomes = await asyncio.wait_for(asyncio.gather(*parties), 20)
            return result, dict(zip(nodes, outcomes))

    result, outcomes = asyncio.run(asyncio.wait_for(scenario(), 50))
    return result, events, outcomes


def weighted_mean(nodes: list[str]) -> float:
    return sum(VALUES[n] * SAMPLES[n] for n in nodes) / sum(SAMPLES[n] for n in nodes)


@pytest.mark.parametrize("transport", ["memory", "websocket"])
def test_participants_take_turns_aggregating_and_the_model_is_the_weighted_mean(
        tmp_path, transport):
    result, events, outcomes = run_elected(tmp_path, ["c", "a", "b"], transport=transport)

    assert [row["aggregator"] for row in result.history] == ["a", "b", "c"]  # in turn, by name
    # The initiator held one state a round, the combination, and never a single node's update
    assert STATES_IN == [(1, "a"), (2, "b"), (3, "c")]
    assert result.metrics["w"] == pytest.approx(weighted_mean(["a", "b", "c"]), rel=1e-6)
    assert [row["samples"] for row in result.history] == [100, 100, 100]
    assert all(row["participants"] == 3 for row in result.history)
    assert "round 2/3: averaged 3 updates" in "\n".join(events)
    assert ", aggregated by b" in "\n".join(events)
    assert all(outcome.ok and outcome.rounds == 3 for outcome in outcomes.values()), outcomes
    assert all(p.rounds == 3 for p in result.participants.values())


def test_the_initiator_applies_the_server_optimiser_to_what_the_aggregator_combined(tmp_path):
    result, _, _ = run_elected(tmp_path, ["a", "b"], rounds=3, strategy=FedAdam(eta=0.1))

    # Each round every node's model is its VALUE: delta = the weighted mean - x (Reddi et al.)
    x, m, v = 0.0, 0.0, 1e-6
    for _ in range(3):
        delta = weighted_mean(["a", "b"]) - x
        m, v = 0.9 * m + 0.1 * delta, 0.99 * v + 0.01 * delta ** 2
        x += 0.1 * m / (v ** 0.5 + 1e-3)
    assert result.metrics["w"] == pytest.approx(x, rel=1e-5)


def test_a_strategy_that_keeps_every_update_runs_on_the_elected_node_too(tmp_path):
    result, _, _ = run_elected(tmp_path, ["a", "b", "c"], rounds=1, strategy=FedMedian())

    assert result.metrics["w"] == pytest.approx(VALUES["b"])


def test_an_aggregator_that_vanishes_mid_round_costs_the_round_a_rerun_not_the_task(tmp_path):
    result, events, outcomes = run_elected(tmp_path, ["a", "b", "c"], vanishes="a")

    log = "\n".join(events)
    assert "a, elected to aggregate round 1, left; the round runs again with another " \
           "aggregator" in log
    assert [row["round"] for row in result.history] == [1, 2, 3]
    assert "a" not in [row["aggregator"] for row in result.history]
    assert result.metrics["w"] == pytest.approx(weighted_mean(["b", "c"]), rel=1e-6)
    assert outcomes["b"].ok and outcomes["c"].ok


def test_turns_pass_on_with_each_rerun_of_a_round():
    assert [elect(n, ["b", "a", "c"]) for n in (1, 2, 3, 4)] == ["a", "b", "c", "a"]
    assert elect(1, ["b", "c"], attempt=1) == "c"


def test_a_strategy_an_elected_node_could_not_rebuild_is_refused_at_launch():
    from fedmagic.engine.launch import start_task

    class Mine(FedAvg):
        pass

    with pytest.raises(ConfigurationError, match="cannot rebuild it; use a built-in strategy"):
        start_task(ElectedTiny(min_clients=1, max_clients=2, is_centralized=False), "mine",
                   strategy=Mine())
