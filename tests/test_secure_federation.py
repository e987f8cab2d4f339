"""Secure aggregation across real processes: the digits task under SecureAggregation, with
one ``fedmagic join`` SIGKILLed before it uploads and one after, in the same round."""

from __future__ import annotations

import os
import signal
import time

import pytest

from conftest import port_is_free, wait_for
from faulty_digits import FaultyDigits
from fedmagic.engine.launch import start_task
from fedmagic.engine.state import NodeStatus
from fedmagic.strategies import SecureAggregation

pytestmark = pytest.mark.slow


def test_nodes_killed_before_and_after_uploading_cost_the_round_one_update_and_no_more(
        federation, monkeypatch):
    layout = federation.write_digits(5)
    slow, fast = layout.nodes[:3], layout.nodes[3:]
    for party in slow:
        federation.join(party.name, "secure", fault="slow")  # 1.5 s more a round
    for party in fast:
        federation.join(party.name, "secure")
    federation.ready()
    before, after = slow[0].name, fast[0].name
    monkeypatch.chdir(layout.initiator.workdir)
    run = start_task(FaultyDigits(min_clients=3, max_clients=5, name="demo_task", max_rounds=3),
                     "secure", join_timeout=60, strategy=SecureAggregation())
    try:
        assert wait_for(lambda: any(text.startswith("round 2: training on")
                                    for _, text in run.events), 180), run.events
        # Execute: once round 2's keys are shared (milliseconds in), while the slow ones train
        time.sleep(0.5)
        os.kill(federation.processes[before].pid, signal.SIGKILL)
        fast_one = run.participants[after]
        assert wait_for(lambda: fast_one.round == 2 and fast_one.status == NodeStatus.UPLOADED,
                        60), fast_one
        os.kill(federation.processes[after].pid, signal.SIGKILL)
        result = run.wait(180)
    finally:
        run.stop(now=True)

    events = [text for _, text in run.events]
    assert [row["participants"] for row in result.history] == [5, 4, 3], result.history
    revealed = next(text for text in events if text.startswith("round 2: the secure sum"))
    assert f"{before}, which left before" in revealed
    assert f"{after}, which left before revealing shares; its update is in the sum" in revealed
    # 3 short rounds of real training on 5 small shares: plain FedAvg reaches 44% here
    assert result.metrics["accuracy"] >= 0.3
    for party in layout.nodes:
        if party.name not in (before, after):
            assert federation.wait(party.name) == 0, federation.output(party.name)
    assert port_is_free(federation.port)
