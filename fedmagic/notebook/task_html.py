"""The live task widget's markup: a snapshot in, HTML strings out.

:class:`TaskMarkup` turns a :class:`TaskSnapshot` into strings and keeps no
state of the task, so a saved notebook replays what it wrote and a test
reads it without a browser. Colours are JupyterLab's
theme variables (with light-theme fallbacks), so the widget reads as well in
the dark theme as in the light one. The join token is masked in every
string; only the copy control's data holds the full join line.
"""

from __future__ import annotations

import html
import re
import shlex
import time
from typing import Any, Sequence

from ..engine.state import (
    NodeStatus,
    ParticipantState,
    TaskSnapshot,
    TaskStatus,
    clock,
    failure_text,
    is_number,
    metric_series,
)

__all__ = [
    "LOG_LINES",
    "MASK",
    "STYLE",
    "TaskMarkup",
    "is_percent_metric",
    "value_text",
]

#: What the join token shows as.
MASK = "••••••••"
#: Events the log shows; all of them stay in ``TaskRun.events``.
LOG_LINES = 200

# Words that make a metric whose values lie in [0, 1] a share, shown as a percentage.
_SHARE_WORDS = frozenset({"accuracy", "acc", "rate", "precision", "recall", "f1"})

_STATUS_KINDS = {
    NodeStatus.READY: "good",
    NodeStatus.UPLOADED: "good",
    NodeStatus.JOINED: "busy",
    NodeStatus.TRAINING: "busy",
    NodeStatus.TRAINED: "busy",
    NodeStatus.UPLOADING: "busy",
    NodeStatus.TIMED_OUT: "warn",
    NodeStatus.RECONNECTING: "warn",
    NodeStatus.DROPPED: "warn",
    NodeStatus.REFUSED: "bad",
    NodeStatus.DECLINED: "bad",
    NodeStatus.UNVERIFIED: "bad",
    NodeStatus.FAILED: "bad",
}

# The copy control: the Clipboard API where the page is a secure context (https, localhost),
# else a hidden textarea and execCommand, which also works over plain http.
_COPY_SCRIPT = (
    "const b=this,t=b.dataset.copy,"
    "say=w=>{b.textContent=w;setTimeout(()=>{b.textContent='Copy'},1500)},"
    "old=()=>{const a=document.createElement('textarea');a.value=t;"
    "a.style.position='fixed';a.style.opacity='0';document.body.appendChild(a);a.select();"
    "let ok=false;try{ok=document.execCommand('copy')}catch(e){}a.remove();"
    "say(ok?'Copied':'Copy failed')};"
    "if(navigator.clipboard&&window.isSecureContext)"
    "navigator.clipboard.writeText(t).then(()=>say('Copied'),old);else old();"
)

