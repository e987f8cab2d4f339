"""Notebooks executed with nbclient on real kernels, as a user's would run."""

from __future__ import annotations

import base64
import json
import socket
import threading
from pathlib import Path

import nbformat
import numpy as np
import psutil
import pytest
from jupyter_client import KernelManager
from nbclient import NotebookClient

from conftest import START_TIMEOUT, free_port, wait_for
from fedmagic.examples import digits_task
from test_tutorial import as_fedmagic_script, tutorial_final_code

pytestmark = pytest.mark.slow

WIDGET_STATE = "application/vnd.jupyter.widget-state+json"


def execute(cells: list[str], cwd) -> nbformat.NotebookNode:
    notebook = nbformat.v4.new_notebook(cells=[nbformat.v4.new_code_cell(c) for c in cells])
    NotebookClient(notebook, timeout=240, kernel_name="python3", store_widget_state=True,
                   resources={"metadata": {"path": str(cwd)}}).execute()
    return notebook


def printed(cell: nbformat.NotebookNode) -> str:
    """What a cell printed, stdout and stderr in order."""
    return "".join(output.get("text", "") for output in cell.outputs
                   if output["output_type"] == "stream")


def models(notebook: nbformat.NotebookNode, name: str) -> list[dict]:
    state = notebook.metadata["widgets"][WIDGET_STATE]["state"]
    return [model for model in state.values() if model["model_name"] == name]


def array(model: dict, key: str) -> np.ndarray:
    value = model["state"][key]
    buffer = next(b for b in model.get("buffers", []) if b["path"] == [key, "value"])
    return np.frombuffer(base64.b64decode(buffer["data"]), dtype=value["dtype"])


def test_author_notebook_shows_participants_and_a_chart_point_per_tested_round(
        federation):
    layout = federation.write_digits(3)
    for party in layout.nodes:
        federation.join(party.name, "notebook")
    federation.ready()
    cell = as_fedmagic_script(tutorial_final_code(), "notebook")

    notebook = execute(["%load_ext fedmagic", "%%fedavg_task --wait --join-timeout 60\n" + cell],
                       layout.initiator.workdir)

    tables = [m["state"]["value"] for m in models(notebook, "HTMLModel")
              if "fedmagic-participants" in m["state"]["value"]]
    assert len(tables) == 1
    assert all(f"<td>{party.name}</td>" in tables[0] for party in layout.nodes)
    lines = models(notebook, "LinesModel")
    # a chart each for average loss, accuracy, correct_rate: the initiator's line, and the
    # participants' own test results (each holds test data: federated evaluation)
    assert len(lines) == 6
    assert sorted(line["state"]["labels"] for line in lines) == [["federated"]] * 3 + [
        ["initiator"]] * 3
    for line in lines:
        assert list(array(line, "x")) == [1, 2, 3, 4, 5]  # log_rounds=1: every round tested
    bars = [m["state"]["value"] for m in models(notebook, "HTMLModel")
            if "role='progressbar'" in m["state"]["value"]]
    assert len(bars) == 1 and "aria-valuenow='5' aria-valuemax='5'" in bars[0]  # "5 / 5"
    for party in layout.nodes:
        assert federation.wait(party.name) == 0, federation.output(party.name)


def test_a_background_task_logs_into_its_widget_not_into_other_cells(federation):
    layout = federation.write_digits(2)
    for party in layout.nodes:
        federation.join(party.name, "quiet")
    federation.ready()
    cell = as_fedmagic_script(tutorial_final_code(), "quiet")

    notebook = execute(["%load_ext fedmagic",
                        "%%fedavg_task --join-timeout 60\n" + cell,
                        "import fedmagic\n"
                        "result = fedmagic.running_task('quiet').wait(180)\n"
                        "print('rounds:', result.rounds)",
                        "events = [text for _, text in fedmagic.running_task('quiet').events]\n"
                        "print(sum('Test set: Accuracy' in text for text in events), "
                        "'accuracy lines in the widget log')",
                        "print(fedmagic.running_task('quiet').summary())"],
                       layout.initiator.workdir)

    assert printed(notebook.cells[2]) == "rounds: 5\n"  # nothing of the task's own log landed here
    assert "5 accuracy lines in the widget log" in notebook.cells[3].outputs[0]["text"]
    summary = printed(notebook.cells[4]).splitlines()
    assert summary[0] == "task 'quiet' finished: round 5/5, 2 participants"
    assert summary[-1].startswith("  round 5: 2 participants, average loss=")
    widget = notebook.cells[1].outputs[-1]["data"]
    assert widget["text/plain"].startswith("task 'quiet' running")  # where widgets do not render


