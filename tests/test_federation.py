"""Whole tasks across real processes: an in-process initiator with its embedded
relay on loopback, and ``fedmagic join`` participants, each with its own data."""

from __future__ import annotations

import concurrent.futures
import json
import signal
import subprocess
import sys
import threading
import time

import pytest
import torch

from conftest import port_is_free, wait_for
from fedmagic.errors import NotEnoughParticipants, UnsupportedTensor
from fedmagic.examples.digits_task import DigitsScheduler
from fedmagic.engine.launch import start_task
from fedmagic.wire.relay import EmbeddedRelay, Relay, RelayLimits
from faulty_digits import FaultyDigits, FlaggedDigits

pytestmark = pytest.mark.slow


def test_three_participants_reach_90_percent_on_the_digits(federation, monkeypatch):
    layout = federation.write_digits(3)
    for party in layout.nodes:
        federation.join(party.name, "digits")  # started before the task exists
    federation.ready()
    monkeypatch.chdir(layout.initiator.workdir)

    result = DigitsScheduler(min_clients=3, max_clients=3, name="demo_task", max_rounds=10,
                             merge_epochs=2).launch_task(task_id="digits", join_timeout=60)

    assert result.metrics["accuracy"] >= 0.90
    assert [row["round"] for row in result.history] == list(range(1, 11))
    assert all(row["participants"] == 3 for row in result.history)
    assert result.history[0]["samples"] == sum(party.train_size for party in layout.nodes)
    saved = torch.load(result.checkpoint / "model.pt", weights_only=True)
    assert set(saved) == set(DigitsScheduler(1, 1).make_model().state_dict())
    assert len(json.loads((result.checkpoint / "history.json").read_text())) == 10
    for party in layout.nodes:
        assert federation.wait(party.name) == 0, federation.output(party.name)
        assert "this node trained 10 rounds" in federation.output(party.name)
    assert port_is_free(federation.port)


def test_bad_updates_and_failed_verification_are_refused_while_the_task_goes_on(
        federation, monkeypatch):
    layout = federation.write_digits(4)
    federation.join("node-1", "faults")
    federation.join("node-2", "faults", fault="nan")
    federation.join("node-3", "faults", fault="shape")
    federation.join("node-4", "faults", fault="crash")
    federation.join("no-data", "faults", workdir=federation.root / "no-data")
    federation.ready()  # join_grace times their joining, not five torch imports at once
    monkeypatch.chdir(layout.initiator.workdir)
    events: list[str] = []

    result = FaultyDigits(min_clients=1, max_clients=4, name="demo_task", max_rounds=2,
                          merge_epochs=1).launch_task(task_id="faults", join_timeout=60,
                                                      join_grace=20, on_event=events.append)

    assert [row["participants"] for row in result.history] == [1, 1]
    nodes = result.participants
    assert nodes["node-1"].status == "uploaded"
    assert nodes["node-2"].status == "refused"
    assert "non-finite values (NaN or infinity) in fc1.weight" in nodes["node-2"].detail
    assert nodes["node-3"].status == "refused"
    assert "'fc2.bias' has shape (11,), expected (10,)" in nodes["node-3"].detail
    assert nodes["node-4"].status == "failed"
    assert "simulated failure in this node's training loop" in nodes["node-4"].detail
    assert 'in train\n    raise RuntimeError' in nodes["node-4"].traceback
    assert nodes["no-data"].status == "unverified"
    assert "DatasetVerify.run() returned False" in nodes["no-data"].detail
    assert "missing ['train-images-idx3-ubyte'" in nodes["no-data"].detail  # what it logged
    assert any("update from 'node-2' in round 1 refused" in line for line in events)
    assert federation.wait("node-1") == 0
    assert federation.wait("node-4") == 1
    assert "train() failed" in federation.output("node-4")
    assert federation.wait("no-data") == 1
    assert "data verification failed" in federation.output("no-data")