#: The widget's stylesheet, scoped to its root (class ``fedmagic-task``).
STYLE = """<style>
.fedmagic-task {
  --fm-text: var(--jp-ui-font-color1, #212121);
  --fm-dim: var(--jp-ui-font-color2, #757575);
  --fm-good: var(--jp-success-color0, #1b5e20);
  --fm-busy: var(--jp-brand-color0, #0d47a1);
  /* the light theme's darkest orange reads at 3.8:1 on white: darkened towards the text */
  --fm-warn: color-mix(in srgb, var(--jp-warn-color0, #e65100) 70%,
    var(--jp-ui-font-color0, #000000));
  --fm-bad: var(--jp-error-color0, #b71c1c);
  --fm-fill-running: var(--jp-brand-color1, #1976d2);
  --fm-fill-stopping: var(--jp-warn-color1, #f57c00);
  --fm-fill-finished: var(--jp-success-color1, #388e3c);
  --fm-fill-failed: var(--jp-error-color1, #d32f2f);
  --fm-track: var(--jp-layout-color2, #eeeeee);
  --fm-panel: var(--jp-layout-color1, #ffffff);
  --fm-rule: var(--jp-border-color2, #e0e0e0);
  /* bqplot's own dark-theme rule makes titles and axis labels orange */
  --bq-content-font-color: var(--jp-ui-font-color1, #212121);
  --bq-axis-tick-text-fill: var(--jp-ui-font-color2, #757575);
  color: var(--fm-text);
  font-size: var(--jp-ui-font-size1, 13px);
}
[data-jp-theme-light='false'] .fedmagic-task {
  --fm-good: var(--jp-success-color2, #81c784);
  --fm-busy: var(--jp-brand-color2, #64b5f6);
  --fm-warn: var(--jp-warn-color2, #ffb74d);
  --fm-bad: var(--jp-error-color2, #e57373);
}
.fedmagic-task .fm-head { display: flex; flex-wrap: wrap; align-items: baseline; gap: 0 10px; }
.fedmagic-task .fm-title { font-size: var(--jp-ui-font-size2, 1.2em); }
.fedmagic-task .fm-status, .fedmagic-task .fm-dim, .fedmagic-task .fm-time,
.fedmagic-task .fm-caption { color: var(--fm-dim); }
.fedmagic-task .fm-badge { padding: 0 8px; border: 1px solid currentColor; border-radius: 9px;
  font-size: var(--jp-ui-font-size0, 11px); font-weight: 600; }
.fedmagic-task .fm-running { color: var(--fm-busy); --fm-fill: var(--fm-fill-running); }
.fedmagic-task .fm-stopping { color: var(--fm-warn); --fm-fill: var(--fm-fill-stopping); }
.fedmagic-task .fm-finished { color: var(--fm-good); --fm-fill: var(--fm-fill-finished); }
.fedmagic-task .fm-failed { color: var(--fm-bad); --fm-fill: var(--fm-fill-failed); }
.fedmagic-task .fm-budget { font-weight: 600; font-variant-numeric: tabular-nums; }
.fedmagic-task .fm-guarantee { margin: 2px 0; padding-left: 8px;
  border-left: 3px solid var(--fm-rule); overflow-wrap: anywhere; }
.fedmagic-task .fm-bar { position: relative; height: 18px; margin: 4px 0; border-radius: 3px;
  background: var(--fm-track); overflow: hidden; }
.fedmagic-task .fm-fill { height: 100%; background: var(--fm-fill); }
.fedmagic-task .fm-count { position: absolute; inset: 0; text-align: center; line-height: 18px;
  font-weight: 600; color: var(--jp-ui-font-color0, #000000);
  text-shadow: 0 0 3px var(--jp-layout-color0, #ffffff), 0 0 2px var(--jp-layout-color0, #ffffff); }
.fedmagic-task .fm-good { color: var(--fm-good); }
.fedmagic-task .fm-busy { color: var(--fm-busy); }
.fedmagic-task .fm-warn { color: var(--fm-warn); }
.fedmagic-task .fm-bad { color: var(--fm-bad); }
.fedmagic-task code { padding: 1px 4px; border-radius: 3px; background: var(--fm-track);
  color: var(--fm-text); font-family: var(--jp-code-font-family, monospace); }
.fedmagic-task .fm-copy { margin-left: 6px; padding: 1px 10px; border-radius: 3px;
  border: 1px solid var(--jp-border-color1, #bdbdbd); background: var(--fm-track);
  color: var(--fm-text); font: inherit; cursor: pointer; }
.fedmagic-task .fm-copy:hover { border-color: var(--jp-brand-color1, #1976d2); }
.fedmagic-task table { border-collapse: collapse; }
.fedmagic-task th, .fedmagic-task td { padding: 2px 14px 2px 0; text-align: left;
  vertical-align: top; }
.fedmagic-task .fm-people th { color: var(--fm-dim); font-weight: 600;
  border-bottom: 1px solid var(--fm-rule); }
.fedmagic-task .fm-people td { border-bottom: 1px solid var(--fm-rule); }
.fedmagic-task .fm-number { text-align: right; font-variant-numeric: tabular-nums; }
.fedmagic-task .fm-mini { display: inline-block; width: 48px; height: 6px; margin-right: 6px;
  border-radius: 3px; background: var(--fm-track); overflow: hidden; }
.fedmagic-task .fm-mini > span { display: block; height: 100%;
  background: var(--fm-fill-running); }
.fedmagic-task .fm-keys th { color: var(--fm-dim); font-weight: normal; }
.fedmagic-task details > summary { cursor: pointer; color: var(--fm-dim); }
.fedmagic-task pre { margin: 4px 0; padding: 6px 8px; max-height: 24em; overflow: auto;
  background: var(--fm-panel); border: 1px solid var(--fm-rule); color: var(--fm-text); }
.fedmagic-task .fm-summary { padding: 4px 12px; border-left: 3px solid var(--fm-fill);
  background: var(--fm-panel); color: var(--fm-text); }
.fedmagic-task .fm-outcome { font-weight: 600; }
.fedmagic-task .fm-outcome.fm-finished { color: var(--fm-good); }
.fedmagic-task .fm-outcome.fm-failed { color: var(--fm-bad); }
.fedmagic-task .fm-log { display: flex; flex-direction: column-reverse; max-height: 15em;
  overflow-y: auto; padding: 4px 8px; border: 1px solid var(--fm-rule); border-radius: 3px;
  background: var(--fm-panel); font-family: var(--jp-code-font-family, monospace);
  font-size: var(--jp-code-font-size, 13px); line-height: 1.45; }
.fedmagic-task .fm-line { white-space: pre-wrap; overflow-wrap: anywhere; color: var(--fm-text); }
.fedmagic-task .fm-line.fm-warn { color: var(--fm-warn); }
.fedmagic-task .fm-line.fm-bad { color: var(--fm-bad); }
.fedmagic-task .fm-many { display: flex; flex-direction: column; gap: 4px; }
.fedmagic-task .fm-counts { display: flex; flex-wrap: wrap; gap: 0 14px;
  font-variant-numeric: tabular-nums; }
.fedmagic-task .fm-spread { display: flex; flex-wrap: wrap; gap: 8px 28px; }
.fedmagic-task .fm-histogram { display: flex; align-items: flex-end; gap: 1px; height: 48px;
  padding-bottom: 1px; border-bottom: 1px solid var(--fm-rule); }
.fedmagic-task .fm-histogram > span { width: 12px; min-height: 1px;
  background: var(--fm-fill-running); }
.fedmagic-task .fm-axis { display: flex; justify-content: space-between;
  color: var(--fm-dim); font-size: var(--jp-ui-font-size0, 11px); }
/* the charts' tooltips live outside the widget, under the page's body */
.bqplot_mark_tooltip .fm-tooltip { color: var(--jp-ui-font-color1, #212121); }
</style>"""


