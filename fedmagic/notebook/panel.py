"""The participant panel: a data owner joins a task from their own notebook.

It shows the task's code and hash, and what its strategy promises about
privacy ("differential privacy: epsilon at most 3 at delta 1e-05 (...)"),
checks the local data with the task's ``DatasetVerify`` (Verify data), and
runs nothing until its owner accepts that exact code. Consent is bound to
the code's hash: joining again runs the same code without asking, and asks
again if the code changed. Training runs on a thread of its own, so the
kernel stays responsive; the panel follows the rounds. Every button has a
method of the same name, for scripts.
"""

from __future__ import annotations

import html
import threading
import traceback
from typing import Any, Callable

import ipywidgets as widgets

from ..engine.joining import JoinRun, start_join
from ..engine.participant import JoinOutcome, describe_failure, verify_data
from ..engine.state import JoinSnapshot
from ..engine.task import TaskPackage
from ..errors import TaskFailed, VerificationFailed

__all__ = ["ParticipantPanel", "ending_text", "guarantees_html", "rounds_offered"]

LOG_LINES = 8
#: Longer first lines are cut in the status line; the whole text is one click away.
HEADLINE_CHARS = 120


class ParticipantPanel(widgets.VBox):
    """Join ``task`` at ``url`` as ``node``: review, verify, accept, train."""

    def __init__(
        self,
        url: str,
        task: str,
        token: str,
        node: str,
        wait: float = 300.0,
        on_change: Callable[[], None] = lambda: None,
    ) -> None:
        self._on_change = on_change
        self.url, self.task_id, self.token, self.node, self.wait = url, task, token, node, wait
        self.summary = widgets.HTML()
        self.code = widgets.HTML()
        self.verify_button = widgets.Button(description="Verify data", icon="check", disabled=True)
        self.accept_button = widgets.Button(
            description="Accept and join", icon="play", button_style="success", disabled=True
        )
        self.decline_button = widgets.Button(description="Decline", disabled=True)
        self.join_button = widgets.Button(description="Join again", icon="sign-in", disabled=True)
        self.leave_button = widgets.Button(description="Leave", icon="sign-out")
        self.verification = widgets.HTML()
        self.status = widgets.HTML()
        self.progress = widgets.IntProgress(min=0, max=1, description="round")
        self.task_log = widgets.HTML()  # the task's log lines on this node
        self._log_lines: list[str] = []
        self.verify_button.on_click(lambda _: self.verify_data())
        self.accept_button.on_click(lambda _: self.accept())
        self.decline_button.on_click(lambda _: self.decline())
        self.join_button.on_click(lambda _: self.join())
        self.leave_button.on_click(lambda _: self.leave())
        super().__init__(
            [
                self.summary,
                self.code,
                widgets.HBox(
                    [
                        self.verify_button,
                        self.accept_button,
                        self.decline_button,
                        self.join_button,
                        self.leave_button,
                    ]
                ),
                self.verification,
                self.status,
                self.progress,
                self.task_log,
            ]
        )
        self.add_class("fedmagic-participant")
        #: The code offered in this join, once it arrived.
        self.package: TaskPackage | None = None
        #: This join's Verify data: (passed, what it found), or None before any.
        self.verified: tuple[bool, str] | None = None
        #: The data owner's answer to the code offered in this join; None while undecided.
        self.consent: bool | None = None
        #: The code last accepted: joining again with the same code asks nothing.
        self.accepted_hash: str | None = None
        #: The rounds the code offered runs; None while unknown.
        self.max_rounds: int | None = None
        #: Rounds this node took part in during this join.
        self.rounds = 0
        #: Whether this node's part in the task is over (Join again starts another).
        self.ended = False
        #: What this node does now (the status line shows it).
        self._doing = ""
        self._code_shown = threading.Event()
        self._decision = threading.Event()
        self._accepted = False
        self.run: JoinRun = self._start()

    def wait_for_code(self, timeout: float | None = None) -> TaskPackage:
        """Block until the task's code is here to review; return its package.

        Raises:
            TimeoutError: if it has not arrived after ``timeout`` seconds.
        """
        if not self._code_shown.wait(timeout):
            raise TimeoutError(
                f"task {self.task_id!r} has not sent its code to "
                f"{self.node!r} after {timeout:g} s: {self.run}"
            )
        assert self.package is not None, "the code is shown once its package is here"
        return self.package

    def accept(self) -> None:
        """Run the code shown, and only that code (its hash is what was accepted)."""
        if not self._code_shown.is_set():
            raise RuntimeError(
                "nothing to accept yet: the task's code has not arrived "
                "(panel.wait_for_code() waits for it)"
            )
        self._decide(True)

    def decline(self) -> None:
        """Refuse to run the code shown: this node is never selected."""
        self._decide(False)

    def join(self) -> None:
        """Join the task again after taking part or leaving."""
        if not self.run.done():
            return
        self.join_button.disabled = True
        self.leave_button.disabled = False
        self.run = self._start()
        self._on_change()

    def verify_data(self) -> bool | None:
        """Run the task's ``DatasetVerify`` on this node's data and show the outcome."""
        if self.package is None:
            return None
        self.verification.value = "verifying the data..."
        trace = ""
        try:
            passed = True
            detail = (
                "DatasetVerify.run() returned True"
                if verify_data(self.package, self.node)
                else "the task has no DatasetVerify"
            )
        except Exception as exc:
            passed, detail = False, describe_failure(exc)
            if not isinstance(exc, VerificationFailed):  # the verifier itself broke
                trace = _disclosure("traceback", traceback.format_exc())
        mark = (
            _tone("data verified", "success") if passed else _tone("verification failed", "error")
        )
        self.verification.value = f"{mark}: {html.escape(detail)}{trace}"
        self.verified = (passed, detail)
        self._on_change()
        return passed

    def leave(self) -> None:
        """Decline if still asked, and stop taking part."""
        self._decide(False)
        self.run.leave()

    def snapshot(self) -> JoinSnapshot:
        """This node's part in the task now, as the JupyterLab extension shows it.

        Only about the code offered in this join: with no code here yet, nothing
        is accepted, declined or verified.
        """
        package = self.package
        consent = self.consent if package is not None else None
        verified = self.verified if package is not None else None
        passed, verification = verified if verified is not None else (None, "")
        return JoinSnapshot(
            task_id=self.task_id,
            node=self.node,
            ended=self.ended,
            detail=self._doing,
            code_hash=package.code_hash if package is not None else None,
            accepted=consent is True,
            declined=consent is False,
            round=self.rounds,
            max_rounds=self.max_rounds,
            verified=passed,
            verification=verification,
            guarantees=tuple(package.guarantees) if package is not None else (),
        )

    def _start(self) -> JoinRun:
        # A new join is a new offer: nothing of the last one's code carries over.
        self._code_shown.clear()
        self._decision.clear()
        self.package, self.verified, self.consent, self.ended = None, None, None, False
        self.rounds = 0
        self._set_max_rounds(None)
        self.summary.value = (
            f"connecting to {html.escape(self.url)} as "
            f"<b>{html.escape(self.node)}</b>, waiting for task "
            f"<b>{html.escape(self.task_id)}</b>..."
        )
        self.code.value = self.verification.value = ""
        self.verify_button.disabled = True
        self._say("")
        return start_join(
            self.url,
            self.task_id,
            self.token,
            self.node,
            self._consent,
            wait=self.wait,
            on_event=self._on_event,
            quiet=True,
        )

    def _consent(self, package: TaskPackage) -> bool:
        # On the join's worker thread: show the code, then wait for its owner.
        self.package = package
        self._set_max_rounds(rounds_offered(package))
        self.verify_button.disabled = False
        short = f"<code>{package.code_hash[:16]}</code>"
        if package.code_hash == self.accepted_hash:
            self.consent = True
            self.summary.value = (
                f"task <b>{html.escape(package.task_id)}</b>: the code you "
                f"accepted before (hash {short}), joining"
            )
            self._code_shown.set()
            self._on_change()
            return True
        notice = (
            "<b>The code changed since you accepted it.</b> "
            if self.accepted_hash is not None
            else ""
        )
        self.summary.value = (
            f"task <b>{html.escape(package.task_id)}</b>: "
            f"{html.escape(package.class_name)}, code hash "
            f"{short}. {notice}Review the code, verify your data, then accept to join."
        )
        verify = (
            ""
            if package.verify_source is None
            else f" and its DatasetVerify ({len(package.verify_source.splitlines())} lines)"
        )
        self.code.value = (
            f"<div>runs <code>{html.escape(package.call)}</code></div>{guarantees_html(package)}"
            f"<details><summary>the task's code ({len(package.source.splitlines())}"
            f" lines){verify}, sha256 {package.code_hash}</summary><pre>"
            f"{html.escape(package.review())}</pre></details>"
        )
        for button in (self.accept_button, self.decline_button):
            button.disabled = False
        self._code_shown.set()
        self._on_change()
        self._decision.wait()
        for button in (self.accept_button, self.decline_button):
            button.disabled = True
        self.consent = self._accepted
        if self._accepted:
            self.accepted_hash = package.code_hash
            self.summary.value = (
                f"task <b>{html.escape(package.task_id)}</b>: you accepted code hash "
                f"{short}, joining"
            )
        else:
            self.summary.value = (
                f"task <b>{html.escape(package.task_id)}</b>: you declined code hash "
                f"{short}; none of it runs here. Join again to review the task's code anew."
            )
        self._on_change()
        return self._accepted

    def _decide(self, accept: bool) -> None:
        if not self._decision.is_set():
            self._accepted = accept
            self._decision.set()

    def _on_event(self, kind: str, details: dict[str, Any]) -> None:
        self._show(kind, details)
        self._on_change()

    def _set_max_rounds(self, rounds: int | None) -> None:
        """Show the round bar only once the code offered says how many rounds it runs."""
        self.max_rounds = rounds
        self.progress.value = 0
        self.progress.max = rounds or 1
        self.progress.value = min(self.rounds, self.progress.max)
        self.progress.layout.display = None if rounds else "none"

    def _say(self, text: str) -> None:
        self._doing = text
        self.status.value = _headline_html(text)

    def _show(self, kind: str, details: dict[str, Any]) -> None:
        if kind == "log":
            self._log_lines = [*self._log_lines[-(LOG_LINES - 1) :], details["text"]]
            self.task_log.value = (
                "<pre class='fedmagic-log' style='max-height:10em;overflow:auto'>"
                + html.escape("\n".join(self._log_lines))
                + "</pre>"
            )
            return
        if kind == "verified":
            samples = f"{details['samples']} training samples"
            self._set_max_rounds(details["max_rounds"] or None)
            self.verified = (True, samples)
            self.verification.value = f"{_tone('data verified', 'success')} when joining: {samples}"
            self._say(f"joined: {samples}")
        elif kind in ("round", "epoch"):
            epoch = f", epoch {details['epoch']}/{details['epochs']}" if kind == "epoch" else ""
            self._say(f"round {details['round']}: training{epoch}")
        elif kind == "uploaded":
            self.rounds += 1
            self.progress.value = min(self.rounds, self.progress.max)
            self._say(f"round {details['round']}: update sent")
        elif kind == "reconnecting":
            self._say(f"{details['why']}; reconnecting for up to {details['window']:g} s")
        elif kind == "reconnected":
            self._say("back in the task: this node keeps its model and its consent")
        elif kind == "ended":
            self.ended = True
            self._say(ending_text(details["outcome"], details["error"], self.consent is False))
            for button in (self.accept_button, self.decline_button, self.leave_button):
                button.disabled = True
            self.join_button.disabled = False


