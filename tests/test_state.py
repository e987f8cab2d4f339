"""One model of a task's state: what every display renders, and the TypeScript kept in step."""

from __future__ import annotations

import re
from pathlib import Path

import pytest

from fedmagic.engine.state import (JoinSnapshot, NodeStatus, ParticipantState, TaskSnapshot,
                                   TaskStatus)

FEDERATION_TS = Path(__file__).resolve().parents[1] / "labextension" / "src" / "federation.ts"

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
                    detail="round 2: training", code_hash="ab12", accepted=True, round=1,
                    max_rounds=5, verified=True, verification="719 images")


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
