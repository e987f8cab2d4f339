"""The ``fedmagic`` command as a user runs it: relay, join, digits and demo."""

from __future__ import annotations

import asyncio
import os
import signal
import subprocess
import sys

import pytest

from conftest import free_port
from fedmagic.errors import ConnectionLost
from fedmagic.wire.link import Link

pytestmark = pytest.mark.slow


def fedmagic(*args: str, **kwargs) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-m", "fedmagic", *args], capture_output=True,
                          text=True, timeout=120, stdin=subprocess.DEVNULL, **kwargs)


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


def test_relay_on_a_busy_port_says_so():
    port = free_port()
    with subprocess.Popen([sys.executable, "-m", "fedmagic", "relay", "--port", str(port)],
                          stdout=subprocess.PIPE, text=True) as first:
        first.stdout.readline()
        second = fedmagic("relay", "--port", str(port))
        first.terminate()

    assert second.returncode == 1
    assert f"cannot listen on 127.0.0.1:{port}" in second.stderr


def test_join_without_a_token_says_where_to_get_one():
    result = fedmagic("join", "ws://127.0.0.1:9", "--task", "t",
                      env={"PATH": "/usr/bin:/bin", "HOME": "/tmp"})

    assert result.returncode == 2
    assert "pass --token (or set FEDMAGIC_TOKEN)" in result.stderr


def test_join_with_no_relay_listening_fails_clearly():
    result = fedmagic("join", f"ws://127.0.0.1:{free_port()}", "--task", "t", "--token", "x",
                      "--wait", "0")

    assert result.returncode == 1
    assert "cannot connect" in result.stderr
    assert "is the relay running at that address?" in result.stderr


def test_digits_writes_one_directory_per_party(tmp_path):
    result = fedmagic("digits", str(tmp_path), "--participants", "2", "--split", "by-label")

    assert result.returncode == 0, result.stderr
    assert "node-1:" in result.stdout and "node-2:" in result.stdout
    for party in ("initiator", "node-1", "node-2"):
        assert (tmp_path / party / "demo_task/data/MNIST/raw/t10k-images-idx3-ubyte").is_file()


def test_demo_runs_a_whole_task_on_one_machine(tmp_path):
    result = fedmagic("demo", "--participants", "2", "--rounds", "2", "--workdir", str(tmp_path))

    assert result.returncode == 0, result.stdout + result.stderr
    assert "round 2/2: averaged 2 updates" in result.stderr
    assert "final accuracy" in result.stdout
    assert "node-1: exit 0" in result.stdout and "node-2: exit 0" in result.stdout
    assert (tmp_path / "initiator/models/demo_task/model.pt").is_file()


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
