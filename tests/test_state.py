"""One model of a task's state: what every display renders, and the TypeScript kept in step."""

from __future__ import annotations

import json
import os
import re
import shutil
import subprocess
from pathlib import Path
from typing import Any

import pytest

from fedmagic.engine.state import (JoinSnapshot, NodeStatus, ParticipantState, TaskSnapshot,
                                   TaskStatus)
from fedmagic.errors import RemoteError, TaskFailed

REPO = Path(__file__).resolve().parents[1]
LABEXTENSION = REPO / "labextension"
FEDERATION_TS = LABEXTENSION / "src" / "federation.ts"
DESCRIBE_TS = LABEXTENSION / "src" / "describe.ts"

TASK = TaskSnapshot(
    task_id="digits", status=TaskStatus.FAILED, error="too few participants",
    error_traceback="Traceback ...", stopping=False, max_rounds=5,
    participants=(ParticipantState("hospital-a", NodeStatus.UPLOADED, 719),
                  ParticipantState("hospital-b", NodeStatus.TIMED_OUT, 700,
                                   "did not finish training within 120 s")),
    history=({"round": 1, "participants": 2, "tested": True, "accuracy": 0.81234},
             {"round": 2, "participants": 1, "tested": False}),
    join_command="fedmagic join ws://127.0.0.1:8765 --task digits --token T --node NAME")

JOIN = JoinSnapshot(task_id="digits", node="hospital-a", ended=False,
                    detail="round 2: training", code_hash="ab12", accepted=True, declined=False,
                    round=1, max_rounds=5, verified=True, verification="719 images")
#: Joined, and waiting for the task's code: everything about the code is still unknown.
WAITING = JoinSnapshot(task_id="digits", node="hospital-a", ended=False, detail="",
                       code_hash=None, accepted=False, declined=False, round=0, max_rounds=None,
                       verified=None, verification="")


def typescript_interface(name: str) -> dict[str, str]:
    """The fields of one ``export interface`` in federation.ts, with their types."""
    body = re.search(rf"export interface {name} \{{(.*?)\n\}}", FEDERATION_TS.read_text(),
                     re.S)
    assert body, f"no interface {name} in {FEDERATION_TS}"
    return dict(re.findall(r"^\s+(\w+): (.+?);$", body.group(1), re.M))


def test_the_task_state_the_kernel_sends_is_what_the_extension_declares():
    declared = typescript_interface("ITaskState")

    sent = TASK.to_json()

    assert set(sent) == set(declared)
    assert set(sent["participants"][0]) == set(typescript_interface("IParticipantRow"))
    assert set(re.findall(r"'(\w+)'", declared["status"])) == {str(s) for s in TaskStatus}


def test_the_join_state_the_kernel_sends_is_what_the_extension_declares():
    declared = typescript_interface("IJoinState")

    sent = JOIN.to_json()

    assert set(sent) == set(declared)
    assert set(re.findall(r"'(\w+)'", declared["status"])) == {"running", "ended"}
    nulls = {name for name, value in WAITING.to_json().items() if value is None}
    assert nulls == {"code_hash", "max_rounds", "verified"}
    assert all(declared[name].endswith("| null") for name in nulls)


@pytest.mark.parametrize("contradiction, fields", [
    ("both accepted and declined", dict(accepted=True, declined=True)),
    ("no code yet", dict(code_hash=None, accepted=True)),
    ("no code yet", dict(code_hash=None, declined=True)),
    ("no code yet", dict(code_hash=None, verified=True)),
])
def test_a_join_snapshot_cannot_contradict_itself(contradiction, fields):
    values = {**JOIN.__dict__, "accepted": False, **fields}

    with pytest.raises(ValueError, match=contradiction):
        JoinSnapshot(**values)


def test_summary_says_how_the_task_stands_and_each_node_and_round():
    assert TASK.summary().splitlines() == [
        "task 'digits' failed: too few participants: round 2/5, 2 participants",
        "  hospital-a: uploaded, 719 samples",
        "  hospital-b: timed out, 700 samples (did not finish training within 120 s)",
        "  round 1: 2 participants, accuracy=0.8123",
        "  round 2: 1 participants",
    ]
    assert TASK.metrics == {"accuracy": 0.81234}  # the last tested round's


