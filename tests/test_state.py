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
                                   TaskStatus, epsilon_series)
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


#: What DifferentialPrivacy(sampling=0.5, noise_multiplier=1.1, target_epsilon=3.0) promises.
GUARANTEE = ("differential privacy: epsilon at most 3 at delta 1e-05 (each update clipped to L2 "
             "norm 1, each participant drawn with probability 0.5 a round, Gaussian noise of "
             "1.1 x 1 on the sum, added by the initiator)")


def private(spent: tuple[float, ...] = (0.61234, 1.2345, 1.5), *,
            target: float | None = 3.0) -> TaskSnapshot:
    """A differentially private task after a round per epsilon ``spent``, round 2 tested."""
    return TaskSnapshot(
        task_id="dp", status=TaskStatus.RUNNING, error=None, error_traceback="", stopping=False,
        max_rounds=20, participants=(),
        history=tuple({"round": n, "participants": 2, "tested": n == 2, "epsilon": epsilon,
                       "delta": 1e-5, "drawn": 2, **({"accuracy": 0.8} if n == 2 else {})}
                      for n, epsilon in enumerate(spent, start=1)),
        join_command="fedmagic join ws://127.0.0.1:8765 --task dp --token T --node NAME",
        guarantees=(GUARANTEE,), privacy_target=None if target is None else (target, 1e-5))


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
    assert set(private().to_json()) == set(declared)
    assert set(sent["participants"][0]) == set(typescript_interface("IParticipantRow"))
    assert set(re.findall(r"'(\w+)'", declared["status"])) == {str(s) for s in TaskStatus}
    nulls = {name for name, value in sent.items() if value is None}
    assert {"epsilon", "target_epsilon", "delta"} <= nulls  # no privacy budget counted
    assert all(declared[name].endswith("| null") for name in nulls)
    assert declared["guarantees"] == "string[]" and sent["guarantees"] == []


def test_the_join_state_the_kernel_sends_is_what_the_extension_declares():
    declared = typescript_interface("IJoinState")

    sent = JOIN.to_json()

    assert set(sent) == set(declared)
    assert declared["guarantees"] == "string[]" and sent["guarantees"] == []
    assert set(re.findall(r"'(\w+)'", declared["status"])) == {"running", "ended"}
    nulls = {name for name, value in WAITING.to_json().items() if value is None}
    assert nulls == {"code_hash", "max_rounds", "verified"}
    assert all(declared[name].endswith("| null") for name in nulls)


