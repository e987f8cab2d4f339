"""A task run to its end in this process: the initiator's Aggregator and real participant
runtimes, over the in-memory relay or a websocket relay on 127.0.0.1."""

from __future__ import annotations

import asyncio
from typing import Any

from fedmagic.engine.checkpoint import Checkpoint
from fedmagic.engine.participant import ParticipantRuntime
from fedmagic.engine.policy import RoundPolicy
from fedmagic.engine.rounds import Aggregator, TaskResult
from fedmagic.engine.task import TaskPackage
from fedmagic.errors import ConnectionLost, TaskFailed
from fedmagic.strategies import Strategy
from fedmagic.wire.messages import sender
from party import NODE
from test_rounds import TOKEN, a_relay


def run_over_relay(tmp_path, scheduler, nodes: list[str], *, strategy: Strategy,
                   transport: str = "memory",
                   runtimes: dict[str, type[ParticipantRuntime]] | None = None,
                   consented: Strategy | None = None, upload_timeout: float = 10,
                   frames: list[tuple[str, Any]] | None = None,
                   ) -> tuple[TaskResult | TaskFailed, list[str], dict[str, Any]]:
    """Run ``scheduler``'s task with a participant runtime per node (each coroutine sets
    ``party.NODE``); the result (or the failure), the task's events and each node's outcome.

    Args:
        runtimes: a ParticipantRuntime subclass for some nodes (one that misbehaves).
        consented: what participants are shown, when the initiator runs another strategy.
        frames: gets every frame the initiator received, ``(sender, frame)``.
    """
    events: list[str] = []
    task = "inprocess"

    async def scenario():
        async with a_relay(transport) as connect:
            scheduler._setup(task)
            package = TaskPackage.from_scheduler(scheduler, task,
                                                 strategy=(consented or strategy).describe())
            link = await connect(role="initiator", task=task, token=TOKEN)
            if frames is not None:
                recv = link.recv

                async def watched_recv():
                    frame = await recv()
                    frames.append((sender(frame), frame))
                    return frame

                link.recv = watched_recv
            aggregator = Aggregator(scheduler, package, link,
                                    checkpoint=Checkpoint(tmp_path / "models" / task),
                                    policy=RoundPolicy(join_timeout=20, join_grace=2,
                                                       upload_timeout=upload_timeout),
                                    strategy=strategy, on_event=events.append)

            async def take_part(node: str):
                NODE.set(node)
                joined = await connect(role="participant", task=task, token=TOKEN, node=node,
                                       wait=10)
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
            return result, dict(zip(nodes, outcomes, strict=True))

    result, outcomes = asyncio.run(asyncio.wait_for(scenario(), 50))
    return result, events, outcomes