def test_an_error_in_the_background_shows_in_the_widget_with_its_traceback(
        tmp_path, monkeypatch):
    monkeypatch.setenv("FEDMAGIC_PORT", str(free_port()))
    monkeypatch.delenv("FEDMAGIC_TOKEN", raising=False)
    broken = ("class BrokenTest(DigitsScheduler):\n"
              "    def test(self):\n"
              "        raise ValueError('no test images in this copy')\n\n")

    notebook = execute(["%load_ext fedmagic",
                        "group = %fedavg_local 2 --task broken",
                        "%%fedavg_task --join-timeout 120\n"
                        + digits_cell("broken", 3, "BrokenTest", broken),
                        "import fedmagic\n"
                        "try:\n"
                        "    fedmagic.running_task('broken').wait(180)\n"
                        "except Exception as error:\n"
                        "    print('the task failed:', error)"],
                       tmp_path)

    assert "the task failed:" in printed(notebook.cells[3])
    summary = next(m["state"]["value"] for m in models(notebook, "HTMLModel")
                   if "<div class='fm-summary fm-failed'>" in m["state"]["value"])
    assert "Failed: ValueError: no test images in this copy" in summary
    assert "<summary>traceback</summary>" in summary
    assert "raise ValueError(&#x27;no test images in this copy&#x27;)" in summary


def digits_cell(task_id: str, rounds: int, scheduler: str = "DigitsScheduler",
                extra: str = "", name: str = "demo_task") -> str:
    """The digits example as a ``%%fedavg_task`` cell: its classes, then the launch."""
    source = Path(digits_task.__file__).read_text()
    return (source[:source.index('if __name__ == "__main__":')] + extra
            + f"scheduler = {scheduler}(min_clients=2, max_clients=3, name={name!r}, "
              f"max_rounds={rounds}, merge_epochs=2)\n"
            + f"scheduler.launch_task(task_id={task_id!r})\n")


SECOND_TRY_VERIFY = """
class DatasetVerify(DatasetVerify):
    ROOT = 'second_try/data'

"""


def test_local_participant_kernels_follow_the_next_launch_of_their_task_and_end_with_it(
        tmp_path, monkeypatch):
    monkeypatch.delenv("FEDMAGIC_TOKEN", raising=False)
    monkeypatch.delenv("FEDMAGIC_RELAY", raising=False)
    with socket.socket() as taken:  # another notebook's relay, say
        taken.bind(("127.0.0.1", 0))
        taken.listen()
        monkeypatch.setenv("FEDMAGIC_PORT", str(taken.getsockname()[1]))

        notebook = execute([
            "%load_ext fedmagic",
            "group = %fedavg_local 3 --task local\ngroup",
            "%%fedavg_task --wait --join-timeout 120\n" + digits_cell("local", 4),
            "print('alive:', group.alive())",
            # Again, with the same task id and a name of its own
            "again = %fedavg_local 2 --task local",  # kernels that import torch as they join
            "%%fedavg_task --wait --join-timeout 120\n"
            + digits_cell("local", 1, extra=SECOND_TRY_VERIFY, name="second_try"),
            "import fedmagic\n"
            "print('alive:', again.alive())\n"
            "print(fedmagic.running_task('local').summary())"],
            tmp_path)

    assert "node-1, node-2, node-3 (3 running) at ws://127.0.0.1:" in \
        notebook.cells[1].outputs[-1]["data"]["text/plain"]
    assert "is taken (another notebook's relay?), so the relay embedded here listens on ws://" \
        in printed(notebook.cells[1])
    tables = [m["state"]["value"] for m in models(notebook, "HTMLModel")
              if "fedmagic-participants" in m["state"]["value"]]
    assert all(f"<td>node-{i}</td>" in tables[0] for i in (1, 2, 3))
    assert [list(array(line, "x")) for line in models(notebook, "LinesModel")][:2] == \
        [list(range(1, 5))] * 2  # loss and accuracy
    history = json.loads((tmp_path / "models" / "demo_task" / "history.json").read_text())
    assert [row["participants"] for row in history] == [3, 3, 3, 3]
    assert printed(notebook.cells[3]) == "alive: [False, False, False]\n"  # before wait returned
    streams = [(o["name"], o["text"]) for o in notebook.cells[2].outputs
               if o["output_type"] == "stream"]
    assert any(name == "stdout" and "hold their digits in demo_task/data" in text
               for name, text in streams), streams
    assert not [text for name, text in streams if name == "stderr" and " INFO " in text]
    second = printed(notebook.cells[6])
    assert "alive: [False, False]\n" in second
    assert "task 'local' finished: round 1/1, 2 participants" in second
    assert (tmp_path / "second_try" / "data").is_dir()  # the author's test data, by its name


