"""The notebook magics, driven through IPython's own shell."""

from __future__ import annotations

import html
import threading
from typing import Any, Callable

import pytest

import fedmagic
from IPython.core.error import UsageError
from IPython.testing import globalipapp

from conftest import TASKS, port_is_free, wait_for
from fedmagic.notebook.session import loaded_session
from fedmagic.errors import TaskDefinitionError
from fedmagic.examples.digits_task import DigitsScheduler
from fedmagic.engine.launch import TaskRun, start_task
from fedmagic.engine.participant import JoinOutcome
from fedmagic.engine.rounds import TaskResult
from fedmagic.engine.task import TaskPackage
from fedmagic.errors import TaskFailed
from fedmagic.notebook import panel as panel_module
from fedmagic.notebook.panel import ParticipantPanel, ending_text
from fedmagic.strategies import DifferentialPrivacy
from test_tutorial import as_fedmagic_script, tutorial_final_code


@pytest.fixture(scope="module")
def ip():
    shell = globalipapp.start_ipython()
    shell.run_line_magic("load_ext", "fedmagic")
    return shell


def test_loading_twice_is_harmless_and_unloading_removes_the_magics(ip):
    ip.run_line_magic("load_ext", "fedmagic")
    assert ip.find_cell_magic("fedavg_task") is not None

    ip.run_line_magic("unload_ext", "fedmagic")
    assert ip.find_cell_magic("fedavg_task") is None
    assert ip.find_cell_magic("dataset_verify") is None

    ip.run_line_magic("load_ext", "fedmagic")
    assert ip.find_cell_magic("fedavg_task") is not None


def test_every_magic_documents_its_options(ip):
    task_help = ip.find_cell_magic("fedavg_task").__doc__
    verify_help = ip.find_cell_magic("dataset_verify").__doc__

    assert "--wait" in task_help and "--relay" in task_help and "--join-timeout" in task_help
    assert "task_id" in verify_help


def test_unknown_option_is_a_usage_error(ip):
    with pytest.raises(UsageError):
        ip.run_cell_magic("fedavg_task", "--no-such-option", "x = 1\n")


def test_dataset_verify_cell_registers_its_class_for_the_task(ip):
    cell = ("class DatasetVerify:\n"
            "    def __init__(self, task_id, current_node):\n"
            "        self.node = current_node\n"
            "    def run(self):\n"
            "        return True\n")

    ip.run_cell_magic("dataset_verify", "digits-cell", cell)

    assert loaded_session().verify_classes["digits-cell"].__fedmagic_source__ == cell


def test_dataset_verify_cell_without_the_class_is_a_usage_error(ip):
    with pytest.raises(UsageError, match="must define a class named DatasetVerify"):
        ip.run_cell_magic("dataset_verify", "t", "x = 1\n")


def test_scheduler_defined_outside_the_cell_is_refused_before_anything_starts(ip, federation):
    ip.run_cell(as_fedmagic_script(tutorial_final_code(), "elsewhere").split("scheduler = ")[0])

    with pytest.raises(TaskDefinitionError, match="is defined outside this %%fedavg_task cell"):
        ip.run_cell_magic("fedavg_task", "", "DemoScheduler(min_clients=1, max_clients=1, "
                          "max_rounds=1).launch_task(task_id='elsewhere')\n")

    assert port_is_free(federation.port)


@pytest.mark.slow
def test_tutorial_code_in_a_fedavg_task_cell_runs_to_the_end_with_wait(
        ip, federation, monkeypatch):
    layout = federation.write_digits(3)
    for party in layout.nodes:
        federation.join(party.name, "tutorial-cell")
    federation.ready()
    monkeypatch.chdir(layout.initiator.workdir)
    cell = as_fedmagic_script(tutorial_final_code(), "tutorial-cell")
    cell = cell.replace("scheduler.launch_task(task_id='tutorial-cell')",
                        "result = scheduler.launch_task(task_id='tutorial-cell')")

    ip.run_cell_magic("fedavg_task", "--wait --join-timeout 60", cell)

    result = ip.user_ns["result"]
    assert isinstance(result, TaskResult)
    assert [row["participants"] for row in result.history] == [3] * 5
    for party in layout.nodes:
        assert federation.wait(party.name) == 0, federation.output(party.name)