@pytest.mark.parametrize("contradiction, fields", [
    ("both accepted and declined", dict(accepted=True, declined=True)),
    ("no code yet", dict(code_hash=None, accepted=True)),
    ("no code yet", dict(code_hash=None, declined=True)),
    ("no code yet", dict(code_hash=None, verified=True)),
    ("no guarantees", dict(code_hash=None, guarantees=(GUARANTEE,))),
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


def test_a_private_task_counts_the_epsilon_every_round_spent_not_only_the_tested_ones():
    task = private()

    assert epsilon_series(task.history) == [(1, 0.61234), (2, 1.2345), (3, 1.5)]
    assert task.metrics == {"accuracy": 0.8}  # the round's bookkeeping is not a metric
    assert task.epsilon_spent == (1.5, 1e-5)
    sent = task.to_json()
    assert (sent["epsilon"], sent["target_epsilon"], sent["delta"]) == (1.5, 3.0, 1e-5)
    assert sent["guarantees"] == [GUARANTEE]


@pytest.mark.parametrize("task, said", [
    (private(), "ε 1.5 of 3 spent at δ 1e-05"),
    (private((0.61234, 1.2345)), "ε 1.23 of 3 spent at δ 1e-05"),
    (private(()), "ε 0 of 3 spent at δ 1e-05"),  # before its first round: nothing spent yet
    (private((0.61234,), target=None), "ε 0.612 spent at δ 1e-05"),
    (private((), target=None), ""),  # no target and no round: nothing to count from
    (TASK, ""),
], ids=["after round 3", "after round 2", "before round 1", "no target", "no target yet",
        "no privacy"])
def test_the_budget_line_says_the_epsilon_spent_of_the_target_at_delta(task, said):
    assert task.budget_line() == said


def test_the_summary_of_a_private_task_states_its_guarantee_and_the_budget_spent():
    lines = private().summary().splitlines()

    assert lines[1:3] == [f"  privacy: {GUARANTEE}", "  ε 1.5 of 3 spent at δ 1e-05"]
    assert lines[-1] == "  round 3: 2 participants"  # its epsilon is no metric


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


# A differentially private task: the panel says what the kernel's own texts say.

@pytest.mark.parametrize("snapshot", [
    private(), private((0.61234, 1.2345)), private(()), private((0.61234,), target=None),
    private((), target=None), TASK, private((12.3456,), target=12.5),
], ids=["after round 3", "after round 2", "before round 1", "no target", "no target yet",
        "no privacy", "large"])
def test_a_task_card_says_the_budget_spent_as_the_kernel_does(describe, snapshot):
    assert describe("budgetText(t)", t=snapshot.to_json()) == snapshot.budget_line()


def secure(*counts: int) -> TaskSnapshot:
    """A securely aggregated task after a round per count of updates in its sum."""
    return TaskSnapshot(
        task_id="secure", status=TaskStatus.RUNNING, error=None, error_traceback="",
        stopping=False, max_rounds=5, participants=(),
        history=tuple({"round": n, "participants": count, "tested": True, "threshold": 3,
                       "error_bound": 1e-4, "accuracy": 0.9}
                      for n, count in enumerate(counts, start=1)),
        join_command="fedmagic join ws://127.0.0.1:8765 --task secure --token T --node NAME")


@pytest.mark.parametrize("snapshot", [secure(5, 4), secure(), TASK],
                         ids=["after round 2", "before round 1", "not secure"])
def test_a_task_card_says_what_the_initiator_saw_of_a_secure_round_as_the_kernel_does(
        describe, snapshot):
    assert describe("secureText(t)", t=snapshot.to_json()) == snapshot.secure_line()


def test_a_secure_tasks_last_sum_and_threshold_are_in_its_summary_and_not_its_metrics():
    snapshot = secure(5, 4)

    assert snapshot.secure_line() == "seen: only the sum of 4 masked updates (t=3)"
    assert "  seen: only the sum of 4 masked updates (t=3)" in snapshot.summary().splitlines()
    assert snapshot.metrics == {"accuracy": 0.9}


def test_numbers_read_as_pythons_general_format_writes_them(describe):
    values = [3.0, 1e-05, 1e-06, 0.0001, 1.5, 2.0e-7, 123456.0, 1234567.0, 0.61234, 1.2345,
              12.3456, 100.0, 0.1, 50.0, 8.0, 0.0]

    said = describe("values.map(v => [formatG(v), formatG(v, 3)])", values=values)

    assert said == [[f"{v:g}", f"{v:.3g}"] for v in values]


def test_a_private_task_card_shows_its_guarantee_on_one_line_and_in_full_when_opened(describe):
    shown = describe("headline(guaranteesText(t))", t=private().to_json())

    assert shown["more"] is True
    assert shown["line"].startswith("differential privacy: epsilon at most 3 at delta 1e-05 (")
    assert describe("guaranteesText(t)", t=private().to_json()) == GUARANTEE
    assert describe("guaranteesText(t)", t=TASK.to_json()) == ""  # no privacy row at all


def test_a_join_card_shows_what_the_code_offered_promises_about_privacy(describe):
    offered = join(code_hash="cd34" * 8, accepted=False, round=0, verified=None,
                   guarantees=(GUARANTEE, "secure aggregation: ..."))

    assert describe("guaranteesText(j)", j=offered) == f"{GUARANTEE}\nsecure aggregation: ..."
    assert describe("guaranteesText(j)", j=JOIN.to_json()) == ""
