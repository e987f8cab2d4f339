"""What a data owner is shown before consenting: everything the code hash covers."""

from __future__ import annotations

import os
import pty
import select
import subprocess
import sys
import time
from pathlib import Path

import pytest

from conftest import JOIN_READY, START_TIMEOUT, TASKS
from fedmagic.examples.digits_task import DigitsScheduler
from fedmagic.engine.launch import start_task
from fedmagic.engine.task import TaskPackage

HIDDEN = TASKS / "hidden_verify.py"


def package() -> TaskPackage:
    scheduler = DigitsScheduler(min_clients=2, max_clients=3, name="demo_task", max_rounds=4,
                                learning_rate=0.05)
    return TaskPackage.from_scheduler(scheduler, "digits", dataset_verify=HIDDEN)


def test_review_shows_the_arguments_the_scheduler_and_the_dataset_verify_code():
    review = package().review()

    assert "runs: DigitsScheduler(min_clients=2, max_clients=3, name='demo_task', " \
           "max_rounds=4, learning_rate=0.05)" in review
    assert "class DigitsScheduler(FedAvgScheduler):" in review
    assert 'Path("verify-ran.txt").write_text(' in review
    assert package().code_hash in review


def test_participants_see_the_script_name_not_where_it_sits_on_the_authors_disk():
    assert package().filename == "digits_task.py"


class Terminal:
    """A process on a real pseudo-terminal: what a data owner sees and types."""

    def __init__(self, argv: list[str], cwd: Path, env: dict[str, str]) -> None:
        self.master, slave = pty.openpty()
        self.process = subprocess.Popen(argv, cwd=cwd, env=env, stdin=slave, stdout=slave,
                                        stderr=slave, close_fds=True)
        os.close(slave)
        self.screen = ""
        self._seen = 0  # where the next read_until starts looking

    def read_until(self, text: str, timeout: float = 60) -> str:
        """What the terminal showed since the last call, up to and including ``text``."""
        start, deadline = self._seen, time.monotonic() + timeout
        while text not in self.screen[start:] and time.monotonic() < deadline:
            ready, _, _ = select.select([self.master], [], [], 0.2)
            if ready:
                try:
                    self.screen += os.read(self.master, 65536).decode(errors="replace")
                except OSError:  # the process closed the terminal
                    break
        assert text in self.screen[start:], self.screen[-2000:]
        self._seen = self.screen.index(text, start) + len(text)
        return self.screen[start:self._seen]

    def type(self, line: str) -> None:
        os.write(self.master, f"{line}\n".encode())

    def close(self) -> None:
        if self.process.poll() is None:
            self.process.kill()
        self.process.wait(timeout=10)
        os.close(self.master)


@pytest.mark.slow
def test_data_owner_reads_the_hidden_dataset_verify_code_in_the_terminal_before_it_runs(
        federation, tmp_path, monkeypatch):
    # Prepare: a task whose DatasetVerify file does something besides verifying
    layout = federation.write_digits(1)
    monkeypatch.chdir(layout.initiator.workdir)
    owner = layout.nodes[0]
    terminal = Terminal([sys.executable, "-m", "fedmagic", "join", federation.url, "--task",
                         "digits", "--token", federation.token, "--node", owner.name],
                        owner.workdir, federation.env)
    run = None
    try:
        # Started (torch imported) before the task's join_timeout begins
        terminal.read_until(JOIN_READY, timeout=START_TIMEOUT)
        run = start_task(DigitsScheduler(min_clients=1, max_clients=1, name="demo_task",
                                         max_rounds=1), "digits", dataset_verify=HIDDEN,
                         join_timeout=60)
        # Execute: ask to see the code, then decline
        terminal.read_until("[s]how code")
        terminal.type("s")
        screen = terminal.read_until("[s]how code", timeout=30)
        terminal.type("n")
        assert terminal.process.wait(timeout=30) == 1
    finally:
        terminal.close()
        if run is not None:
            run.stop(now=True)
            run._finished.wait(30)

    # Assert: the review showed the verify file's command and the arguments; nothing ran
    assert 'Path("verify-ran.txt").write_text(' in screen
    assert "DigitsScheduler(min_clients=1, max_clients=1, name='demo_task', max_rounds=1)" \
        in terminal.screen
    assert "and DatasetVerify code (12 lines)" in terminal.screen
    assert not (owner.workdir / "verify-ran.txt").exists()
