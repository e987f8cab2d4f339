"""``is_centralized=False`` across real processes: the digits task, each round aggregated
by an elected ``fedmagic join`` participant, one of which is killed while it aggregates."""

from __future__ import annotations

import os
import re
import signal

import pytest

from conftest import port_is_free, wait_for
from fedmagic.engine.launch import start_task
from faulty_digits import FaultyDigits

pytestmark = pytest.mark.slow


def test_an_elected_aggregator_killed_mid_round_costs_a_rerun_and_every_round_finishes(
        federation, monkeypatch):
    layout = federation.write_digits(3)
    for party in layout.nodes:
        federation.join(party.name, "elected", fault="slow")  # 1.5 s a round: time to kill
    federation.ready()
    monkeypatch.chdir(layout.initiator.workdir)
    run = start_task(FaultyDigits(min_clients=2, max_clients=3, name="demo_task", max_rounds=4,
                                  is_centralized=False), "elected", join_timeout=60)
    try:
        # Execute: SIGKILL round 2's aggregator while the round trains
        def elected_in_round_2() -> str | None:
            for _, text in run.events:
                found = re.match(r"round 2: training on .*; (\S+) aggregates", text)
                if found:
                    return found.group(1)
            return None

        assert wait_for(lambda: elected_in_round_2() is not None, 120), run.events
        victim = elected_in_round_2()
        os.kill(federation.processes[victim].pid, signal.SIGKILL)
        result = run.wait(180)
    finally:
        run.stop(now=True)

    events = [text for _, text in run.events]
    assert any(f"{victim}, elected to aggregate round 2, left; the round runs again with "
               "another aggregator" in text for text in events), events
    assert [row["round"] for row in result.history] == [1, 2, 3, 4]
    aggregators = [row["aggregator"] for row in result.history]
    assert victim not in aggregators[1:] and len(set(aggregators)) >= 2
    assert all(row["participants"] == 2 for row in result.history[1:])
    assert result.metrics["accuracy"] >= 0.5  # 4 short rounds of real training, aggregated
    survivors = [party.name for party in layout.nodes if party.name != victim]
    for node in survivors:
        assert federation.wait(node) == 0, federation.output(node)
        assert "elected to aggregate round" in federation.output(node) or \
            node not in aggregators
    assert port_is_free(federation.port)