@pytest.mark.slow
def test_cell_returns_at_once_and_rerunning_it_finds_the_running_task(
        ip, federation, monkeypatch):
    layout = federation.write_digits(2)
    for party in layout.nodes:
        federation.join(party.name, "background-cell")
    federation.ready()
    monkeypatch.chdir(layout.initiator.workdir)
    cell = as_fedmagic_script(tutorial_final_code(), "background-cell").replace(
        "max_rounds=5", "max_rounds=500")

    first = ip.run_cell_magic("fedavg_task", "--join-timeout 60", cell)
    again = ip.run_cell_magic("fedavg_task", "--join-timeout 60", cell)

    assert isinstance(first, TaskRun) and not first.done()
    assert again is first
    assert fedmagic.running_task("background-cell") is first
    assert wait_for(lambda: len(first.history) >= 1, 60)
    first.stop()
    assert first.wait(60).rounds < 500
    for party in layout.nodes:
        assert federation.wait(party.name) == 0, federation.output(party.name)


@pytest.mark.slow
def test_a_data_owner_reviews_verifies_and_accepts_in_the_participant_panel(
        ip, federation, monkeypatch):
    layout = federation.write_digits(2)
    federation.join("node-2", "panel")
    federation.ready()
    monkeypatch.chdir(layout.nodes[0].workdir)  # its data, and the shared test set
    run = start_task(DigitsScheduler(min_clients=2, max_clients=2, name="demo_task",
                                     max_rounds=2), "panel", join_timeout=60,
                     dataset_verify=TASKS / "hidden_verify.py")

    panel = ip.run_line_magic("fedavg_join", f"{federation.url} --task panel --node node-1")
    assert wait_for(lambda: not panel.accept_button.disabled, 60)
    # everything the hash covers: the arguments, the scheduler, the DatasetVerify file
    assert ("runs <code>DigitsScheduler(min_clients=2, max_clients=2, name=&#x27;demo_task&#x27;"
            ", max_rounds=2)</code>") in panel.code.value
    assert "class DigitsScheduler" in panel.code.value
    assert "Path(&quot;verify-ran.txt&quot;).write_text(" in panel.code.value
    assert not (layout.nodes[0].workdir / "verify-ran.txt").exists()
    assert panel.run.done() is False and run.history == []  # nothing runs before consent
    panel.verify_button.click()
    assert "data verified" in panel.verification.value
    panel.accept_button.click()
    result = run.wait(120)

    assert panel.accepted_hash == panel.package.code_hash
    assert [row["participants"] for row in result.history] == [2, 2]
    assert panel.run.wait(30).ok
    assert wait_for(lambda: panel.status.value.startswith("finished"), 10)
    assert panel.progress.value == 2


@pytest.mark.slow
def test_a_data_owner_who_declines_is_never_selected(ip, federation, monkeypatch):
    layout = federation.write_digits(2)
    federation.join("node-2", "declined")
    federation.ready()
    monkeypatch.chdir(layout.nodes[0].workdir)
    run = start_task(DigitsScheduler(min_clients=1, max_clients=2, name="demo_task",
                                     max_rounds=1), "declined", join_timeout=60, join_grace=8)

    panel = ip.run_line_magic("fedavg_join", f"{federation.url} --task declined --node node-1")
    assert wait_for(lambda: not panel.decline_button.disabled, 60)
    panel.decline_button.click()
    result = run.wait(120)

    assert result.participants["node-1"].status == "declined"
    assert result.history[0]["participants"] == 1
    assert panel.accepted_hash is None