def rounds_offered(package: TaskPackage) -> int | None:
    """The rounds the code offered runs, when its arguments say (``max_rounds=4``).

    Nothing of the code runs before its owner accepts it, so a number set
    anywhere else (a default, a positional argument) stays unknown until the
    node builds the task.
    """
    rounds = package.kwargs.get("max_rounds")
    if isinstance(rounds, int) and not isinstance(rounds, bool) and rounds > 0:
        return rounds
    return None


def guarantees_html(package: TaskPackage) -> str:
    """What the code offered promises about privacy, a line each, for review before consent.

    In full and outside the folded code: its data owner reads them before
    accepting. "" for code that promises nothing.
    """
    return "".join(
        f"<div class='fedmagic-guarantee'><b>privacy</b>: {html.escape(line)}</div>"
        for line in package.guarantees
    )


def ending_text(outcome: JoinOutcome | None, error: BaseException | None, declined: bool) -> str:
    """How a node's part in a task ended: a first line that says it, any details after."""
    if isinstance(error, TaskFailed):  # the panel names the task already
        return f"did not finish: {error.reason}"
    if error is not None:
        return f"error: {error}"
    assert outcome is not None, "a part that ended without an error has an outcome"
    if declined:
        return "declined: none of this code runs on this node"
    if not outcome.ok:
        return f"did not finish: {outcome.reason}"
    if outcome.reason == "finished":
        rounds = outcome.rounds
        return f"finished: took part in {rounds} round{'' if rounds == 1 else 's'}"
    return f"finished: {outcome.reason}"


def _tone(text: str, tone: str) -> str:
    """``text`` in bold, in the theme's colour for ``tone`` (success, error, warn)."""
    return f"<b class='fedmagic-{tone}'>{text}</b>"  # coloured by the extension's stylesheet


def _disclosure(summary: str, text: str) -> str:
    """``text`` folded away behind ``summary``: one line until its reader opens it."""
    return (
        f"<details class='fedmagic-more'><summary>{html.escape(summary)}</summary>"
        f"<pre style='white-space:pre-wrap'>{html.escape(text)}</pre></details>"
    )


def _headline_html(text: str) -> str:
    """``text`` as one line, its first; a longer text shows whole once opened."""
    first = text.split("\n", 1)[0]
    if first == text and len(first) <= HEADLINE_CHARS:
        return html.escape(text)
    if len(first) > HEADLINE_CHARS:
        first = first[: HEADLINE_CHARS - 1].rstrip() + "\u2026"
    return _disclosure(first, text)
