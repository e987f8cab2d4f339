"""The kernel's end of the JupyterLab extension, spoken to over a real kernel's comm."""

from __future__ import annotations

import queue
import time

import pytest
from jupyter_client import KernelManager

from conftest import START_TIMEOUT
from fedmagic.examples.digits_task import DigitsScheduler
from fedmagic.engine.launch import start_task
from fedmagic.engine.state import TaskSnapshot, TaskStatus
from fedmagic.notebook.lab import frontend_state
from fedmagic.notebook.session import KernelSession


class Frontend:
    """What the labextension does: finds fedmagic's comm and talks over it."""

    def __init__(self, cwd) -> None:
        self.manager = KernelManager(kernel_name="python3")
        self.manager.start_kernel(cwd=str(cwd))
        self.client = self.manager.client()
        self.client.start_channels()
        self.client.wait_for_ready(timeout=START_TIMEOUT)  # a kernel process starts
        self.comm_id: str | None = None
        self.messages: queue.Queue[dict] = queue.Queue()

    def run(self, code: str) -> None:
        reply = self.client.execute_interactive(code, timeout=120,
                                                output_hook=self._on_iopub)
        assert reply["content"]["status"] == "ok", reply["content"]

    def send(self, data: dict) -> None:
        message = self.client.session.msg("comm_msg", {"comm_id": self.comm_id, "data": data})
        self.client.shell_channel.send(message)

    def next(self, kind: str, timeout: float = 60) -> dict:
        """The next message of ``kind`` the kernel sends over the comm."""
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            try:
                self._on_iopub(self.client.get_iopub_msg(timeout=0.2))
            except queue.Empty:
                pass
            while not self.messages.empty():
                data = self.messages.get()
                if data.get("type") == kind:
                    return data
        raise AssertionError(f"no {kind!r} message over fedmagic's comm in {timeout} s")

    def wait_for(self, predicate, timeout: float = 60) -> dict:
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            state = self.next("state", deadline - time.monotonic())
            if predicate(state):
                return state
        raise AssertionError("the state never got there")

    def _on_iopub(self, message: dict) -> None:
        content = message["content"]
        if message["msg_type"] == "comm_open" and content["target_name"] == "fedmagic":
            self.comm_id = content["comm_id"]
            self.messages.put(content["data"])
        elif message["msg_type"] == "comm_msg" and content["comm_id"] == self.comm_id:
            self.messages.put(content["data"])

    def close(self) -> None:
        self.client.stop_channels()
        self.manager.shutdown_kernel(now=True)


@pytest.fixture
def frontend(tmp_path):
    frontends: list[Frontend] = []

    def start(cwd=tmp_path) -> Frontend:
        frontends.append(Frontend(cwd))
        return frontends[-1]

    yield start
    for each in frontends:
        each.close()


@pytest.mark.slow
def test_loading_fedmagic_opens_its_comm_and_verify_says_what_to_do_first(frontend):
    lab = frontend()
    lab.run("%load_ext fedmagic")
    assert lab.next("state") == {"type": "state", "tasks": [], "joins": []}

    lab.send({"action": "verify"})
    [result] = lab.next("verified")["results"]

    assert result["passed"] is False
    assert "this kernel has not joined a task: run %fedavg_join" in result["detail"]


@pytest.mark.slow
def test_a_reloaded_page_finds_the_comm_again_with_comm_info(frontend):
    lab = frontend()
    lab.run("%load_ext fedmagic")
    opened = lab.comm_id

    reply = lab.client.comm_info(target_name="fedmagic", reply=True, timeout=30)

    assert list(reply["content"]["comms"]) == [opened]
    lab.send({"action": "refresh"})
    assert lab.next("state")["tasks"] == []