def is_percent_metric(name: str, values: Sequence[float]) -> bool:
    """Whether ``name`` is a share (accuracy, a rate...) whose values all lie in [0, 1]."""
    words = set(re.split(r"[^a-z0-9]+", name.lower()))
    return bool(values) and bool(words & _SHARE_WORDS) and all(0 <= v <= 1 for v in values)


def value_text(value: float, percent: bool) -> str:
    """A metric's value as people read it: ``94.2%`` for a share, else 4 significant digits."""
    return f"{value:.1%}" if percent else f"{value:.4g}"


def _state_of(task: TaskSnapshot) -> str:
    """The badge: running, stopping, finished or failed."""
    return "stopping" if task.stopping else str(task.status)


class TaskMarkup:
    """Writes the markup of one task's widget, the join token masked in all of it."""

    def __init__(self, token: str) -> None:
        self._token = (
            re.compile(rf"(?<![\w-])({re.escape(token)}|{re.escape(shlex.quote(token))})(?![\w-])")
            if token
            else None
        )

    def text(self, text: str) -> str:
        """``text`` as HTML, the join token masked."""
        if self._token is not None:
            text = self._token.sub(MASK, text)
        return html.escape(text)

    def header(self, task: TaskSnapshot) -> str:
        """Task id, status badge, status line, privacy budget spent, a bar with the round
        count, best values so far, and the privacy guarantees."""
        state = _state_of(task)
        done, total = task.round, task.max_rounds
        share = min(done / total, 1.0) if total else 0.0
        best = self._best(task) if task.status == TaskStatus.RUNNING else []
        so_far = f"<div class='fm-dim'>best so far: {' · '.join(best)}</div>" if best else ""
        budget = task.budget_line()
        spent = (
            f"<span class='fm-budget' title='the privacy budget its rounds spent so far'>"
            f"{self.text(budget)}</span>"
            if budget
            else ""
        )
        seen = task.secure_line()
        if seen:
            spent += (
                "<span class='fm-budget' title='all the initiator held of the last round: "
                f"the sum, never one update'>{self.text(seen)}</span>"
            )
        return (
            f"<div class='fm-head'><span class='fm-title'>"
            f"{'simulation of task' if task.simulation is not None else 'task'} "
            f"<b>{self.text(task.task_id)}</b>"
            f"</span><span class='fm-badge fm-{state}'>{state}</span>"
            f"<span class='fm-status'>{self.text(task.status_line())}</span>{spent}</div>"
            f"<div class='fm-bar fm-{state}' role='progressbar' aria-label='rounds' "
            f"aria-valuemin='0' aria-valuenow='{done}' aria-valuemax='{total}'>"
            f"<div class='fm-fill' style='width:{share:.1%}'></div>"
            f"<span class='fm-count'>{done} / {total or '?'}</span></div>{so_far}"
            f"{self.guarantees(task)}"
        )

    def guarantees(self, task: TaskSnapshot) -> str:
        """What the task promises its data owners about privacy, a line each; "" for nothing.

        Written in full, never folded: the header is rewritten every second,
        which would close a disclosure as its reader opens it.
        """
        return "".join(
            f"<div class='fm-guarantee'><span class='fm-dim'>privacy</span> {self.text(line)}</div>"
            for line in task.guarantees
        )

    def join_line(self, command: str) -> str:
        """The line data owners run, token masked, and a button that copies it whole."""
        return (
            f"<div class='fm-join'><span class='fm-dim'>data owners join with</span> "
            f"<code>{self.text(command)}</code><button class='fm-copy' type='button' "
            f"title='Copy the whole line, join token included' "
            f'data-copy="{html.escape(command)}" onclick="{html.escape(_COPY_SCRIPT)}">'
            "Copy</button></div>"
        )

    def participants(self, task: TaskSnapshot) -> str:
        """One row per participant: status, progress, samples, time, last seen, detail."""
        if task.simulation is not None:
            return self.simulated(task.simulation)
        if not task.participants:
            return "<i class='fm-dim'>no data owner has joined yet</i>"
        evaluated = any(p.evaluation for p in task.participants)
        aggregated = _aggregated_rounds(task.history)
        private = any(p.epsilon is not None for p in task.participants)
        rows = "".join(
            self._row(p, task, evaluated, aggregated, private) for p in task.participants
        )
        own = (
            "<th title='the global model tested on its own data, at the last federated "
            "evaluation'>on its data</th>"
            if evaluated
            else ""
        )
        if aggregated:
            own += (
                "<th title='the rounds this node was elected to aggregate "
                "(is_centralized=False)'>aggregated</th>"
            )
        if private:
            own += (
                "<th class='fm-number' title='what its own DP-SGD spent so far, about the "
                "examples in its own data'>its ε</th>"
            )
        return (
            "<div class='fm-people'><table class='fedmagic-participants'><tr><th>node</th>"
            "<th>status</th><th>progress</th><th class='fm-number'>samples</th>"
            "<th class='fm-number' title='how long its last round of training took'>"
            f"s/round</th>{own}<th>last seen</th><th>detail</th></tr>" + rows + "</table></div>"
        )

    def simulated(self, simulation: dict[str, Any]) -> str:
        """Thousands of virtual participants, summed up: who they are, the round's progress,
        counts by status, the slowest and the left out, and how samples and train time spread."""
        workers = simulation["workers"]
        where = f"on {simulation['engine']}" + (
            f", {workers} worker{'s' if workers != 1 else ''}" if workers else ""
        )
        about = (
            f"<div class='fm-dim'>{simulation['participants']:,} virtual participants · "
            f"{self.text(simulation['partition'])} · {self.text(where)}</div>"
        )
        progress = simulation["round"]
        if progress is None:
            waiting = "<i class='fm-dim'>sharing out the training set, starting workers…</i>"
            return f"<div class='fm-many'>{about}{waiting}</div>"
        done, selected = progress["done"], progress["selected"]
        share = done / selected if selected else 0.0
        state = "finished" if progress["finished"] else "running"
        bar = (
            f"<div class='fm-bar fm-{state}' role='progressbar' "
            f"aria-label='participants done in round {progress['round']}' aria-valuemin='0' "
            f"aria-valuenow='{done}' aria-valuemax='{selected}'>"
            f"<div class='fm-fill' style='width:{share:.1%}'></div><span class='fm-count'>"
            f"round {progress['round']}: {done:,} / {selected:,} done</span></div>"
        )
        counts = "".join(
            f"<span class='fm-{_STATUS_TONE.get(status, 'dim')}'>{self.text(status)} "
            f"<b>{count:,}</b></span>"
            for status, count in sorted(progress["counts"].items(), key=lambda item: -item[1])
        )
        slowest = ", ".join(
            f"{self.text(node)} {seconds:.2f} s" for node, seconds in progress["slowest"]
        )
        left_out = "".join(
            f"<div class='fm-warn'><b>{count:,}</b> left out: {self.text(why)} ("
            + self.text(
                ", ".join(nodes)
                + (f" and {count - len(nodes):,} more" if count > len(nodes) else "")
            )
            + ")</div>"
            for why, count, nodes in progress["left_out"]
        )
        return (
            f"<div class='fm-many fedmagic-simulated'>{about}{bar}"
            f"<div class='fm-counts'>{counts}</div>"
            + (f"<div><span class='fm-dim'>slowest</span> {slowest}</div>" if slowest else "")
            + left_out
            + "<div class='fm-spread'>"
            + _histogram("samples each", progress["samples"], "{:.0f}")
            + _histogram("train seconds each", progress["seconds"], "{:.3f}")
            + "</div></div>"
        )

    def tracebacks(self, task: TaskSnapshot) -> str:
        """Each participant's traceback, collapsed, below the table.

        Not in the table: it is rewritten every second while the task runs,
        which would close a traceback as its reader opens it.
        """
        return "".join(
            f"<details><summary>traceback of <b>{self.text(p.node)}</b>: "
            f"{self.text(p.detail.splitlines()[0] if p.detail else str(p.status))}</summary>"
            f"<pre>{self.text(p.traceback)}</pre></details>"
            for p in task.participants
            if p.traceback
        )

    def hyperparameters(self, task: TaskSnapshot) -> str:
        """What the scheduler was built with, collapsed."""
        if not task.hyperparameters:
            return ""
        rows = "".join(
            f"<tr><th>{self.text(name)}</th><td><code>{self.text(_short_repr(value))}</code></td></tr>"
            for name, value in task.hyperparameters.items()
        )
        return (
            "<details class='fm-hyperparameters'><summary>hyperparameters</summary>"
            f"<table class='fm-keys'>{rows}</table></details>"
        )

    def event_log(self, events: Sequence[tuple[float, str]], failed: bool) -> str:
        """The newest events, oldest at the top; the box stays scrolled to the newest.

        The lines are written newest first into a ``column-reverse`` box:
        browsers show such a box from its end, so the newest line is in sight
        without a script to scroll it there, however often it is rewritten.
        """
        shown = events[-LOG_LINES:]
        lines = [
            self._log_line(stamp, text, _level(text, failed and index == len(shown) - 1))
            for index, (stamp, text) in enumerate(shown)
        ]
        if len(events) > len(shown):
            earlier = len(events) - len(shown)
            note = f"{earlier} earlier events are in TaskRun.events"
            lines.insert(0, f"<div class='fm-line fm-dim'>{note}</div>")
        return (
            f"<div class='fm-caption'>log · {len(events)} events</div>"
            f"<div class='fm-log'>{''.join(reversed(lines))}</div>"
        )

    def _log_line(self, stamp: float, text: str, level: str) -> str:
        """One event, its first line only: a traceback after it is in the table or summary."""
        first, _, rest = text.partition("\n")
        more = f" <span class='fm-dim' title='{self.text(rest.strip())}'>…</span>" if rest else ""
        return (
            f"<div class='fm-line{level}'><span class='fm-time'>"
            f"{time.strftime('%H:%M:%S', time.localtime(stamp))}</span> {self.text(first)}"
            f"{more}</div>"
        )

    def summary(self, task: TaskSnapshot, stopped_by_author: bool) -> str:
        """How the task ended, its rounds, time taken, best values and checkpoint."""
        state = str(task.status)
        outcome, more = self._outcome(task, stopped_by_author)
        rounds = f"{task.round} of {task.max_rounds or '?'}"
        if task.resumed_rounds:
            rounds += f" ({task.resumed_rounds} from its checkpoint)"
        taken = clock(task.elapsed)
        if task.seconds_per_round is not None:
            taken += f" · {task.seconds_per_round:.1f} s/round"
        rows = [("rounds", self.text(rounds)), ("time taken", self.text(taken))]
        rows += [
            (f"best {self.text(name)}", f"<b>{self.text(text)}</b> in round {round_}")
            for name, (round_, text) in self._best_values(task).items()
        ]
        if task.checkpoint and task.round:  # nothing is saved before a round ends
            rows.append(("checkpoint", f"<code>{self.text(task.checkpoint)}</code>"))
        cells = "".join(f"<tr><th>{key}</th><td>{value}</td></tr>" for key, value in rows)
        extra = f"<div class='fm-dim'>{self.text(more)}</div>" if more else ""
        if task.error_traceback:
            extra += (
                "<details><summary>traceback</summary>"
                f"<pre>{self.text(task.error_traceback)}</pre></details>"
            )
        return (
            f"<div class='fm-summary fm-{state}'>"
            f"<div class='fm-outcome fm-{state}'>{self.text(outcome)}</div>"
            f"<table class='fm-keys'>{cells}</table>{extra}</div>"
        )

    def _row(
        self,
        p: ParticipantState,
        task: TaskSnapshot,
        evaluated: bool,
        aggregated: dict[str, list[int]],
        private: bool,
    ) -> str:
        kind = _STATUS_KINDS.get(p.status, "busy")
        seconds = f"{p.train_seconds:.2f}" if p.train_seconds is not None else ""
        below = " <span class='fm-dim'>(traceback below the table)</span>" if p.traceback else ""
        own = f"<td>{self.text(_own_data(p))}</td>" if evaluated else ""
        if aggregated:
            own += f"<td>{self.text(_rounds_text(aggregated.get(p.node, [])))}</td>"
        if private:
            spent = "" if p.epsilon is None else f"{p.epsilon:.3g}"
            own += f"<td class='fm-number'>{spent}</td>"
        return (
            f"<tr><td>{self.text(p.node)}</td>"
            f"<td class='fm-{kind}'>● {self.text(p.status)}</td>"
            f"<td>{_progress(p)}</td>"
            f"<td class='fm-number'>{p.samples or ''}</td><td class='fm-number'>{seconds}</td>"
            f"{own}<td>{_last_seen(p, task)}</td><td>{self.text(p.detail)}{below}</td></tr>"
        )

    def _best(self, task: TaskSnapshot) -> list[str]:
        return [
            f"{self.text(name)} <b>{self.text(text)}</b> (round {round_})"
            for name, (round_, text) in self._best_values(task).items()
        ]

    @staticmethod
    def _best_values(task: TaskSnapshot) -> dict[str, tuple[int, str]]:
        best = {}
        for name, points in metric_series(task.history).items():
            found = task.best(name)
            if found is not None:
                percent = is_percent_metric(name, [value for _, value in points])
                best[name] = (found[0], value_text(found[1], percent))
        return best

    @staticmethod
    def _outcome(task: TaskSnapshot, stopped_by_author: bool) -> tuple[str, str]:
        """How it ended, as one line, and what else the error said."""
        total = task.max_rounds or "?"
        if task.status == TaskStatus.FAILED:
            first, _, more = (task.error or "").partition("\n")
            if not first.startswith("failed"):  # not a TaskFailed: name the error's type
                first = task.error_traceback.strip().rpartition("\n")[2] or first
            words = failure_text(first)
            return words[:1].upper() + words[1:], more
        if task.max_rounds and task.round >= task.max_rounds:
            return (f"Finished all {total} rounds" if task.max_rounds > 1 else "Finished"), ""
        if stopped_by_author:
            when = f"after round {task.round} of {total}" if task.round else "before round 1"
            return f"Stopped by its author {when}", ""
        return f"Finished after round {task.round} of {total}", ""