@pytest.mark.slow
def test_consent_is_bound_to_the_code_hash_when_a_data_owner_joins_again(
        ip, federation, monkeypatch):
    layout = federation.write_digits(1)
    monkeypatch.chdir(layout.nodes[0].workdir)

    def launch(rounds: int):
        return start_task(DigitsScheduler(min_clients=1, max_clients=1, name="demo_task",
                                          max_rounds=rounds), "again", join_timeout=60)

    run = launch(1)
    panel = ip.run_line_magic("fedavg_join", f"{federation.url} --task again --node node-1")
    accepted = panel.wait_for_code(60)
    panel.accept()
    run.wait(120)
    assert panel.run.wait(30).ok

    run = launch(1)  # the same code and arguments: joins without asking
    panel.join()
    assert run.wait(120).rounds == 1
    assert panel.run.wait(30).ok
    assert panel.accept_button.disabled and "the code you accepted before" in panel.summary.value

    run = launch(2)  # other arguments, another hash: asked again, nothing runs meanwhile
    panel.join()
    changed = panel.wait_for_code(60)
    assert changed.code_hash != accepted.code_hash
    assert "The code changed since you accepted it" in panel.summary.value
    assert not panel.accept_button.disabled and run.history == []
    asked = panel.snapshot()  # about this code only, not the one accepted before
    assert (asked.accepted, asked.verified, asked.round, asked.max_rounds) == (False, None, 0, 2)
    panel.accept()
    assert run.wait(120).rounds == 2
    assert panel.accepted_hash == changed.code_hash


# The participant panel over what the engine's start_join hands it: the code offered (to
# consent to) and the events of the node's part, played here as a task would.

def offer(max_rounds: int | None, strategy: dict[str, Any] | None = None) -> TaskPackage:
    """The code a task offers, launched with ``max_rounds`` (or without saying)."""
    kwargs: dict[str, Any] = {"min_clients": 1, "max_clients": 1}
    if max_rounds is not None:
        kwargs["max_rounds"] = max_rounds
    return TaskPackage("digits", "DigitsScheduler", "class DigitsScheduler: ...\n", "task.py",
                       [], kwargs, strategy=strategy)


class Join:
    """One join as start_join runs it: the panel's consent and on_event, called by the test."""

    def __init__(self, consent: Callable[[TaskPackage], bool],
                 on_event: Callable[[str, dict[str, Any]], None]) -> None:
        self.consent, self.on_event = consent, on_event
        self.answer: bool | None = None
        self._done = threading.Event()
        self._answered: threading.Thread | None = None

    def offers(self, package: TaskPackage) -> None:
        """Send the code; the panel's owner answers later (on a thread, as the engine asks)."""
        def ask() -> None:
            self.answer = self.consent(package)
        self._answered = threading.Thread(target=ask, daemon=True)
        self._answered.start()

    def answered(self) -> bool | None:
        assert self._answered is not None
        self._answered.join(10)
        return self.answer

    def ends(self, outcome: JoinOutcome | None = None, error: BaseException | None = None) -> None:
        self.on_event("ended", {"outcome": outcome, "error": error})
        self._done.set()

    def done(self) -> bool:
        return self._done.is_set()

    def leave(self) -> None:
        self.ends(JoinOutcome("digits", "hospital-a", False, "left the task"))


@pytest.fixture
def joins(monkeypatch) -> list[Join]:
    """Every join a ParticipantPanel starts, newest last."""
    started: list[Join] = []

    def start_join(url, task, token, node, consent, *, on_event, **options) -> Join:
        started.append(Join(consent, on_event))
        return started[-1]

    monkeypatch.setattr(panel_module, "start_join", start_join)
    return started