def test_owners_whose_data_fails_verification_or_who_decline_are_left_out_and_the_author_sees_why(
        federation, tmp_path):
    layout = federation.write_digits(2)
    for party in layout.nodes:
        federation.join(party.name, "owners")
    (tmp_path / "empty").mkdir()
    owners: dict[str, nbformat.NotebookNode | BaseException] = {}
    joining = {node: tmp_path / f"{node}.joining" for node in ("no-data", "careful")}

    def owner(node: str, workdir: Path, decision: str) -> None:
        try:
            owners[node] = execute([
                "%load_ext fedmagic",
                f"panel = %fedavg_join {federation.url} --task owners --token {federation.token}"
                f" --node {node}\nopen({str(joining[node])!r}, 'w').close()\npanel",
                "package = panel.wait_for_code(120)\n"
                "print('verified' if panel.verify_data() else 'not verified')",
                decision,
                "print('outcome:', panel.run.wait(240).reason)"], workdir)
        except BaseException as exc:  # reported by the test's own thread
            owners[node] = exc

    threads = [
        threading.Thread(target=owner, args=("no-data", tmp_path / "empty", "panel.accept()")),
        threading.Thread(target=owner, args=("careful", layout.nodes[0].workdir,
                                             "panel.decline()"))]
    for thread in threads:
        thread.start()
    # Every owner's kernel and join process started before the task: its rounds time them
    # joining, not kernels starting and importing torch
    assert wait_for(lambda: all(path.exists() for path in joining.values())
                    or not all(thread.is_alive() for thread in threads), START_TIMEOUT)
    assert all(path.exists() for path in joining.values()), owners
    federation.ready()
    author = execute(["%load_ext fedmagic",
                      "%%dataset_verify owners\n" + VERIFY_CELL,
                      "%%fedavg_task --wait --join-timeout 90\n" + digits_cell("owners", 3),
                      "import fedmagic\n"
                      "for node, p in sorted(fedmagic.running_task('owners').participants.items()):\n"
                      "    print(node, p.status, p.detail)"],
                     layout.initiator.workdir)
    for thread in threads:
        thread.join(300)

    seen = printed(author.cells[3])
    assert "no-data unverified DatasetVerify.run() returned False: no-data: missing " \
           "['train-images-idx3-ubyte'" in seen
    assert "careful declined the data owner did not consent" in seen
    table = next(m["state"]["value"] for m in models(author, "HTMLModel")
                 if "fedmagic-participants" in m["state"]["value"])
    assert "missing [&#x27;train-images-idx3-ubyte&#x27;" in table  # the widget says why too
    history = json.loads((layout.initiator.workdir / "models" / "demo_task" /
                          "history.json").read_text())
    assert [row["participants"] for row in history] == [2, 2, 2]  # node-1 and node-2 only
    no_data, careful = owners["no-data"], owners["careful"]
    assert not isinstance(no_data, BaseException), no_data
    assert not isinstance(careful, BaseException), careful
    assert "missing ['train-images-idx3-ubyte'" in printed(no_data.cells[2])
    assert printed(no_data.cells[2]).endswith("not verified\n")
    assert "outcome: data verification failed" in printed(no_data.cells[4])
    assert printed(careful.cells[2]) == "verified\n"  # good data, and still declines
    assert printed(careful.cells[4]) == "outcome: consent refused\n"