_STATUS_TONE = {"uploaded": "good", "failed": "bad", "refused": "warn"}


def _histogram(title: str, histogram: dict[str, list[float]], number: str) -> str:
    """Bars of a histogram (``fedmagic.engine.progress.histogram``), its range beneath."""
    counts, edges = histogram["counts"], histogram["edges"]
    if not counts:
        return ""
    tallest = max(counts)
    bars = "".join(
        f"<span style='height:{count / tallest:.0%}' title='{number.format(low)}–"
        f"{number.format(high)}: {count:.0f}'></span>"
        for count, low, high in zip(counts, edges, edges[1:], strict=False)
    )
    return (
        f"<div class='fm-hist'><div class='fm-dim'>{html.escape(title)}</div>"
        f"<div class='fm-histogram' role='img' aria-label='{html.escape(title)}'>{bars}</div>"
        f"<div class='fm-axis'><span>{number.format(edges[0])}</span>"
        f"<span>{number.format(edges[-1])}</span></div></div>"
    )


def _level(text: str, last_of_failed: bool) -> str:
    """The log line's class: warnings and errors stand out; everything else reads plainly."""
    if last_of_failed or text.startswith(("ERROR: ", "CRITICAL: ")):
        return " fm-bad"
    if text.startswith("WARNING: "):
        return " fm-warn"
    return ""