def test_a_declined_offer_of_changed_code_is_neither_accepted_nor_verified(joins):
    panel = ParticipantPanel("ws://relay", "digits", "T", "hospital-a")
    first = joins[-1]
    first.offers(offer(max_rounds=3))
    panel.wait_for_code(10)
    panel.verify_data()
    panel.accept()
    assert first.answered() is True
    first.on_event("verified", {"samples": 719, "max_rounds": 3})
    for round in (1, 2, 3):
        first.on_event("uploaded", {"round": round})
    first.ends(JoinOutcome("digits", "hospital-a", True, "finished", rounds=3))
    assert panel.snapshot().round == 3

    panel.join()  # the author launched again with max_rounds=4: other code, asked again
    asked_again = joins[-1]
    asked_again.offers(offer(max_rounds=4))
    panel.wait_for_code(10)
    asked = panel.snapshot()
    panel.decline()
    declined_offer = asked_again.answered()
    asked_again.ends(JoinOutcome("digits", "hospital-a", False, "consent refused"))
    declined = panel.snapshot()

    assert (asked.accepted, asked.declined, asked.verified) == (False, False, None)
    assert (asked.round, asked.max_rounds) == (0, 4)
    assert "data verified" not in panel.verification.value
    assert declined_offer is False
    assert (declined.accepted, declined.declined, declined.verified) == (False, True, None)
    assert declined.detail == "declined: none of this code runs on this node"
    assert "you declined code hash" in panel.summary.value


def test_before_the_code_arrives_a_panel_shows_no_round_bar_and_accepts_nothing(joins):
    panel = ParticipantPanel("ws://relay", "digits", "T", "hospital-a")
    waiting = panel.snapshot()
    joins[-1].offers(offer(max_rounds=None))  # the rounds are the scheduler's default
    panel.wait_for_code(10)
    offered, bar_shown = panel.snapshot(), panel.progress.layout.display != "none"
    panel.accept()
    joins[-1].answered()
    joins[-1].on_event("verified", {"samples": 719, "max_rounds": 5})
    joined = panel.snapshot()

    assert (waiting.code_hash, waiting.accepted, waiting.max_rounds) == (None, False, None)
    assert offered.max_rounds is None and not bar_shown
    assert (joined.accepted, joined.max_rounds, joined.verified) == (True, 5, True)
    assert joined.verification == "719 training samples"
    assert panel.progress.layout.display is None and panel.progress.max == 5


def test_joining_again_with_the_accepted_code_asks_nothing_and_says_it_is_accepted(joins):
    panel = ParticipantPanel("ws://relay", "digits", "T", "hospital-a")
    joins[-1].offers(offer(max_rounds=2))
    panel.wait_for_code(10)
    panel.accept()
    joins[-1].answered()
    joins[-1].ends(JoinOutcome("digits", "hospital-a", True, "finished", rounds=2))

    panel.join()
    joins[-1].offers(offer(max_rounds=2))

    assert joins[-1].answered() is True
    assert panel.snapshot().accepted and panel.snapshot().max_rounds == 2


def test_a_data_owner_reads_the_privacy_guarantees_beside_the_code_before_accepting(joins):
    private = DifferentialPrivacy(sampling=0.5, noise_multiplier=1.1, target_epsilon=3.0)
    panel = ParticipantPanel("ws://relay", "digits", "T", "hospital-a")
    joins[-1].offers(offer(max_rounds=3, strategy=private.describe()))
    package = panel.wait_for_code(10)
    code, asked, undecided = panel.code.value, panel.snapshot(), not panel.accept_button.disabled
    panel.accept()
    joins[-1].answered()

    assert undecided  # shown while its owner is asked
    (line,) = package.guarantees
    assert line.startswith("differential privacy: epsilon at most 3 at delta 1e-05 (each update "
                           "clipped to L2 norm 1, each participant drawn with probability 0.5")
    shown = f"<div class='fedmagic-guarantee'><b>privacy</b>: {html.escape(line)}</div>"
    assert shown in code
    assert code.index(shown) < code.index("<details>")  # in sight, not folded with the code
    assert asked.guarantees == (line,) and asked.to_json()["guarantees"] == [line]
    assert not asked.accepted and panel.snapshot().accepted


def test_code_that_promises_no_privacy_shows_no_privacy_section(joins):
    panel = ParticipantPanel("ws://relay", "digits", "T", "hospital-a")
    joins[-1].offers(offer(max_rounds=3))
    panel.wait_for_code(10)

    assert "privacy" not in panel.code.value
    assert panel.snapshot().guarantees == ()
    panel.decline()
    joins[-1].answered()