@pytest.mark.slow
def test_verify_data_runs_the_joined_tasks_dataset_verify_in_the_kernel(
        frontend, federation, monkeypatch):
    layout = federation.write_digits(1)
    monkeypatch.chdir(layout.initiator.workdir)  # the author's test data
    lab = frontend(layout.nodes[0].workdir)
    lab.run("%load_ext fedmagic")  # kernel started, torch imported: join_timeout times the join
    author = start_task(DigitsScheduler(min_clients=1, max_clients=1, name="demo_task",
                                        max_rounds=1), "lab-join", join_timeout=60)
    lab.run(f"panel = %fedavg_join {federation.url} --task lab-join --token "
            f"{federation.token} --node node-1\npanel.wait_for_code(60)")
    joined = lab.wait_for(lambda s: s["joins"] and s["joins"][0]["code_hash"])
    assert joined["joins"][0]["accepted"] is False and joined["joins"][0]["verified"] is None
    assert joined["joins"][0]["max_rounds"] == 1  # the code offered says, before it runs

    lab.send({"action": "verify"})
    [result] = lab.next("verified")["results"]
    assert result == {"passed": True, "task_id": "lab-join", "node": "node-1",
                      "detail": "DatasetVerify.run() returned True"}
    lab.run("panel.accept()")
    ended = lab.wait_for(lambda s: s["joins"][0]["status"] == "ended", 120)

    assert ended["joins"][0]["accepted"] is True and ended["joins"][0]["verified"] is True
    assert author.wait(60).rounds == 1


@pytest.mark.slow
def test_stop_from_the_panel_ends_the_authors_task_after_its_round(frontend, federation):
    layout = federation.write_digits(2)
    for party in layout.nodes:
        federation.join(party.name, "lab-stop")
    lab = frontend(layout.initiator.workdir)
    lab.run("%load_ext fedmagic")
    federation.ready()
    lab.run("%%fedavg_task --join-timeout 60\n"
            "from fedmagic.examples.digits_task import DigitsScheduler\n"
            "class LongDigits(DigitsScheduler):\n"
            "    pass\n"
            "LongDigits(min_clients=2, max_clients=2, name='demo_task', max_rounds=500)"
            ".launch_task(task_id='lab-stop')")
    running = lab.wait_for(lambda s: s["tasks"] and s["tasks"][0]["round"] >= 1, 120)
    task = running["tasks"][0]
    assert task["status"] == "running" and task["max_rounds"] == 500
    assert task["join_command"].startswith(f"fedmagic join {federation.url} --task lab-stop")
    assert {p["node"] for p in task["participants"]} == {"node-1", "node-2"}
    # the initiator's test, and the participants' own (federated evaluation: they hold test data)
    assert set(task["metrics"]) == {"loss", "accuracy", "federated_loss", "federated_accuracy"}

    lab.send({"action": "stop", "task_id": "lab-stop"})
    ended = lab.wait_for(lambda s: s["tasks"][0]["status"] != "running", 120)

    assert ended["tasks"][0]["status"] == "finished"
    assert ended["tasks"][0]["round"] < 500
    for party in layout.nodes:
        assert federation.wait(party.name) == 0, federation.output(party.name)


class Launched:
    """A task of the session, as far as the frontend's state goes."""

    def __init__(self, task_id: str, started: float, status: TaskStatus) -> None:
        self.task_id, self.started, self.status = task_id, started, status

    def snapshot(self) -> TaskSnapshot:
        return TaskSnapshot(self.task_id, self.status, None, "", False, 5, (), (),
                            f"fedmagic join ws://x --task {self.task_id}", started=self.started)


def test_the_frontend_gets_the_tasks_newest_first_whatever_their_place_in_the_session():
    session = KernelSession()
    session.tasks = {  # "digits" was launched again under its id: it kept its first place
        "digits": Launched("digits", 300.0, TaskStatus.RUNNING),
        "mnist": Launched("mnist", 100.0, TaskStatus.FINISHED),
        "cifar": Launched("cifar", 200.0, TaskStatus.RUNNING),
    }

    sent = frontend_state(session)

    assert [task["task_id"] for task in sent["tasks"]] == ["digits", "cifar", "mnist"]
