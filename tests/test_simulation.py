"""Simulation: the same scheduler, unchanged, with virtual participants folded on a worker."""

from __future__ import annotations

import contextlib
import os
import re
import signal
import subprocess
import sys
import threading
import time
from pathlib import Path
from typing import Iterator

import pytest
import torch

from fedmagic.engine.dask_workers import balance, pack_round, unpack_round
from fedmagic.engine.progress import RoundProgress
from fedmagic.engine.simulation import Simulation
from fedmagic.engine.state import NodeStatus
from fedmagic.engine.virtual import Outcome, WorkerRound
from fedmagic.errors import CodecError, ConfigurationError
from fedmagic.strategies import (DifferentialPrivacy, FedAdam, FedAvg, FedMedian,
                                 SecureAggregation)
from fedmagic.strategies.aggregate import Partial
from inprocess import run_over_relay
from shared_data import SharedData, shares

pytestmark = pytest.mark.timeout(120)


def simulated(tmp_path, monkeypatch, participants: int, strategy, rounds: int = 3,
              engine: str = "local", on_event_too=None, **options):
    tmp_path.mkdir(parents=True, exist_ok=True)
    monkeypatch.chdir(tmp_path)
    scheduler = SharedData(min_clients=1, max_clients=participants, max_rounds=rounds,
                           participants=participants, **options)
    events: list[str] = []

    def on_event(event: str) -> None:
        events.append(event)
        if on_event_too is not None:
            on_event_too(event)

    simulation = Simulation(scheduler, participants, task_id="simulated", seed=5,
                            strategy=strategy, engine=engine, on_event=on_event,
                            **({"workers": 2} if engine == "dask" else {}))
    result = simulation.run()
    return result, scheduler.state_dict(), events, simulation


@pytest.mark.parametrize("engine", ["local", pytest.param("dask", marks=pytest.mark.slow)])
@pytest.mark.parametrize("make", [FedAvg, lambda: FedAdam(eta=0.1)], ids=["FedAvg", "FedAdam"])
def test_a_simulation_reaches_the_relay_paths_model_on_the_same_shares(
        tmp_path, monkeypatch, make, engine):
    relay_scheduler = SharedData(min_clients=3, max_clients=3, max_rounds=3, participants=3)
    relayed, _, _ = run_over_relay(tmp_path / "relay", relay_scheduler, ["a", "b", "c"],
                                   strategy=make())
    result, state, _, _ = simulated(tmp_path / "sim", monkeypatch, 3, make(), engine=engine)

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
    assert any(f"{failed[0].node}: train() failed" in event for event in events)


def test_differential_privacy_runs_on_the_folded_partial_sums(tmp_path, monkeypatch):
    privacy = DifferentialPrivacy(clip=0.1, noise_multiplier=1.0, sampling=0.5)
    result, _, _, _ = simulated(tmp_path, monkeypatch, 40, privacy, rounds=2)

    assert 0 < result.history[0]["epsilon"] < result.history[1]["epsilon"]
    assert all(0 < row["drawn"] < 40 for row in result.history)


def test_secure_aggregation_is_refused_rather_than_pretended(tmp_path):
    with pytest.raises(ConfigurationError, match="would hide nothing from anyone"):
        Simulation(SharedData(min_clients=3, max_clients=3), 3, task_id="refused",
                   strategy=SecureAggregation())


@pytest.mark.slow
def test_a_dask_worker_killed_mid_round_costs_its_participants_not_the_task(
        tmp_path, monkeypatch):
    tickets = tmp_path / "tickets"
    tickets.mkdir()
    killed: list[int] = []

    def after_round_1(event: str) -> None:
        if event.startswith("round 1/"):
            (tickets / "hold").touch()  # the first participant to train in round 2 takes it
            threading.Thread(target=kill_the_holder, daemon=True).start()

    def kill_the_holder() -> None:
        for _ in range(1200):  # bounded: two minutes
            held = list(tickets.glob("held-*"))
            if held:
                pid = int(held[0].name.removeprefix("held-"))
                os.kill(pid, signal.SIGKILL)
                killed.append(pid)
                return
            time.sleep(0.1)

    result, _, events, simulation = simulated(
        tmp_path / "run", monkeypatch, 12, FedAvg(), rounds=3, hold=str(tickets),
        engine="dask", on_event_too=after_round_1)

    assert killed, "no participant ever held its worker in round 2"
    rows = [row["participants"] for row in result.history]
    [lost] = [event for event in events if event.startswith("round 2: ")]
    said = re.match(r"round 2: (\d+) virtual participants \(virtual-\d+, .* and \d+ more\): "
                    r"lost with its worker: its Dask worker tcp://[\d.:]+ died mid-round", lost)
    assert said, lost
    assert rows[0] == 12 and 0 < rows[1] < 12 and rows[1] + int(said[1]) == 12
    assert rows[2] == 12, "the restarted worker trains its participants again from round 3"
    assert all(o.status == NodeStatus.UPLOADED for o in simulation.outcomes.values())
    assert result.rounds == 3


