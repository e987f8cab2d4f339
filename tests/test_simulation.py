"""Simulation: the same scheduler, unchanged, with virtual participants folded on a worker."""

from __future__ import annotations

import pytest
import torch

from fedmagic.engine.simulation import Simulation
from fedmagic.errors import ConfigurationError
from fedmagic.strategies import DifferentialPrivacy, FedAdam, FedAvg, SecureAggregation
from inprocess import run_over_relay
from shared_data import SharedData, shares

pytestmark = pytest.mark.timeout(120)


def simulated(tmp_path, monkeypatch, participants: int, strategy, rounds: int = 3, **options):
    tmp_path.mkdir(parents=True, exist_ok=True)
    monkeypatch.chdir(tmp_path)
    scheduler = SharedData(min_clients=1, max_clients=participants, max_rounds=rounds,
                           participants=participants, **options)
    events: list[str] = []
    simulation = Simulation(scheduler, participants, task_id="simulated", seed=5,
                            strategy=strategy, on_event=events.append)
    result = simulation.run()
    return result, scheduler.state_dict(), events, simulation


@pytest.mark.parametrize("make", [FedAvg, lambda: FedAdam(eta=0.1)], ids=["FedAvg", "FedAdam"])
def test_a_simulation_reaches_the_relay_paths_model_on_the_same_shares(
        tmp_path, monkeypatch, make):
    relay_scheduler = SharedData(min_clients=3, max_clients=3, max_rounds=3, participants=3)
    relayed, _, _ = run_over_relay(tmp_path / "relay", relay_scheduler, ["a", "b", "c"],
                                   strategy=make())
    result, state, _, _ = simulated(tmp_path / "sim", monkeypatch, 3, make())

    assert [row["participants"] for row in result.history] == [3, 3, 3]
    for name, tensor in relay_scheduler.state_dict().items():
        torch.testing.assert_close(state[name], tensor, rtol=1e-5, atol=1e-6)
    assert result.metrics["accuracy"] == pytest.approx(relayed.metrics["accuracy"])


def test_each_virtual_participants_share_is_said_before_the_first_round(tmp_path, monkeypatch):
    _, _, events, simulation = simulated(tmp_path, monkeypatch, 30, FedAvg(), rounds=1)

    assert events[0].startswith("30 participants, iid (seed 5): 90 examples, 3 to 3 each")
    assert events.index(events[0]) < next(i for i, e in enumerate(events) if "round 1" in e)
    assert simulation.share_out().sizes == [len(share) for share in shares(30)]


def test_a_virtual_participant_whose_train_raises_is_reported_and_the_round_goes_on(
        tmp_path, monkeypatch):
    # the example at index 7 sits in exactly one share; that participant fails every round
    result, _, events, simulation = simulated(tmp_path, monkeypatch, 10, FedAvg(), rounds=2,
                                              failing="7")

    failed = [o for o in simulation.outcomes.values() if o.status == "failed"]
    assert len(failed) == 1 and "simulated failure on the share" in failed[0].detail
    assert "RuntimeError" in failed[0].traceback
    assert [row["participants"] for row in result.history] == [9, 9]
    assert any(f"{failed[0].node} train() failed" in event for event in events)


def test_differential_privacy_runs_on_the_folded_partial_sums(tmp_path, monkeypatch):
    privacy = DifferentialPrivacy(clip=0.1, noise_multiplier=1.0, sampling=0.5)
    result, _, _, _ = simulated(tmp_path, monkeypatch, 40, privacy, rounds=2)

    assert 0 < result.history[0]["epsilon"] < result.history[1]["epsilon"]
    assert all(0 < row["drawn"] < 40 for row in result.history)


def test_secure_aggregation_is_refused_rather_than_pretended(tmp_path):
    with pytest.raises(ConfigurationError, match="would hide nothing from anyone"):
        Simulation(SharedData(min_clients=3, max_clients=3), 3, task_id="refused",
                   strategy=SecureAggregation())