@pytest.mark.parametrize("outcome, error, declined, said", [
    (JoinOutcome("t", "n", True, "finished", rounds=2), None, False,
     "finished: took part in 2 rounds"),
    (JoinOutcome("t", "n", True, "stopped by its author after round 1", rounds=1), None, False,
     "finished: stopped by its author after round 1"),
    (JoinOutcome("t", "n", False, "consent refused"), None, True,
     "declined: none of this code runs on this node"),
    (None, TaskFailed("t", "the initiator left the task without finishing it"), False,
     "did not finish: the initiator left the task without finishing it"),
], ids=["finished", "stopped", "declined", "task failed"])
def test_a_node_says_how_its_part_ended_without_repeating_itself(outcome, error, declined, said):
    assert ending_text(outcome, error, declined) == said


def test_a_long_failure_shows_as_one_line_with_the_rest_behind_a_disclosure(joins):
    panel = ParticipantPanel("ws://relay", "digits", "T", "hospital-a")
    failure = "RuntimeError: the relay broke\n" + "".join(f"  line {n}\n" for n in range(14))

    joins[-1].ends(error=RuntimeError(failure))

    assert panel.snapshot().detail.startswith("error: RuntimeError: the relay broke\n")
    assert panel.status.value.startswith(
        "<details class='fedmagic-more'><summary>error: RuntimeError: the relay broke</summary>")
    assert "line 13" in panel.status.value


TINY_TASK = '''
import torch
import torch.nn.functional as F
from torch.utils.data import DataLoader, TensorDataset
from fedmagic.fed_avg import FedAvgScheduler

INPUTS = torch.randn(60, 4, generator=torch.Generator().manual_seed(3))
LABELS = (INPUTS[:, 0] > 0).long()


class Tiny(FedAvgScheduler):
    def make_model(self):
        model = torch.nn.Linear(4, 2)
        self.optimizer = torch.optim.SGD(model.parameters(), lr=0.5)
        return model

    def make_train_dataloader(self):
        return DataLoader(TensorDataset(INPUTS, LABELS), batch_size=8)

    def make_test_dataloader(self):
        return DataLoader(TensorDataset(INPUTS, LABELS), batch_size=60)

    def state_dict(self): return self.model.state_dict()
    def load_state_dict(self, state): self.model.load_state_dict(state)

    def train(self):
        for inputs, labels in self.make_train_dataloader():
            self.optimizer.zero_grad()
            F.cross_entropy(self.model(inputs), labels).backward()
            self.optimizer.step()

    def test(self):
        with torch.no_grad():
            right = (self.model(INPUTS).argmax(1) == LABELS).float().mean()
        return {"accuracy": float(right)}


scheduler = Tiny(min_clients=1, max_clients=2, name='tiny', max_rounds=2)
scheduler.launch_task(task_id='tiny-cell', join_timeout=120)
'''


def test_fedavg_simulate_runs_the_last_task_cell_again_with_virtual_participants(
        ip, tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    real = ip.run_cell_magic("fedavg_task", "", TINY_TASK)  # waits for data owners meanwhile
    try:
        simulated = ip.run_line_magic("fedavg_simulate", "30 --partition by-label --engine local")
        result = simulated.wait(120)
    finally:
        real.stop(now=True)

    assert real is not simulated and not real.history  # the real task was left as it was
    assert [row["participants"] for row in result.history] == [30, 30]
    assert simulated.snapshot().simulation["partition"] == "by-label"
    assert result.checkpoint == tmp_path / "models" / "tiny-simulated"
    assert "30 participants, by-label (seed 0): 60 examples" in simulated.events[0][1]


def test_fedavg_simulate_names_the_tasks_it_could_run_again(ip):
    with pytest.raises(UsageError, match=r"no %%fedavg_task cell launched task 'nope' in this "
                       r"kernel \(launched: [^)]*\); run the task's cell first"):
        ip.run_line_magic("fedavg_simulate", "5 --task nope")