def _progress(p: ParticipantState) -> str:
    words = p.progress
    if not words:
        return ""
    if p.status == NodeStatus.TRAINING and p.epochs:
        share = min(p.epoch / p.epochs, 1.0)
    elif p.upload_size:
        share = min(p.uploaded / p.upload_size, 1.0)
    else:
        return html.escape(words)
    return f"<span class='fm-mini'><span style='width:{share:.0%}'></span></span>" + html.escape(
        words
    )


def _aggregated_rounds(history: Sequence[dict[str, Any]]) -> dict[str, list[int]]:
    """The rounds each node aggregated, where elected nodes aggregate (is_centralized=False)."""
    rounds: dict[str, list[int]] = {}
    for row in history:
        node = row.get("aggregator")
        if isinstance(node, str):
            rounds.setdefault(node, []).append(row["round"])
    return rounds


def _rounds_text(rounds: list[int], most: int = 6) -> str:
    """Round numbers, the newest ``most`` of them: ``1, 4, 7`` or ``… 10, 13 (6 rounds)``."""
    if len(rounds) <= most:
        return ", ".join(map(str, rounds))
    return "… " + ", ".join(map(str, rounds[-most:])) + f" ({len(rounds)} rounds)"


def _own_data(p: ParticipantState) -> str:
    """The global model's metrics on the node's own data, as ``accuracy 91.2%, loss 0.31``."""
    return ", ".join(
        f"{name} {value_text(value, is_percent_metric(name, [value]))}"
        for name, value in p.evaluation.items()
        if is_number(value)
    )


def _last_seen(p: ParticipantState, task: TaskSnapshot) -> str:
    """How long ago, while the task runs; the time of day once it ended (it will not change)."""
    if p.last_seen is None:
        return ""
    if task.status != TaskStatus.RUNNING:
        return time.strftime("%H:%M:%S", time.localtime(p.last_seen))
    ago = max(task.taken - p.last_seen, 0.0)
    if ago < 2:
        return "just now"
    if ago < 90:
        return f"{ago:.0f} s ago"
    if ago < 5400:
        return f"{ago / 60:.0f} min ago"
    return f"{ago / 3600:.0f} h ago"


def _short_repr(value: Any, most: int = 120) -> str:
    text = repr(value)
    return text if len(text) <= most else text[: most - 1] + "…"
