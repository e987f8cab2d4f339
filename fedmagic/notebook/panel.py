"""The participant panel: a data owner joins a task from their own notebook.

It shows the task's code and hash, checks the local data with the task's
``DatasetVerify`` (Verify data), and runs nothing until its owner accepts
that exact code. Consent is bound to the code's hash: joining again runs the
same code without asking, and asks again if the code changed. Training runs
on a thread of its own, so the kernel stays responsive; the panel follows
the rounds. Every button has a method of the same name, for scripts.
"""

from __future__ import annotations

import html
import threading
import traceback
from typing import Any, Callable

import ipywidgets as widgets

from ..engine.joining import JoinRun, start_join
from ..engine.participant import describe_failure, verify_data
from ..engine.state import JoinSnapshot
from ..engine.task import TaskPackage
from ..errors import VerificationFailed

__all__ = ["ParticipantPanel"]

LOG_LINES = 8


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
        self.summary = widgets.HTML(
            f"connecting to {html.escape(url)} as "
            f"<b>{html.escape(node)}</b>, waiting for task "
            f"<b>{html.escape(task)}</b>..."
        )
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
        self.package: TaskPackage | None = None
        #: The last Verify data: (passed, what it found), or None before any.
        self.verified: tuple[bool, str] | None = None
        #: Whether this node's part in the task is over (Join again starts another).
        self.ended = False
        self.accepted_hash: str | None = None
        #: What this node does now, as one line of text (the status line shows it).
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
        self.ended = False
        self._say("")
        self.progress.value = 0
        self.run = self._start()

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
                trace = f"<pre>{html.escape(traceback.format_exc())}</pre>"
        mark = (
            "<b style='color:#2e7d32'>data verified</b>"
            if passed
            else "<b style='color:#c62828'>verification failed</b>"
        )
        self.verification.value = f"{mark}: {html.escape(detail)}{trace}"
        self.verified = (passed, detail)
        self._on_change()
        return passed

    def leave(self) -> None:
        """Decline if still asked, and stop taking part."""
        self._decide(False)
        self.run.leave()

    def _start(self) -> JoinRun:
        self._code_shown.clear()
        self._decision.clear()
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
        if package.code_hash == self.accepted_hash:
            self.summary.value = (
                f"task <b>{html.escape(package.task_id)}</b>: the code you "
                f"accepted before (hash <code>{package.code_hash[:16]}</code>)"
                ", joining"
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
            f"<code>{package.code_hash[:16]}</code>. {notice}Review the "
            "code, verify your data, then accept to join."
        )
        verify = (
            ""
            if package.verify_source is None
            else f" and its DatasetVerify ({len(package.verify_source.splitlines())} lines)"
        )
        self.code.value = (
            f"<div>runs <code>{html.escape(package.call)}</code></div>"
            f"<details><summary>the task's code ({len(package.source.splitlines())}"
            f" lines){verify}, sha256 {package.code_hash}</summary><pre>"
            f"{html.escape(package.review())}</pre></details>"
        )
        for button in (self.verify_button, self.accept_button, self.decline_button):
            button.disabled = False
        self._code_shown.set()
        self._on_change()
        self._decision.wait()
        for button in (self.accept_button, self.decline_button):
            button.disabled = True
        if self._accepted:
            self.accepted_hash = package.code_hash
        self._on_change()
        return self._accepted

    def _decide(self, accept: bool) -> None:
        if not self._decision.is_set():
            self._accepted = accept
            self._decision.set()

    def _on_event(self, kind: str, details: dict[str, Any]) -> None:
        self._show(kind, details)
        self._on_change()

    def snapshot(self) -> JoinSnapshot:
        """This node's part in the task now, as the JupyterLab extension shows it."""
        passed, verification = self.verified if self.verified is not None else (None, "")
        return JoinSnapshot(
            self.task_id,
            self.node,
            self.ended,
            self._doing,
            self.package.code_hash if self.package is not None else None,
            self.accepted_hash is not None,
            self.progress.value,
            self.progress.max,
            passed,
            verification,
        )

    def _say(self, text: str) -> None:
        self._doing = text
        self.status.value = html.escape(text)

    def _show(self, kind: str, details: dict[str, Any]) -> None:
        if kind == "log":
            self._log_lines = [*self._log_lines[-(LOG_LINES - 1) :], details["text"]]
            self.task_log.value = (
                "<pre style='max-height:10em;overflow:auto'>"
                + html.escape("\n".join(self._log_lines))
                + "</pre>"
            )
            return
        if kind == "verified":
            self.progress.max = max(details["max_rounds"], 1)
            self._say(f"joined: {details['samples']} training samples")
        elif kind in ("round", "epoch"):
            epoch = f", epoch {details['epoch']}/{details['epochs']}" if kind == "epoch" else ""
            self._say(f"round {details['round']}: training{epoch}")
        elif kind == "uploaded":
            self.progress.value = min(self.progress.value + 1, self.progress.max)
            self._say(f"round {details['round']}: update sent")
        elif kind == "reconnecting":
            self._say(f"{details['why']}; reconnecting for up to {details['window']:g} s")
        elif kind == "reconnected":
            self._say("back in the task: this node keeps its model and its consent")
        elif kind == "ended":
            self.ended = True
            outcome, error = details["outcome"], details["error"]
            text = (
                f"error: {error}"
                if error is not None
                else f"finished: {outcome.reason}"
                if outcome.ok
                else f"did not finish: {outcome.reason}"
            )
            self._say(text)
            for button in (self.accept_button, self.decline_button, self.leave_button):
                button.disabled = True
            self.join_button.disabled = False