def test_round_completes_with_the_others_when_a_participant_is_killed_mid_round(
        federation, monkeypatch):
    layout = federation.write_digits(3)
    federation.join("node-1", "kill")
    federation.join("node-2", "kill")
    hanging = federation.join("node-3", "kill", fault="hang")
    federation.ready()  # all three in round 1, not whoever started within join_grace
    monkeypatch.chdir(layout.initiator.workdir)
    scheduler = FaultyDigits(min_clients=2, max_clients=3, name="demo_task", max_rounds=2,
                             calculation_timeout=120)

    with concurrent.futures.ThreadPoolExecutor(1) as pool:
        running = pool.submit(scheduler.launch_task, task_id="kill", join_timeout=60)
        assert wait_for((layout.nodes[2].workdir / "training.started").exists, 60)
        hanging.kill()
        result = running.result(timeout=60)

    assert [row["participants"] for row in result.history] == [2, 2]
    assert result.participants["node-3"].status == "dropped"
    assert result.history[0]["seconds"] < 60  # nobody waited out calculation_timeout


def test_too_few_participants_fails_clearly_and_releases_everyone(federation, monkeypatch):
    layout = federation.write_digits(1)
    federation.join("node-1", "few")
    # Started before the 6 s join_timeout begins: it times the joining, not a torch import
    federation.ready()
    monkeypatch.chdir(layout.initiator.workdir)

    with pytest.raises(NotEnoughParticipants) as failure:
        DigitsScheduler(min_clients=2, max_clients=3, name="demo_task",
                        max_rounds=2).launch_task(task_id="few", join_timeout=6)

    assert "only 1 of the 2 participants needed (min_clients)" in str(failure.value)
    assert "lower min_clients, or raise join_timeout" in str(failure.value)
    assert federation.wait("node-1", timeout=20) == 1
    assert "did not finish: only 1 of the 2 participants" in federation.output("node-1")
    assert port_is_free(federation.port)


def test_bool_tensor_in_state_dict_is_refused_before_round_one(federation, monkeypatch):
    monkeypatch.chdir(federation.root)

    with pytest.raises(UnsupportedTensor) as refusal:
        FlaggedDigits(min_clients=1, max_clients=1, max_rounds=1).launch_task(task_id="flags")

    assert str(refusal.value).startswith("state_dict()['active'] is a torch.bool tensor: "
                                         "FedAvg cannot average flags")
    assert port_is_free(federation.port)  # refused before any relay started


def test_a_participant_that_refuses_consent_or_has_a_wrong_token_is_left_out(
        federation, monkeypatch):
    layout = federation.write_digits(2)
    federation.join("node-1", "consent")
    federation.join("node-2", "consent", extra=())  # no --yes and no terminal: declines
    federation.join("intruder", "consent", workdir=federation.root / "intruder",
                    token="not-the-token")
    federation.ready()  # all three there within join_grace, whichever verifies first
    monkeypatch.chdir(layout.initiator.workdir)

    result = DigitsScheduler(min_clients=1, max_clients=3, name="demo_task",
                             max_rounds=1).launch_task(task_id="consent", join_timeout=60,
                                                       join_grace=3)

    assert result.history[0]["participants"] == 1
    assert result.participants["node-2"].status == "declined"
    assert "intruder" not in result.participants
    assert federation.wait("node-2") == 1
    assert "pass --yes to accept non-interactively" in federation.output("node-2")
    assert federation.wait("intruder") == 1
    assert "wrong join token for task 'consent'" in federation.output("intruder")


def test_a_task_started_in_the_background_stops_cleanly_after_the_current_round(
        federation, monkeypatch):
    layout = federation.write_digits(2)
    for party in layout.nodes:
        federation.join(party.name, "background")
    federation.ready()
    monkeypatch.chdir(layout.initiator.workdir)
    scheduler = DigitsScheduler(min_clients=2, max_clients=2, name="demo_task", max_rounds=200)

    run = start_task(scheduler, "background", join_timeout=60)
    assert not run.done()  # start_task returned while the task runs
    assert wait_for(lambda: len(run.history) >= 2, 60)
    run.stop()
    result = run.wait(60)

    assert 2 <= result.rounds < 200
    assert any("stopped by its author after round" in text for _, text in run.events)
    assert (result.checkpoint / "model.pt").is_file()
    for party in layout.nodes:
        assert federation.wait(party.name) == 0, federation.output(party.name)
    assert not [t for t in threading.enumerate() if t.name.startswith("fedmagic-")]
    assert port_is_free(federation.port)