def test_a_strategy_keeping_every_update_is_refused_when_they_would_not_fit(tmp_path):
    simulation = Simulation(SharedData(min_clients=1, max_clients=10, max_rounds=1), 10,
                            task_id="median", strategy=FedMedian(), update_memory=100)

    with pytest.raises(ConfigurationError, match=r"FedMedian holds every update of a round at "
                       r"once: 10 updates of 60 bytes need 600 bytes; simulate fewer a round"):
        simulation.run()


def test_a_rounds_participants_are_shared_out_among_workers_by_samples():
    samples = {"a": 50, "b": 40, "c": 30, "d": 20, "e": 10, "f": 0}

    parts = balance(list(samples), samples, 2)

    assert sorted(sum(parts, [])) == sorted(samples)
    assert sorted(sum(samples[node] for node in part) for part in parts) == [70, 80]


def test_a_workers_round_travels_as_frames_and_msgpack_and_comes_back_whole():
    reference = {"w": torch.zeros(2, 3), "steps": torch.zeros((), dtype=torch.int64)}
    sums = {"w": torch.arange(6.0).reshape(2, 3), "steps": torch.tensor(4.0, dtype=torch.float64)}
    done = WorkerRound(Partial(sums, 2.5, 2), [
        Outcome("virtual-1", NodeStatus.UPLOADED, 3, 0.25),
        Outcome("virtual-2", NodeStatus.FAILED, 2, 0.5, "train() failed: boom", "Traceback"),
    ])

    back = unpack_round(pack_round(done), reference)

    torch.testing.assert_close(back.partial.sums, sums)
    assert (back.partial.weight, back.partial.count) == (2.5, 2)
    assert back.outcomes == done.outcomes


def test_a_rounds_progress_counts_by_status_names_the_slowest_and_groups_who_was_left_out():
    progress = RoundProgress(4, selected=10)
    progress.add([Outcome(f"virtual-{i}", NodeStatus.REFUSED, 0, 0.0, "empty share")
                  for i in (8, 9)])
    progress.add([Outcome(f"virtual-{i}", NodeStatus.UPLOADED, i, i / 10) for i in range(1, 8)])

    shown = progress.summary()

    assert (shown["done"], shown["selected"]) == (9, 10)
    # in the statuses' own order, whichever came in first
    assert list(shown["counts"].items()) == [("uploaded", 7), ("refused", 2)]
    assert [node for node, _ in shown["slowest"]] == [f"virtual-{i}" for i in (7, 6, 5, 4, 3)]
    assert shown["left_out"] == [["empty share", 2, ["virtual-8", "virtual-9"]]]
    # 1 to 7 samples in 12 bins of 0.5: every other bin, the highest value in the last
    assert shown["samples"]["counts"] == [1, 0, 1, 0, 1, 0, 1, 0, 1, 0, 1, 1]
    assert shown["samples"]["edges"][0] == 1 and shown["samples"]["edges"][-1] == 7


def test_a_keeping_folds_updates_travel_whole_and_are_checked_against_the_model():
    reference = {"w": torch.zeros(2, 3)}
    kept = WorkerRound(Partial(weight=3.0, count=2, kept=[
        ({"w": torch.ones(2, 3)}, 1.0), ({"w": torch.full((2, 3), 2.0)}, 2.0)]))

    back = unpack_round(pack_round(kept), reference)

    assert [weight for _, weight in back.partial.kept] == [1.0, 2.0]
    torch.testing.assert_close(back.partial.kept[1][0]["w"], torch.full((2, 3), 2.0))
    with pytest.raises(CodecError, match="missing tensors"):
        unpack_round(pack_round(kept), {"w": torch.zeros(2, 3), "b": torch.zeros(3)})


@pytest.mark.slow
def test_a_dask_address_nobody_answers_at_is_refused_saying_what_to_start(tmp_path, monkeypatch):
    import dask
    from conftest import free_port

    monkeypatch.chdir(tmp_path)
    simulation = Simulation(SharedData(min_clients=1, max_clients=4, max_rounds=1), 4,
                            task_id="nowhere", address=f"tcp://127.0.0.1:{free_port()}")

    with dask.config.set({"distributed.comm.timeouts.connect": "3s"}), \
            pytest.raises(ConfigurationError, match=r"no Dask scheduler answered there .*"
                          r"start one \(dask scheduler, then dask worker ADDRESS"):
        simulation.run()


