"""The live progress widget of a task, in its author's notebook.

Everything it shows lives in plain widget traits (HTML strings, a progress
bar, bqplot lines), so a saved notebook replays it without a kernel. It only
reads a ``TaskRun``; the run works the same with no widget at all.
"""

from __future__ import annotations

import html
import time
from typing import TYPE_CHECKING, Any, Sequence

import bqplot
import ipywidgets as widgets

from ..engine.state import NodeStatus, ParticipantState, TaskSnapshot, TaskStatus, metrics_of

if TYPE_CHECKING:
    from ..engine.launch import TaskRun

__all__ = ["TaskWidget", "show_task"]

LOG_LINES = 12
_BAR_STYLES = {
    TaskStatus.RUNNING: "info",
    TaskStatus.FINISHED: "success",
    TaskStatus.FAILED: "danger",
}
_GOOD, _BUSY, _BAD, _AWAY = "#2e7d32", "#1565c0", "#c62828", "#ef6c00"
_STATUS_COLOURS = {
    NodeStatus.READY: _GOOD,
    NodeStatus.UPLOADED: _GOOD,
    NodeStatus.TRAINING: _BUSY,
    NodeStatus.TRAINED: _BUSY,
    NodeStatus.UPLOADING: _BUSY,
    NodeStatus.REFUSED: _BAD,
    NodeStatus.FAILED: _BAD,
    NodeStatus.UNVERIFIED: _BAD,
    NodeStatus.DECLINED: _BAD,
    NodeStatus.DROPPED: _AWAY,
    NodeStatus.TIMED_OUT: _AWAY,
    NodeStatus.RECONNECTING: _AWAY,
}


def show_task(run: TaskRun) -> None:
    """How IPython shows a ``TaskRun``: the live widget in a kernel, its summary elsewhere."""
    from IPython import get_ipython
    from IPython.display import display

    if getattr(get_ipython(), "kernel", None) is None:
        print(run.summary())
    else:
        display(TaskWidget(run))


class TaskWidget(widgets.VBox):
    """Participants, round progress, a chart per metric, the event log and Stop."""

    def __init__(self, run: TaskRun) -> None:
        self.run = run
        self.header = widgets.HTML()
        self.progress = widgets.IntProgress(
            min=0, max=max(run.max_rounds, 1), description="round", bar_style="info"
        )
        self.table = widgets.HTML()
        self.charts = widgets.HBox(layout=widgets.Layout(flex_flow="row wrap"))
        self.event_log = widgets.HTML()
        self.stop_button = widgets.Button(
            description="Stop after this round",
            icon="stop",
            button_style="warning",
            layout=widgets.Layout(width="auto"),
        )
        self.stop_button.on_click(self._stop)
        self._lines: dict[str, bqplot.Lines] = {}
        super().__init__(
            [self.header, self.progress, self.table, self.charts, self.event_log, self.stop_button]
        )
        self.add_class("fedmagic-task")
        self.refresh()
        run.subscribe(self._on_event)

    def refresh(self) -> None:
        """Show the run as it is now."""
        task = self.run.snapshot()
        with self.hold_sync():
            self.header.value = _header(task)
            self.progress.value = min(task.round, self.progress.max)
            self.progress.bar_style = _BAR_STYLES[task.status]
            self.table.value = _table(task.participants)
            self.event_log.value = _log(self.run.events)
            self.stop_button.disabled = task.status != TaskStatus.RUNNING or task.stopping
            self._plot(task.history)

    def _plot(self, history: Sequence[dict[str, Any]]) -> None:
        tested = [row for row in history if row.get("tested")]
        names = [
            key
            for row in tested
            for key, value in metrics_of(row).items()
            if isinstance(value, (int, float)) and not isinstance(value, bool)
        ]
        for name in dict.fromkeys(names):
            points = [(row["round"], row[name]) for row in tested if name in row]
            if name not in self._lines:
                self._lines[name] = self._chart(name)
            line = self._lines[name]
            line.x = [x for x, _ in points]
            line.y = [y for _, y in points]

    def _chart(self, name: str) -> bqplot.Lines:
        x_scale, y_scale = bqplot.LinearScale(), bqplot.LinearScale()
        line = bqplot.Lines(x=[], y=[], scales={"x": x_scale, "y": y_scale}, marker="circle")
        figure = bqplot.Figure(
            marks=[line],
            title=name,
            fig_margin={"top": 40, "bottom": 40, "left": 50, "right": 20},
            axes=[
                bqplot.Axis(scale=x_scale, label="round", tick_format="d"),
                bqplot.Axis(scale=y_scale, orientation="vertical"),
            ],
            layout=widgets.Layout(width="320px", height="220px"),
        )
        self.charts.children = (*self.charts.children, figure)
        return line

    def _repr_mimebundle_(self, **kwargs: Any) -> dict[str, Any]:
        # Where widgets do not render (nbconvert, a terminal client), the task as text.
        bundle = super()._repr_mimebundle_(**kwargs)
        return {**bundle, "text/plain": self.run.summary()}

    def _on_event(self, text: str) -> None:
        self.refresh()

    def _stop(self, button: widgets.Button) -> None:
        self.run.stop()
        self.refresh()


def _header(task: TaskSnapshot) -> str:
    state = str(task.status)
    if task.error is not None:
        state += f": {html.escape(task.error)}{_traceback(task.error_traceback)}"
    return (
        f"<b>task {html.escape(task.task_id)}</b> &middot; {state}<br>"
        f"data owners join with: <code>{html.escape(task.join_command)}</code>"
    )


def _traceback(text: str) -> str:
    return (
        f"<details><summary>traceback</summary><pre>{html.escape(text)}</pre></details>"
        if text
        else ""
    )


def _table(participants: Sequence[ParticipantState]) -> str:
    if not participants:
        return "<i>no participant has joined yet</i>"
    rows = []
    for p in participants:
        colour = _STATUS_COLOURS.get(p.status, "inherit")
        seconds = f"{p.train_seconds:.2f}" if p.train_seconds is not None else ""
        rows.append(
            f"<tr><td>{html.escape(p.node)}</td>"
            f"<td style='color:{colour}'>{html.escape(p.status)}</td>"
            f"<td>{p.samples or ''}</td><td>{seconds}</td>"
            f"<td>{html.escape(p.detail)}{_traceback(p.traceback)}</td></tr>"
        )
    return (
        "<style>.fedmagic-participants td, .fedmagic-participants th"
        "{padding:2px 12px 2px 0;text-align:left}</style>"
        "<table class='fedmagic-participants'><tr><th>node</th><th>status</th>"
        "<th>samples</th><th>s per round</th><th>detail</th></tr>" + "".join(rows) + "</table>"
    )


def _log(events: list[tuple[float, str]]) -> str:
    lines = [
        f"{time.strftime('%H:%M:%S', time.localtime(stamp))} {text.splitlines()[0]}"
        for stamp, text in events[-LOG_LINES:]
    ]
    return (
        "<pre class='fedmagic-log' style='max-height:12em;overflow:auto'>"
        + html.escape("\n".join(lines))
        + "</pre>"
    )
