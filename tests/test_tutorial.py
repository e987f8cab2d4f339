"""The reference tutorial's final code runs as a plain script, changing nothing but
its two import lines and its task id."""

from __future__ import annotations

import os
import re
import subprocess
import sys
from pathlib import Path

import pytest

pytestmark = pytest.mark.slow

TUTORIAL = Path(__file__).resolve().parents[2] / "shared" / "reference" / "tutorial.md"


def tutorial_final_code() -> str:
    if not TUTORIAL.is_file():
        if os.environ.get("CI"):
            pytest.fail(f"the reference tutorial is missing at {TUTORIAL}")
        pytest.skip(f"the reference tutorial is not beside this clone ({TUTORIAL})")
    text = TUTORIAL.read_text(encoding="utf-8")
    launch = text[text.index("## 5. Launch the task"):]
    return re.search(r"```python\n(.*?)```", launch, re.S).group(1)


def as_fedmagic_script(code: str, task_id: str) -> str:
    """The only edits a tutorial reader makes: the imports and the task id."""
    edited = (code.replace("from alphafed import logger", "from fedmagic import logger")
              .replace("from alphafed.fed_avg import FedAvgScheduler",
                       "from fedmagic.fed_avg import FedAvgScheduler")
              .replace("'YOUR_TASK_ID'", repr(task_id)))
    assert "alphafed" not in edited and "YOUR_TASK_ID" not in edited
    return edited


def test_tutorial_final_code_runs_as_a_script_with_participants_joining_after_it(
        federation):
    layout = federation.write_digits(3)
    script = layout.initiator.workdir / "tutorial_task.py"
    script.write_text(as_fedmagic_script(tutorial_final_code(), "tutorial"))

    initiator = subprocess.Popen([sys.executable, script.name], cwd=script.parent,
                                 env=federation.env, stdout=subprocess.PIPE,
                                 stderr=subprocess.STDOUT, text=True)
    try:
        for party in layout.nodes:
            federation.join(party.name, "tutorial")
        output, _ = initiator.communicate(timeout=240)
    finally:
        initiator.kill()

    assert initiator.returncode == 0, output
    assert "round 5/5: averaged 3 updates" in output
    assert "Test set: Accuracy" in output  # the tutorial's own logger lines
    history = (layout.initiator.workdir / "models" / "demo_task" / "history.csv").read_text()
    assert len(history.splitlines()) == 1 + 5
    for party in layout.nodes:
        assert federation.wait(party.name) == 0, federation.output(party.name)
