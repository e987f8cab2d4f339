"""The ``fedmagic`` command as a user runs it: relay, join, digits and demo."""

from __future__ import annotations

import asyncio
import json
import os
import re
import signal
import subprocess
import sys
from pathlib import Path
from typing import Any

import pytest

from conftest import START_TIMEOUT, free_port
from fedmagic.cli import main
from fedmagic.errors import ConnectionLost
from fedmagic.wire.link import Link


def fedmagic(*args: str, timeout: float = 120, **kwargs) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-m", "fedmagic", *args], capture_output=True,
                          text=True, timeout=timeout, stdin=subprocess.DEVNULL, **kwargs)


def demo(workdir: Path, *args: str) -> tuple[subprocess.CompletedProcess, dict[str, Any]]:
    """Run ``fedmagic demo`` in ``workdir`` to the end; what it printed, and its report."""
    # Four processes importing torch at once, on a machine running other tests: seconds each;
    # a demo takes 15 to 30 s, and only a broken one waits this out.
    result = fedmagic("demo", "--workdir", str(workdir), *args, timeout=START_TIMEOUT)
    assert result.returncode == 0, result.stdout + result.stderr
    report = workdir / "initiator/models/demo_task/report.json"
    return result, json.loads(report.read_text())


@pytest.mark.slow
def test_relay_serves_until_sigterm_then_closes_every_connection():
    port = free_port()
    relay = subprocess.Popen([sys.executable, "-m", "fedmagic", "relay", "--port", str(port)],
                             stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    try:
        assert relay.stdout.readline().startswith(f"fedmagic relay listening on "
                                                  f"ws://127.0.0.1:{port}")

        async def initiator_sees_the_relay_close() -> str:
            link = await Link.open(f"ws://127.0.0.1:{port}", role="initiator", task="t",
                                   token="secret")
            relay.send_signal(signal.SIGTERM)
            with pytest.raises(ConnectionLost) as lost:
                await asyncio.wait_for(link.recv(), 10)
            return str(lost.value)

        message = asyncio.run(initiator_sees_the_relay_close())
        assert relay.wait(timeout=20) == 0
    finally:
        relay.kill()
    assert "closed with code 1001" in message
    assert "fedmagic relay stopped" in relay.stdout.read()


@pytest.mark.slow
def test_relay_on_a_busy_port_says_so():
    port = free_port()
    with subprocess.Popen([sys.executable, "-m", "fedmagic", "relay", "--port", str(port)],
                          stdout=subprocess.PIPE, text=True) as first:
        first.stdout.readline()
        second = fedmagic("relay", "--port", str(port))
        first.terminate()

    assert second.returncode == 1
    assert f"cannot listen on 127.0.0.1:{port}" in second.stderr


@pytest.mark.slow
def test_join_without_a_token_says_where_to_get_one():
    result = fedmagic("join", "ws://127.0.0.1:9", "--task", "t",
                      env={"PATH": "/usr/bin:/bin", "HOME": "/tmp"})

    assert result.returncode == 2
    assert "pass --token (or set FEDMAGIC_TOKEN)" in result.stderr


@pytest.mark.slow
def test_join_with_no_relay_listening_fails_clearly():
    result = fedmagic("join", f"ws://127.0.0.1:{free_port()}", "--task", "t", "--token", "x",
                      "--wait", "0")

    assert result.returncode == 1
    assert "cannot connect" in result.stderr
    assert "is the relay running at that address?" in result.stderr


@pytest.mark.slow
def test_digits_writes_one_directory_per_party(tmp_path):
    result = fedmagic("digits", str(tmp_path), "--participants", "2", "--split", "by-label")

    assert result.returncode == 0, result.stderr
    assert "node-1:" in result.stdout and "node-2:" in result.stdout
    for party in ("initiator", "node-1", "node-2"):
        assert (tmp_path / party / "demo_task/data/MNIST/raw/t10k-images-idx3-ubyte").is_file()


@pytest.mark.slow
def test_demo_runs_a_whole_task_on_one_machine(tmp_path):
    result, report = demo(tmp_path, "--participants", "2", "--rounds", "2")

    assert "round 2/2: averaged 2 updates" in result.stderr
    assert "final accuracy" in result.stdout
    assert "node-1: exit 0" in result.stdout and "node-2: exit 0" in result.stdout
    assert (tmp_path / "initiator/models/demo_task/model.pt").is_file()
    assert report["strategy"]["name"] == "FedAvg" and report["rounds"] == 2


@pytest.mark.slow
def test_demo_with_a_strategy_runs_it_and_reports_it(tmp_path):
    result, report = demo(tmp_path, "--strategy", "fedprox", "--rounds", "2")

    assert "fedprox" in result.stdout.splitlines()[0]
    assert "strategy FedProx(" in result.stderr  # what participants consented to
    assert "final accuracy" in result.stdout
    assert report["strategy"]["name"] == "FedProx" and report["rounds"] == 2
    assert all(f"node-{n}: exit 0" in result.stdout for n in (1, 2, 3))


@pytest.mark.slow
def test_demo_fedsgd_runs_the_full_batch_variant_of_the_digits_task(tmp_path):
    result, report = demo(tmp_path, "--fedsgd", "--rounds", "3")

    assert "FedSGD" in result.stdout.splitlines()[0]
    assert "final accuracy" in result.stdout
    assert [row["round"] for row in report["history"]] == [1, 2, 3]
    join_log = (tmp_path / "node-1/join.log").read_text()
    assert "runs DigitsFedSGD(" in join_log  # the class each participant rebuilt
    assert "learning_rate=0.5, momentum=0.0" in join_log


@pytest.mark.slow
def test_demo_decentralized_has_a_participant_aggregate_each_round(tmp_path):
    result, report = demo(tmp_path, "--decentralized", "--rounds", "3")

    assert "final accuracy" in result.stdout
    # Each round, one of the round's participants in turn (a late joiner may miss round 1)
    aggregators = [row.get("aggregator") for row in report["history"]]
    assert len(aggregators) == 3 and set(aggregators) <= {"node-1", "node-2", "node-3"}
    assert "aggregated by node-" in result.stderr
    assert "is_centralized=False" in (tmp_path / "node-1/join.log").read_text()


@pytest.mark.slow
def test_demo_with_dp_epsilon_spends_no_more_than_it_and_says_what_participants_accepted(
        tmp_path):
    result, report = demo(tmp_path, "--dp-epsilon", "8", "--rounds", "2")

    assert "differential privacy, epsilon 8" in result.stdout.splitlines()[0]
    spent = re.search(r"epsilon ([\d.]+) spent at delta 1e-05", result.stdout)
    assert spent and 0 < float(spent.group(1)) <= 8, result.stdout
    assert report["strategy"]["name"] == "DifferentialPrivacy"
    assert report["strategy"]["target_epsilon"] == 8.0 and report["strategy"]["rounds"] == 2
    assert [row["epsilon"] for row in report["history"]][-1] == pytest.approx(
        float(spent.group(1)), rel=1e-2)
    # each data owner read the guarantee before accepting
    join_log = (tmp_path / "node-1/join.log").read_text()
    assert "privacy: differential privacy: epsilon at most 8 at delta 1e-05" in join_log


@pytest.mark.slow
def test_demo_with_secure_aggregation_reveals_only_sums_and_says_so_before_consent(tmp_path):
    result, report = demo(tmp_path, "--secure-aggregation", "--rounds", "2")

    assert "secure aggregation" in result.stdout.splitlines()[0]
    assert "the initiator saw 2 rounds' sums of 3 masked updates, revealed with threshold " \
           "t=2, and never one update" in result.stdout
    assert float(re.search(r"final accuracy ([\d.]+)%", result.stdout).group(1)) > 50
    assert report["strategy"]["name"] == "SecureAggregation"
    assert all(row["threshold"] == 2 for row in report["history"])
    join_log = (tmp_path / "node-1/join.log").read_text()
    assert "privacy: secure aggregation (SecAgg+): the initiator and the relay see" in join_log


@pytest.mark.slow
def test_demo_with_secure_aggregation_and_dp_epsilon_has_the_participants_add_the_noise(
        tmp_path):
    result, report = demo(tmp_path, "--secure-aggregation", "--dp-epsilon", "8",
                          "--rounds", "2")

    spent = re.search(r"epsilon ([\d.]+) spent at delta 1e-05", result.stdout)
    assert spent and 0 < float(spent.group(1)) <= 8, result.stdout
    assert "added by the participants" in result.stdout
    assert report["strategy"]["strategy"]["name"] == "DifferentialPrivacy"
    join_log = (tmp_path / "node-1/join.log").read_text()
    assert "added by the participants before masking" in join_log


@pytest.mark.parametrize("arguments, message", [
    (["--dp-epsilon", "0"], "--dp-epsilon must be above 0, not 0"),
    (["--dp-epsilon", "3", "--decentralized"], "the elected participant would see the updates"),
    (["--secure-aggregation", "--decentralized"],
     "the elected participant would receive the updates instead"),
    (["--secure-aggregation", "--participants", "2"],
     "--strategy fedavg --secure-aggregation needs 3 participants every round: pass "
     "--participants 3 or more"),
    (["--secure-aggregation", "--strategy", "median"],
     "needs every update in the clear; secure aggregation reveals their sum"),
])
def test_demo_refuses_a_privacy_it_cannot_give_before_anything_starts(
        tmp_path, capsys, arguments, message):
    code = main(["demo", *arguments, "--workdir", str(tmp_path / "demo")])

    assert code == 2 and message in capsys.readouterr().err
    assert not (tmp_path / "demo").exists()


def test_demo_refuses_an_unknown_strategy_and_lists_the_names(capsys):
    with pytest.raises(SystemExit) as refused:
        main(["demo", "--strategy", "fedfoo"])

    assert refused.value.code == 2
    error = capsys.readouterr().err
    assert "argument --strategy: invalid choice: 'fedfoo'" in error
    assert "'fedadam'" in error and "'krum'" in error


def test_demo_refuses_krum_with_too_few_participants_before_starting_any(tmp_path, capsys):
    code = main(["demo", "--strategy", "krum", "--participants", "3",
                 "--workdir", str(tmp_path)])

    assert code == 2
    assert capsys.readouterr().err == (
        "fedmagic demo: --strategy krum (Krum(f=1)) needs more than 2f+2 = 4 updates every "
        "round: pass --participants 5 or more\n")
    assert list(tmp_path.iterdir()) == []  # no data written, no process started


@pytest.mark.slow
def test_a_script_whose_task_fails_ends_with_one_clear_message_not_fedmagics_internals(
        tmp_path):
    script = tmp_path / "lonely.py"
    script.write_text(
        "import torch\n"
        "from fedmagic import FedAvgScheduler\n\n"
        "class Lonely(FedAvgScheduler):\n"
        "    def make_model(self): return torch.nn.Linear(2, 1)\n"
        "    def make_train_dataloader(self): return []\n"
        "    def make_test_dataloader(self): return []\n"
        "    def state_dict(self): return self.model.state_dict()\n"
        "    def load_state_dict(self, state): self.model.load_state_dict(state)\n"
        "    def train(self): pass\n"
        "    def test(self): return {}\n\n"
        "Lonely(min_clients=2, max_clients=2, max_rounds=1).launch_task(\n"
        "    task_id='lonely', join_timeout=1)\n")

    result = subprocess.run([sys.executable, str(script)], capture_output=True, text=True,
                            cwd=tmp_path, timeout=120,
                            env={**os.environ, "FEDMAGIC_PORT": str(free_port())})

    assert result.returncode == 1
    traceback = result.stderr.split("Traceback (most recent call last):", 1)[1]
    assert len(traceback.strip().splitlines()) <= 6, traceback
    assert traceback.strip().endswith(
        "NotEnoughParticipants: task 'lonely' failed: only 0 of the 2 participants needed "
        "(min_clients) joined and verified their data within 1 s; start more participants, "
        "lower min_clients, or raise join_timeout")


@pytest.mark.slow
def test_simulate_shares_the_digits_out_says_how_and_trains_them_all(tmp_path):
    result = fedmagic("simulate", "--participants", "20", "--partition", "by-label",
                      "--rounds", "2", "--workdir", str(tmp_path), timeout=START_TIMEOUT)

    assert result.returncode == 0, result.stdout + result.stderr
    lines = result.stdout.splitlines()
    assert lines[0].startswith("20 participants, by-label (seed 0): 1438 examples")
    assert "round 2/2: averaged 20 of 20 virtual participants' updates" in result.stdout
    assert re.search(r"final accuracy [\d.]+% after 2 rounds with 20 virtual participants",
                     result.stdout)
    history = json.loads((tmp_path / "node-1/models/demo_task-simulated/history.json").read_text())
    assert [row["participants"] for row in history] == [20, 20]