@pytest.mark.parametrize("status, available, ended", [
    (NodeStatus.READY, True, False),
    (NodeStatus.TIMED_OUT, True, False),
    (NodeStatus.TRAINING, False, False),
    (NodeStatus.RECONNECTING, False, False),
    (NodeStatus.DECLINED, False, True),
    (NodeStatus.DROPPED, False, True),
])
def test_a_node_status_says_whether_it_may_be_picked_and_whether_it_is_gone(
        status, available, ended):
    assert (status.available, status.ended) == (available, ended)


def test_displays_take_their_colours_from_the_jupyterlab_theme():
    stylesheet = (LABEXTENSION / "style" / "index.css").read_text()
    panel = (REPO / "fedmagic/notebook/panel.py").read_text()  # styled by the stylesheet

    for source in (stylesheet, panel):
        assert re.findall(r"#[0-9a-fA-F]{3,8}\b|rgba?\(", source) == []
    assert "var(--jp-" in stylesheet


# What the Federation panel and the commands say, run in Node from labextension/src/describe.ts
# on what the kernel really sends.

@pytest.fixture(scope="module")
def describe():
    """Evaluate a JavaScript expression with describe.ts's exports and the given values."""
    node = shutil.which("node")
    typescript = LABEXTENSION / "node_modules" / "typescript"
    if node is None or not typescript.exists():
        if os.environ.get("CI"):
            pytest.fail("Node.js and labextension/node_modules are needed: .ci/install has both")
        pytest.skip("needs Node.js and labextension/node_modules (cd labextension && jlpm)")
    transpile = ("const ts = require(process.argv[1]);"
                 "const out = ts.transpileModule(require('fs').readFileSync(0, 'utf8'),"
                 " {compilerOptions: {module: ts.ModuleKind.CommonJS,"
                 " target: ts.ScriptTarget.ES2022}});"
                 "process.stdout.write(out.outputText);")
    module = subprocess.run([node, "-e", transpile, str(typescript)], input=DESCRIBE_TS.read_text(),
                            capture_output=True, text=True, check=True).stdout
    evaluate = ("const module = {exports: {}};"
                "new Function('exports', 'module', 'require', process.argv[1])"
                "(module.exports, module, require);"
                "const {expression, values} = JSON.parse(require('fs').readFileSync(0, 'utf8'));"
                "const scope = {...module.exports, ...values};"
                "const result = new Function(...Object.keys(scope), `return (${expression});`)"
                "(...Object.values(scope));"
                "process.stdout.write(JSON.stringify(result === undefined ? null : result));")

    def run(expression: str, **values: Any) -> Any:
        done = subprocess.run([node, "-e", evaluate, module],
                              input=json.dumps({"expression": expression, "values": values}),
                              capture_output=True, text=True)
        assert done.returncode == 0, done.stderr
        return json.loads(done.stdout)

    return run


def task(task_id: str, status: TaskStatus, *, rounds: int = 3, error: BaseException | None = None,
         started: float = 100.0, taken: float = 141.0) -> dict[str, Any]:
    """A task's state as the kernel sends it: ``rounds`` of 13.5 s done, 41 s in."""
    return TaskSnapshot(
        task_id=task_id, status=status, error=None if error is None else str(error),
        error_traceback="", stopping=False, max_rounds=5, participants=(),
        history=tuple({"round": n, "participants": 2, "seconds": 13.5}
                      for n in range(1, rounds + 1)),
        join_command=f"fedmagic join ws://127.0.0.1:8765 --task {task_id} --token s3cr3t "
                     "--node NAME",
        started=started, taken=taken, ended=None if status == TaskStatus.RUNNING else taken,
        checkpoint=f"models/{task_id}").to_json()


def test_a_running_task_says_its_round_elapsed_time_and_time_left(describe):
    running = task("digits", TaskStatus.RUNNING)

    assert describe("taskStatusLine(t)", t=running) == "round 3/5 · 0:41 elapsed · ~0:27 left"
    assert describe("taskStatusLine(t, 10)", t=running) == (  # its clocks move between updates
        "round 3/5 · 0:51 elapsed · ~0:17 left")
    assert describe("collapsedByDefault(t)", t=running) is False


