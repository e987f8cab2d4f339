"""Secure aggregation over the round loop: only the sum of the round's updates is revealed.

The initiator and real participant runtimes run in this process, over the
in-memory relay and a websocket relay on 127.0.0.1; each node's training
leaves its weights at a value of its own, so each round's model is a hand
computation. Killing participant processes is in test_federation.
"""

from __future__ import annotations

import asyncio
from typing import Any

import numpy as np
import pytest

from fedmagic.engine.checkpoint import Checkpoint
from fedmagic.engine.participant import ParticipantRuntime
from fedmagic.engine.policy import RoundPolicy
from fedmagic.engine.rounds import Aggregator, TaskResult
from fedmagic.engine.task import TaskPackage
from fedmagic.errors import ConnectionLost, TaskFailed
from fedmagic.strategies import FedAvg, SecureAggregation, Strategy
from fedmagic.wire.frames import Kind
from fedmagic.wire.messages import sender
from party import NODE
from secure_tiny import SAMPLES, VALUES, SecureTiny
from test_rounds import TOKEN, a_relay

pytestmark = pytest.mark.timeout(60)

#: Every frame the initiator received in the last run: ``(sender, frame)``.
FRAMES_IN: list[tuple[str, Any]] = []


def run_secure(tmp_path, nodes: list[str], *, rounds: int = 1,
               strategy: Strategy | None = None, transport: str = "memory",
               runtimes: dict[str, type[ParticipantRuntime]] | None = None,
               min_clients: int = 3) -> tuple[TaskResult | TaskFailed, list[str], dict]:
    """Run SecureTiny under ``strategy`` (SecureAggregation() by default); the result (or
    the failure), the task's events and each node's outcome."""
    strategy = strategy or SecureAggregation()
    events: list[str] = []
    FRAMES_IN.clear()

    async def scenario():
        async with a_relay(transport) as connect:
            scheduler = SecureTiny(min_clients=min_clients, max_clients=len(nodes),
                                   max_rounds=rounds, calculation_timeout=20)
            scheduler._setup("secure")
            package = TaskPackage.from_scheduler(scheduler, "secure",
                                                 strategy=strategy.describe())
            link = await connect(role="initiator", task="secure", token=TOKEN)
            recv = link.recv

            async def watched_recv():
                frame = await recv()
                FRAMES_IN.append((sender(frame), frame))
                return frame

            link.recv = watched_recv
            aggregator = Aggregator(scheduler, package, link,
                                    checkpoint=Checkpoint(tmp_path / "models" / "secure"),
                                    policy=RoundPolicy(join_timeout=20, join_grace=2,
                                                       upload_timeout=10),
                                    strategy=strategy, on_event=events.append)

            async def take_part(node: str):
                NODE.set(node)
                joined = await connect(role="participant", task="secure", token=TOKEN,
                                       node=node, wait=10)
                kind = (runtimes or {}).get(node, ParticipantRuntime)
                runtime = kind(joined, node, lambda package: True, reconnect_window=0)
                try:
                    return await runtime.run()
                except ConnectionLost as lost:
                    return lost

            parties = [asyncio.create_task(take_part(node)) for node in nodes]
            try:
                result = await aggregator.run()
            except TaskFailed as failed:
                result = failed
            outcomes = await asyncio.wait_for(asyncio.gather(*parties), 20)
            return result, dict(zip(nodes, outcomes))

    result, outcomes = asyncio.run(asyncio.wait_for(scenario(), 50))
    return result, events, outcomes


def weighted_mean(nodes: list[str]) -> float:
    return sum(VALUES[n] * SAMPLES[n] for n in nodes) / sum(SAMPLES[n] for n in nodes)


@pytest.mark.parametrize("transport", ["memory", "websocket"])
def test_the_revealed_mean_is_the_weighted_mean_within_the_stated_quantisation_bound(
        tmp_path, transport):
    result, events, outcomes = run_secure(tmp_path, ["a", "b", "c", "d"], rounds=2,
                                          transport=transport)

    assert not isinstance(result, Exception), result
    row = result.history[-1]
    assert row["participants"] == 4 and row["threshold"] == 3
    assert abs(result.metrics["w"] - weighted_mean(["a", "b", "c", "d"])) <= row["error_bound"]
    assert all(outcome.ok and outcome.rounds == 2 for outcome in outcomes.values()), outcomes