VERIFY_CELL = """\
import os
from fedmagic import logger

class DatasetVerify:
    FILES = ["train-images-idx3-ubyte", "train-labels-idx1-ubyte"]

    def __init__(self, task_id, current_node):
        self.current_node = current_node

    def run(self) -> bool:
        raw = os.path.join("demo_task", "data", "MNIST", "raw")
        missing = [name for name in self.FILES if not os.path.isfile(os.path.join(raw, name))]
        if missing:
            logger.warning(f"{self.current_node}: missing {missing} under {raw}")
        return not missing
"""


# jupyter_client's blocking KernelManager starts one event-loop thread ("MainThread -
# runner") on first use and reuses it for every later call; it is jupyter_client's to keep.
SNAPSHOT = """\
import psutil, threading

def snapshot():
    me = psutil.Process()
    return {"threads": sorted(t.name for t in threading.enumerate()
                              if t.name != "MainThread - runner"),
            "sockets": len(me.net_connections("inet")),
            "processes": len(me.children(recursive=True))}
"""


def test_rerunning_the_launch_cell_keeps_one_task_and_stopping_it_releases_everything(
        tmp_path, monkeypatch):
    monkeypatch.setenv("FEDMAGIC_PORT", str(free_port()))
    monkeypatch.delenv("FEDMAGIC_TOKEN", raising=False)
    launch = "%%fedavg_task --join-timeout 120\n" + digits_cell("stop-me", 500)

    notebook = execute([
        "%load_ext fedmagic\n" + SNAPSHOT + "before = snapshot()",
        "group = %fedavg_local 2 --task stop-me",
        launch,
        launch,  # the same cell run again while its task runs
        "import time\n"
        "import fedmagic\n"
        "run = fedmagic.running_task('stop-me')\n"
        "during = snapshot()\n"
        "deadline = time.monotonic() + 120\n"
        "while not run.history and time.monotonic() < deadline:\n"
        "    time.sleep(0.1)\n"
        "run.stop()\n"
        "result = run.wait(120)\n"
        "while any(group.alive()) and time.monotonic() < deadline:\n"
        "    time.sleep(0.1)\n"
        "deadline = time.monotonic() + 10\n"
        "while snapshot() != before and time.monotonic() < deadline:\n"
        "    time.sleep(0.1)  # sockets close and threads end just after the task\n"
        "print('tasks threads:', [t for t in during['threads'] if t.startswith('fedmagic-task')])\n"
        "print('processes while running:', during['processes'])\n"
        "print('rounds:', result.rounds)\n"
        "print('left behind:', {k: (before[k], v) for k, v in snapshot().items() "
        "if v != before[k]})"], tmp_path)

    again = notebook.cells[3]
    assert "task 'stop-me' is already running in this kernel; here it is" in printed(again)
    assert [o["output_type"] for o in again.outputs][-1] == "display_data"  # its widget
    report = printed(notebook.cells[4])
    assert "tasks threads: ['fedmagic-task-stop-me']\n" in report
    assert "processes while running: 2\n" in report
    rounds = int(report.split("rounds: ")[1].split()[0])
    assert 1 <= rounds < 500
    assert "left behind: {}\n" in report


def test_participant_kernels_exit_when_the_author_kernel_dies(tmp_path, monkeypatch):
    monkeypatch.setenv("FEDMAGIC_PORT", str(free_port()))
    outputs: list[dict] = []
    author = KernelManager(kernel_name="python3")
    author.start_kernel(cwd=str(tmp_path))
    client = author.client()
    client.start_channels()
    try:
        client.wait_for_ready(timeout=START_TIMEOUT)  # the author's kernel starts
        reply = client.execute_interactive(
            "%load_ext fedmagic\ngroup = %fedavg_local 2 --task orphans\n"
            "print([m.provisioner.process.pid for m in group.managers])",
            timeout=120, output_hook=lambda message: outputs.append(message))
        assert reply["content"]["status"] == "ok", reply["content"]
    finally:
        client.stop_channels()
    participants = [psutil.Process(pid) for pid in json.loads(next(
        m["content"]["text"] for m in outputs if m["msg_type"] == "stream"
        and m["content"]["name"] == "stdout"))]
    assert all(p.is_running() for p in participants)

    author.provisioner.process.kill()  # no shutdown, no atexit: the kernel just dies

    gone, alive = psutil.wait_procs(participants, timeout=30)
    assert alive == [], f"participant kernels outlived their author: {alive}"
    author.cleanup_resources()
