"""Starting a task from a script or a notebook: where its relay listens, and stopping it early."""

from __future__ import annotations

import socket

import pytest

from conftest import wait_for
from fedmagic.engine.launch import start_task
from fedmagic.wire.relay import EmbeddedRelay, Relay
from tiny import Tiny

TOKEN = "join-token"
pytestmark = pytest.mark.timeout(60)


def test_an_embedded_relay_whose_port_is_taken_listens_on_a_free_one_and_says_which(
        tmp_path, monkeypatch, capsys):
    monkeypatch.chdir(tmp_path)
    monkeypatch.delenv("FEDMAGIC_RELAY", raising=False)
    with socket.socket() as taken:
        taken.bind(("127.0.0.1", 0))
        taken.listen()
        port = taken.getsockname()[1]
        monkeypatch.setenv("FEDMAGIC_PORT", str(port))

        run = start_task(Tiny(min_clients=1, max_clients=1, max_rounds=1), "busy",
                         token=TOKEN, join_timeout=300)
        try:
            url = run.url
        finally:
            run.stop()
            run.wait(10)

    assert url.startswith("ws://127.0.0.1:") and url != f"ws://127.0.0.1:{port}"
    said = capsys.readouterr().err
    assert f"port {port} is taken" in said and f"listens on {url} instead" in said
    assert url in run.join_command


@pytest.mark.parametrize("when", ["at once", "while it waits for participants"])
def test_stop_ends_a_task_that_waits_for_participants_at_once(tmp_path, monkeypatch, when):
    monkeypatch.chdir(tmp_path)
    with EmbeddedRelay("127.0.0.1", 0, Relay()) as relay:
        run = start_task(Tiny(min_clients=2, max_clients=2, max_rounds=3), "alone",
                         relay=relay.url, token=TOKEN, join_timeout=300)
        if when != "at once":
            assert wait_for(lambda: any("waiting for 2 to 2" in t for _, t in run.events), 10,
                            interval=0.01)
        run.stop()
        result = run.wait(5)  # not the 300 s join timeout

    assert result.rounds == 0
    assert [text for _, text in run.events][-2:] == [
        "task 'alone' stopped by its author before round 1", "task 'alone' ended"]
    assert run.snapshot().status == "finished"