def test_an_ended_task_card_starts_collapsed_and_its_header_says_how_it_ended(describe):
    finished = task("digits", TaskStatus.FINISHED, rounds=5)

    assert describe("collapsedByDefault(t)", t=finished) is True
    assert describe("taskSummary(t)", t=finished) == "finished · round 5/5"


def test_a_failed_task_says_failed_once_and_folds_a_long_failure_into_one_line(describe):
    failure = TaskFailed("digits", "only 1 of the 2 participants needed (min_clients) sent a "
                         "valid update; the task's log says why each of the others did not",
                         round=2)
    failure.checkpoint, failure.saved_round = "models/digits", 1
    crash = RemoteError("hospital-a", "train()", "RuntimeError: CUDA out of memory",
                        "".join(f'  File "train.py", line {n}, in step\n' for n in range(14)))
    failed, crashed = (task("digits", TaskStatus.FAILED, error=error)
                       for error in (failure, crash))

    line = describe("taskStatusLine(t)", t=failed)
    folded = describe("headline(taskStatusLine(t))", t=crashed)

    assert line.startswith("failed in round 2: only 1 of the 2 participants")
    assert "task 'digits'" not in line
    assert len(crashed["error"].splitlines()) >= 15
    assert folded == {"line": "failed: 'hospital-a' failed during train(): RuntimeError: CUDA "
                              "out of memory", "more": True}
    assert describe("headline(taskStatusLine(t)).line.length <= HEADLINE_CHARS", t=failed)


def test_copy_the_join_line_takes_the_newest_running_task_else_the_newest(describe):
    newest_first = [task("c", TaskStatus.FINISHED), task("b", TaskStatus.RUNNING),
                    task("a", TaskStatus.RUNNING)]

    assert describe("taskToCopy(tasks).task_id", tasks=newest_first) == "b"
    assert describe("taskToCopy(tasks).task_id", tasks=newest_first[:1]) == "c"
    assert describe("taskToCopy([])") is None


def test_the_join_line_on_screen_masks_its_token(describe):
    line = task("digits", TaskStatus.RUNNING)["join_command"]

    assert describe("maskToken(line)", line=line) == (
        "fedmagic join ws://127.0.0.1:8765 --task digits --token •••••••• --node NAME")
    assert describe("maskToken('x --token=abc')") == "x --token=••••••••"


def join(**fields: Any) -> dict[str, Any]:
    return JoinSnapshot(**{**JOIN.__dict__, **fields}).to_json()


@pytest.mark.parametrize("snapshot, rows", [
    (WAITING.to_json(),
     ["not received yet", "no code to decide on yet", "no code to verify yet", "not started"]),
    (join(code_hash="cd34" * 8, accepted=False, round=0, max_rounds=4, verified=None),
     ["hash cd34cd34cd34cd34", "waiting for your decision", "not verified yet", "0/4"]),
    (join(code_hash="cd34" * 8, accepted=False, declined=True, round=0, max_rounds=4,
          verified=None, ended=True),
     ["hash cd34cd34cd34cd34", "declined", "not verified yet", "none: declined"]),
    (join(round=2, max_rounds=4, verified=True, verification="719 training samples"),
     ["hash ab12", "accepted", "passed: 719 training samples", "2/4"]),
], ids=["waiting for code", "asked", "declined", "taking part"])
def test_a_join_card_describes_the_code_offered_now(describe, snapshot, rows):
    said = describe("[codeText(j), consentText(j), verificationText(j), joinRoundText(j)]",
                    j=snapshot)

    assert said == rows


def test_verify_data_is_disabled_with_a_reason_until_a_joined_tasks_code_is_here(describe):
    def why(joins: list[dict[str, Any]]) -> str | None:
        return describe("whyVerifyIsDisabled(true, joins)", joins=joins)

    assert "has joined no task" in why([])  # an author's notebook
    assert "code has not arrived yet" in why([WAITING.to_json()])
    assert why([WAITING.to_json(), JOIN.to_json()]) is None
    assert "%load_ext fedmagic" in describe("whyVerifyIsDisabled(false, [])")
    assert describe("verifyTooltip(true, [])") == why([])