def test_a_frozen_node_is_replaced_by_its_restarted_self_within_seconds(
        federation, monkeypatch):
    layout = federation.write_digits(2)
    federation.join("node-1", "frozen", fault="slow")  # 1.5 s a round: time to rejoin
    frozen = federation.join("node-2", "frozen", fault="slow")
    federation.ready()  # both in round 1: node-2 verified before it freezes
    monkeypatch.chdir(layout.initiator.workdir)
    # The relay drops a silent node after ping_interval + ping_timeout; made long here, only
    # its restarted self, presenting its session, can take its place, however long the
    # restarted process takes to start
    relay = EmbeddedRelay("127.0.0.1", federation.port,
                          Relay(limits=RelayLimits(ping_timeout=600))).start()
    run = start_task(FaultyDigits(min_clients=1, max_clients=2, name="demo_task", max_rounds=8,
                                  calculation_timeout=120), "frozen", relay=federation.url,
                     join_timeout=60)
    try:
        assert wait_for(lambda: any("round 1: training on" in t for _, t in run.events), 60)
        frozen.send_signal(signal.SIGSTOP)  # a silent network drop: no close, no pongs
        # Execute: the same node starts again in its own directory, with its session on disk
        federation.join("node-2", "frozen", fault="slow")
        federation.ready("node-2")  # from here on it is the relay's doing, not torch's import
        restarted_at = time.monotonic()
        assert wait_for(lambda: sum("node-2 verified its data" in t for _, t in run.events) == 2,
                        30)
        rejoined_after = time.monotonic() - restarted_at
        result = run.wait(120)
    finally:
        frozen.kill()
        frozen.wait(10)
        run.stop(now=True)
        relay.stop()

    assert rejoined_after < 15  # at once, not node_taken until the relay drops the frozen one
    assert result.history[0]["participants"] == 1  # round 1 did not wait for the frozen one
    assert result.history[-1]["participants"] == 2  # the restarted node took its place
    assert federation.wait("node-2") == 0, federation.output("node-2")


def test_a_relay_restarted_mid_round_costs_no_round_and_no_second_consent(
        federation, monkeypatch):
    layout = federation.write_digits(2)
    relay_command = [sys.executable, "-m", "fedmagic", "relay", "--port", str(federation.port)]

    def start_relay() -> subprocess.Popen:
        relay = subprocess.Popen(relay_command, env=federation.env, stdout=subprocess.PIPE,
                                 stderr=subprocess.DEVNULL, text=True)
        assert "listening on" in relay.stdout.readline()
        return relay

    relay = start_relay()
    for party in layout.nodes:
        federation.join(party.name, "restart", fault="slow")  # 1.5 s a round: time to kill
    federation.ready()
    monkeypatch.chdir(layout.initiator.workdir)
    run = start_task(FaultyDigits(min_clients=2, max_clients=2, name="demo_task", max_rounds=4),
                     "restart", relay=federation.url, join_timeout=60, reconnect_window=60)
    try:
        assert wait_for(lambda: any("round 2: training on" in t for _, t in run.events), 60)
        # Execute: the relay dies without a word, and its operator starts it again
        relay.kill()
        relay.wait(10)
        time.sleep(1)
        relay = start_relay()
        result = run.wait(120)
    finally:
        run.stop(now=True)
        relay.kill()
        relay.wait(10)

    events = [text for _, text in run.events]
    assert any("the relay connection was lost; the round runs again" in t for t in events)
    assert [row["round"] for row in result.history] == [1, 2, 3, 4]
    assert all(row["participants"] == 2 for row in result.history)
    for party in layout.nodes:
        assert federation.wait(party.name) == 0, federation.output(party.name)
        output = federation.output(party.name)
        assert output.count("task 'restart' runs FaultyDigits(") == 1  # consented once
        assert "back in the task" in output
