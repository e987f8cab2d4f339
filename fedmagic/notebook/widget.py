"""The live progress widget of a task, in its author's notebook.

From the top: a status header (task id, badge, ``round 3/5 · 0:41 elapsed
· ~0:27 left``, for a differentially private task ``ε 1.23 of 3 spent at δ
1e-05``, a bar with the round count, best values so far, the task's privacy
guarantees); Stop after this round, which the final summary replaces once
the task ended; the join line, token masked, with a Copy button; the
participants; a chart per metric, and one of epsilon spent; the
hyperparameters, collapsed; the event log, newest in sight.

Everything it shows lives in plain widget traits (HTML strings, bqplot
marks), so a saved notebook replays it without a kernel. It only reads a
``TaskRun``; the run works the same with no widget at all.
"""

from __future__ import annotations

import logging
import threading
import weakref
from typing import TYPE_CHECKING, Any, Callable

import ipywidgets as widgets

from ..engine.state import TaskStatus
from .charts import MetricCharts
from .task_html import STYLE, TaskMarkup

if TYPE_CHECKING:
    from ..engine.launch import TaskRun

__all__ = ["TaskWidget", "show_task"]

log = logging.getLogger("fedmagic")

#: How often the clock and the participants' progress refresh between events.
TICK_SECONDS = 1.0
STOP = "Stop after this round"
STOPPING = "Stopping after this round…"


def show_task(run: TaskRun) -> None:
    """How IPython shows a ``TaskRun``: the live widget in a kernel, its summary elsewhere."""
    from IPython import get_ipython
    from IPython.display import display

    if getattr(get_ipython(), "kernel", None) is None:
        print(run.summary())
    else:
        display(TaskWidget(run))


class TaskWidget(widgets.VBox):
    """Status, Stop or the final summary, join line, participants, charts, log."""

    def __init__(self, run: TaskRun) -> None:
        self.run = run
        self.markup = TaskMarkup(run.token)
        self.header = widgets.HTML()
        self.stop_button = widgets.Button(
            description=STOP,
            icon="stop",
            button_style="warning",
            tooltip="End the task once the current round is in; its checkpoint is kept",
            layout=widgets.Layout(width="auto", align_self="flex-start"),
        )
        self.stop_button.on_click(self._stop)
        self.summary = widgets.HTML()  # replaces the Stop button once the task ended
        # Stop, then the summary, in a box of their own: the widget's parts never change, as
        # ipywidgets draws every part after a changed one anew, the charts too, and a chart
        # drawn while its notebook is hidden (another tab in front) gets no size.
        self.stop_or_summary = widgets.VBox([self.stop_button])
        self.join_line = widgets.HTML()  # rewritten only when the task ends: Copy stays put
        self.table = widgets.HTML()
        self.tracebacks = widgets.HTML()
        self.charts = MetricCharts(run.max_rounds)
        self.hyperparameters = widgets.HTML()
        self.event_log = widgets.HTML()
        self.style_sheet = widgets.HTML(STYLE, layout=widgets.Layout(display="none"))
        self._lock = threading.Lock()  # events and the clock refresh from two threads
        self._logged = -1  # how many events the log shows
        self._ended = threading.Event()
        self._ticker: threading.Thread | None = None
        super().__init__(
            (
                self.header,
                self.stop_or_summary,
                self.join_line,
                self.table,
                self.tracebacks,
                self.charts,
                self.hyperparameters,
                self.event_log,
                self.style_sheet,  # last: the header is the widget's first text
            )
        )
        self.add_class("fedmagic-task")
        refresh = _weak_refresh(self)

        def on_event(text: str) -> None:
            refresh()

        run.subscribe(on_event)  # before the first refresh: no end goes unseen
        self.refresh()
        if not self._ended.is_set():
            self._ticker = threading.Thread(
                target=_tick,
                args=(refresh, self._ended),
                name=f"fedmagic-widget-{run.task_id}",
                daemon=True,  # never holds up the kernel's exit
            )
            self._ticker.start()

    def refresh(self) -> None:
        """Show the run as it is now; cheap when little changed."""
        with self._lock:
            task = self.run.snapshot()
            ended = task.status != TaskStatus.RUNNING
            self.header.value = self.markup.header(task)
            _show(self.join_line, "" if ended else self.markup.join_line(task.join_command))
            self.table.value = self.markup.participants(task)
            _show(self.tracebacks, self.markup.tracebacks(task))
            self.charts.show(task.history, task.privacy_target)
            _show(self.hyperparameters, self.markup.hyperparameters(task))
            events = self.run.events
            if len(events) != self._logged:
                self._logged = len(events)
                self.event_log.value = self.markup.event_log(
                    events, failed=task.status == TaskStatus.FAILED
                )
            if ended:
                self.summary.value = self.markup.summary(task, self.run.stop_requested)
                self.stop_or_summary.children = (self.summary,)
            else:
                self.stop_button.disabled = task.stopping
                self.stop_button.description = STOPPING if task.stopping else STOP
        if ended:
            self._ended.set()  # the clock stops

    def close(self) -> None:
        self._ended.set()
        super().close()

    def _repr_mimebundle_(self, **kwargs: Any) -> dict[str, Any]:
        # Where widgets do not render (nbconvert, a terminal client), the task as text.
        bundle = super()._repr_mimebundle_(**kwargs)
        return {**bundle, "text/plain": self.run.summary()}

    def _stop(self, button: widgets.Button) -> None:
        self.run.stop()
        self.refresh()


def _show(part: widgets.HTML, value: str) -> None:
    """Set an HTML part, hidden while empty (an empty one still takes a line)."""
    part.value = value
    part.layout.display = None if value else "none"


def _weak_refresh(widget: TaskWidget) -> Callable[[], bool]:
    """``widget.refresh``, without keeping the widget alive: the run and the clock hold this.

    Returns whether the widget is still there.
    """
    ref = weakref.ref(widget)

    def refresh() -> bool:
        alive = ref()
        if alive is not None:
            alive.refresh()
        return alive is not None

    return refresh


def _tick(refresh: Callable[[], bool], ended: threading.Event) -> None:
    """The clock: refresh every second between events, until the task ended."""
    try:
        while not ended.wait(TICK_SECONDS) and refresh():
            pass
    except Exception:  # a broken display is logged; the task goes on without its clock
        log.exception("the task widget's clock stopped")
