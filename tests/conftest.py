"""Shared fixtures: a federation of real participant processes on loopback."""

from __future__ import annotations

import os
import secrets
import socket
import subprocess
import sys
import time
from pathlib import Path

import pytest

from fedmagic.digits import Layout, write_partitions

TASKS = Path(__file__).with_name("tasks")
sys.path.insert(0, str(TASKS))  # task modules the tests launch as initiator

# Child processes (kernels, participants, Jupyter servers) import this tree's fedmagic too,
# not whichever copy was installed last; the installed wheel still brings the labextension.
REPO = Path(__file__).resolve().parents[1]
os.environ["PYTHONPATH"] = os.pathsep.join(
    filter(None, [str(REPO), os.environ.get("PYTHONPATH")]))


def free_port() -> int:
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        return probe.getsockname()[1]


#: What ``fedmagic join`` prints once it has imported torch, torchvision and the runtime, just
#: before it first connects: a process that said it is started; what is left is the network.
JOIN_READY = "waiting up to "
#: How long a process may take to start: a Python importing torch takes seconds on a loaded
#: machine, several at once longer. Generous, since only a broken start waits it out.
START_TIMEOUT = 240.0


def port_is_free(port: int) -> bool:
    """Whether nothing listens on ``port`` (closed connections may linger in TIME_WAIT)."""
    with socket.socket() as probe:
        probe.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        try:
            probe.bind(("127.0.0.1", port))
        except OSError:
            return False
        return True


class Federation:
    """Digits data on disk, an embedded relay's port and token, and participant processes.

    The initiator runs in the test's own process (``launch_task`` finds the
    port and token in the environment); participants are real ``fedmagic
    join`` processes, each in its own directory.
    """

    def __init__(self, root: Path, monkeypatch: pytest.MonkeyPatch) -> None:
        self.root = root
        self.port = free_port()
        self.url = f"ws://127.0.0.1:{self.port}"
        self.token = secrets.token_hex(12)
        self.env = {**os.environ, "FEDMAGIC_PORT": str(self.port),
                    "FEDMAGIC_TOKEN": self.token, "OMP_NUM_THREADS": "1"}
        self.env.pop("FEDMAGIC_RELAY", None)
        monkeypatch.setenv("FEDMAGIC_PORT", str(self.port))
        monkeypatch.setenv("FEDMAGIC_TOKEN", self.token)
        monkeypatch.delenv("FEDMAGIC_RELAY", raising=False)
        self.processes: dict[str, subprocess.Popen] = {}
        self.logs: dict[str, Path] = {}
        self.layout: Layout | None = None

    def write_digits(self, participants: int, split: str = "iid") -> Layout:
        self.layout = write_partitions(self.root, participants, split=split,
                                       data_dir="demo_task/data")
        return self.layout

    def join(self, node: str, task: str, *, workdir: Path | None = None, fault: str = "",
             extra: tuple[str, ...] = ("--yes",), token: str | None = None) -> subprocess.Popen:
        """Start ``fedmagic join`` for ``node`` in its own directory."""
        workdir = workdir or self.root / node
        workdir.mkdir(parents=True, exist_ok=True)
        log = workdir / "join.log"
        env = {**self.env, "FEDMAGIC_TEST_FAULT": fault}
        with open(log, "w") as out:
            process = subprocess.Popen(
                [sys.executable, "-m", "fedmagic", "join", self.url, "--task", task,
                 "--node", node, "--token", token or self.token, "--wait", "90", *extra],
                cwd=workdir, env=env, stdout=out, stderr=subprocess.STDOUT,
                stdin=subprocess.DEVNULL)
        self.processes[node] = process
        self.logs[node] = log
        return process

    def ready(self, *nodes: str, timeout: float = START_TIMEOUT) -> None:
        """Wait until each of ``nodes`` (by default every one started) has started.

        Started is ``JOIN_READY`` in its log: imported, about to connect. Test
        what comes after, the joining itself, with timeouts of its own; never
        race a process start (seconds of imports under load) against them.
        """
        deadline = time.monotonic() + timeout
        for node in nodes or tuple(self.processes):
            process = self.processes[node]
            while JOIN_READY not in self.output(node):
                assert process.poll() is None, \
                    f"{node} exited {process.returncode} before it started:\n{self.output(node)}"
                assert time.monotonic() < deadline, \
                    f"{node} did not start within {timeout:g} s:\n{self.output(node)}"
                time.sleep(0.05)

    def wait(self, node: str, timeout: float = 60) -> int:
        return self.processes[node].wait(timeout=timeout)

    def output(self, node: str) -> str:
        return self.logs[node].read_text()

    def close(self) -> None:
        for process in self.processes.values():
            if process.poll() is None:
                process.kill()
                process.wait(timeout=10)


@pytest.fixture
def federation(tmp_path: Path, monkeypatch: pytest.MonkeyPatch):
    federation = Federation(tmp_path, monkeypatch)
    yield federation
    federation.close()


def wait_for(predicate, timeout: float, interval: float = 0.05) -> bool:
    """Poll ``predicate`` until it holds or ``timeout`` seconds pass."""
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if predicate():
            return True
        time.sleep(interval)
    return predicate()


@pytest.hookimpl(wrapper=True, tryfirst=True)
def pytest_runtest_makereport(item, call):
    """Keep each phase's report on the test item, for fixtures that act on failure."""
    report = yield
    setattr(item, f"rep_{report.when}", report)
    return report