@contextlib.contextmanager
def a_dask_cluster(workdir: Path, *workers: list[str]) -> Iterator[str]:
    """``dask scheduler`` and one ``dask worker`` per argument list, as a user starts them.

    Yields the scheduler's address once every worker has registered with it.
    """
    import distributed
    from conftest import START_TIMEOUT, TASKS, free_port

    address = f"tcp://127.0.0.1:{free_port()}"
    env = {**os.environ, "PYTHONPATH": os.pathsep.join([str(TASKS), os.environ["PYTHONPATH"]])}
    dask = [sys.executable, "-m", "dask"]
    started = [subprocess.Popen([*dask, "scheduler", "--host", "127.0.0.1", "--port",
                                 address.rsplit(":", 1)[1], "--no-dashboard"],
                                cwd=workdir, env=env, stderr=subprocess.DEVNULL)]
    try:
        started += [subprocess.Popen([*dask, "worker", address, "--nthreads", "1",
                                      "--no-dashboard", *arguments],
                                     cwd=workdir, env=env, stderr=subprocess.DEVNULL)
                    for arguments in workers]
        with distributed.Client(address, timeout=START_TIMEOUT, set_as_default=False) as client:
            client.wait_for_workers(len(workers), timeout=START_TIMEOUT)
        yield address
    finally:
        for process in reversed(started):
            process.terminate()
        for process in started:
            try:
                process.wait(timeout=30)
            except subprocess.TimeoutExpired:
                process.kill()
                process.wait()


@pytest.mark.slow
@pytest.mark.timeout(600)
def test_a_simulation_runs_on_the_users_dask_cluster_on_the_workers_with_its_resources(
        tmp_path, monkeypatch):
    # A deterministic task: the user's cluster must reach the model one worker here reaches
    _, local, _, _ = simulated(tmp_path / "here", monkeypatch, 6, FedAvg(), rounds=2)
    cluster = tmp_path / "cluster"
    cluster.mkdir()
    with a_dask_cluster(cluster, ["--resources", "GPU=1"], []) as address:
        monkeypatch.chdir(cluster)
        scheduler = SharedData(min_clients=1, max_clients=6, max_rounds=2, participants=6)
        events: list[str] = []
        result = Simulation(scheduler, 6, task_id="clustered", seed=5, strategy=FedAvg(),
                            address=address, resources={"GPU": 1},
                            on_event=events.append).run()

        assert f"Dask cluster on {address}: 1 worker with GPU=1, ready in" in "\n".join(events)
        assert [row["participants"] for row in result.history] == [6, 6]
        for name, tensor in local.items():
            torch.testing.assert_close(scheduler.state_dict()[name], tensor)

        needy = Simulation(SharedData(min_clients=1, max_clients=6, max_rounds=1,
                                      participants=6), 6, task_id="needy", address=address,
                           resources={"GPU": 2})
        with pytest.raises(RuntimeError, match=r"has no workers with resources GPU=2; start some "
                           r"\(dask worker ADDRESS --resources 'GPU=2'\)"):
            needy.run()


@pytest.mark.parametrize("simulate, said", [
    (True, "pass how many virtual participants"),
    (0, "pass how many virtual participants"),
    ({"partition": "iid"}, "with 'participants' in it"),
    ({"participants": 3, "nope": 1}, "unexpected keyword argument 'nope'"),
])
def test_launch_task_refuses_a_simulate_it_cannot_run(simulate, said):
    from fedmagic.engine.launch import start_task

    with pytest.raises(ConfigurationError, match=said):
        start_task(SharedData(min_clients=1, max_clients=3, max_rounds=1), "refused",
                   simulate=simulate)


def test_the_command_and_the_magic_take_the_same_simulation_options():
    import argparse

    from fedmagic.engine.simulation_options import OPTIONS, PARTITIONS, add_options, settings
    from fedmagic.notebook.magics import FedMagics
    from fedmagic.partition import SCHEMES

    assert PARTITIONS == SCHEMES
    command = argparse.ArgumentParser()
    add_options(command)
    magic = FedMagics.fedavg_simulate.parser  # type: ignore[attr-defined]
    line = ["--partition", "dirichlet", "--alpha", "0.3", "--engine", "local", "--seed", "4"]
    assert settings(command.parse_args(line)) == settings(magic.parse_args(["10", *line])) == {
        "partition": "dirichlet", "alpha": 0.3, "seed": 4, "per_round": None, "engine": "local"}
    flags = [action.option_strings for action in magic._actions if action.option_strings]
    assert flags[-len(OPTIONS):] == [[flag] for flag, _ in OPTIONS]
    on_a_cluster = ["--address", "tcp://10.0.0.1:8786", "--resources", "GPU=1 MEMORY=4e9"]
    assert settings(command.parse_args(on_a_cluster)) == {
        "partition": "iid", "alpha": 0.5, "seed": 0, "per_round": None, "engine": "dask",
        "address": "tcp://10.0.0.1:8786", "workers": None,
        "resources": {"GPU": 1.0, "MEMORY": 4e9}}


@pytest.mark.parametrize("given", ["GPU", "GPU=", "GPU=0", "=1", "GPU=nan", ""])
def test_a_resource_that_is_no_name_and_positive_amount_is_refused_saying_how_to_write_one(
        given):
    import argparse

    from fedmagic.engine.simulation_options import resources

    with pytest.raises(argparse.ArgumentTypeError, match=r"e\.g\. GPU=1"):
        resources(given)
