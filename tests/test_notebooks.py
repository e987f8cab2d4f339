"""Notebooks executed with nbclient on real kernels, as a user's would run."""

from __future__ import annotations

import base64

import nbformat
import numpy as np
import pytest
from nbclient import NotebookClient

from conftest import free_port
from test_tutorial import as_fedmagic_script, tutorial_final_code

pytestmark = pytest.mark.slow

WIDGET_STATE = "application/vnd.jupyter.widget-state+json"


def execute(cells: list[str], cwd) -> nbformat.NotebookNode:
    notebook = nbformat.v4.new_notebook(cells=[nbformat.v4.new_code_cell(c) for c in cells])
    NotebookClient(notebook, timeout=240, kernel_name="python3", store_widget_state=True,
                   resources={"metadata": {"path": str(cwd)}}).execute()
    return notebook


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
    cell = as_fedmagic_script(tutorial_final_code(), "notebook")

    notebook = execute(["%load_ext fedmagic", "%%fedavg_task --wait --join-timeout 60\n" + cell],
                       layout.initiator.workdir)

    tables = [m["state"]["value"] for m in models(notebook, "HTMLModel")
              if "fedmagic-participants" in m["state"]["value"]]
    assert len(tables) == 1
    assert all(f"<td>{party.name}</td>" in tables[0] for party in layout.nodes)
    lines = models(notebook, "LinesModel")
    assert len(lines) == 3  # average loss, accuracy, correct_rate
    for line in lines:
        assert list(array(line, "x")) == [1, 2, 3, 4, 5]  # log_rounds=1: every round tested
    progress = models(notebook, "IntProgressModel")
    assert [(p["state"]["value"], p["state"]["max"]) for p in progress] == [(5, 5)]
    for party in layout.nodes:
        assert federation.wait(party.name) == 0, federation.output(party.name)


def test_a_background_task_logs_into_its_widget_not_into_other_cells(federation):
    layout = federation.write_digits(2)
    for party in layout.nodes:
        federation.join(party.name, "quiet")
    cell = as_fedmagic_script(tutorial_final_code(), "quiet")

    notebook = execute(["%load_ext fedmagic",
                        "%%fedavg_task --join-timeout 60\n" + cell,
                        "from fedmagic.cells import running_tasks\n"
                        "result = running_tasks['quiet'].wait(180)\n"
                        "print('rounds:', result.rounds)",
                        "events = [text for _, text in running_tasks['quiet'].events]\n"
                        "print(sum('Test set: Accuracy' in text for text in events), "
                        "'accuracy lines in the widget log')"],
                       layout.initiator.workdir)

    waiting_cell = "".join(output.get("text", "") for output in notebook.cells[2].outputs)
    assert waiting_cell == "rounds: 5\n"  # nothing of the task's own log landed here
    assert "5 accuracy lines in the widget log" in notebook.cells[3].outputs[0]["text"]


def test_local_participant_kernels_train_the_task_and_shut_down_when_it_ends(tmp_path,
                                                                              monkeypatch):
    monkeypatch.setenv("FEDMAGIC_PORT", str(free_port()))
    monkeypatch.delenv("FEDMAGIC_TOKEN", raising=False)
    cell = as_fedmagic_script(tutorial_final_code(), "local")

    notebook = execute(["%load_ext fedmagic",
                        "group = %fedavg_local 3 --task local\ngroup",
                        "%%fedavg_task --wait --join-timeout 120\n" + cell,
                        "import time\n"
                        "deadline = time.monotonic() + 60\n"
                        "while any(group.alive()) and time.monotonic() < deadline:\n"
                        "    time.sleep(0.2)\n"
                        "print('alive:', group.alive())"],
                       tmp_path)

    assert "node-1, node-2, node-3 (3 running)" in notebook.cells[1].outputs[0]["data"][
        "text/plain"]
    tables = [m["state"]["value"] for m in models(notebook, "HTMLModel")
              if "fedmagic-participants" in m["state"]["value"]]
    assert all(f"<td>node-{i}</td>" in tables[0] for i in (1, 2, 3))
    assert [list(array(line, "x")) for line in models(notebook, "LinesModel")] == \
        [[1, 2, 3, 4, 5]] * 3
    assert notebook.cells[3].outputs[-1]["text"] == "alive: [False, False, False]\n"
