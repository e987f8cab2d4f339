"""The task author's live widget: what it shows of a real task, and when.

Each test runs the tiny task through a relay and participants in this
process, builds the widget on its ``TaskRun`` and reads the widget's traits:
what a saved notebook replays, without a browser.
"""

from __future__ import annotations

import contextlib
import html
import re
import threading
import time
from typing import Iterator

import pytest
import torch

from fedmagic.engine.joining import start_join
from fedmagic.engine.launch import TaskRun, start_task
from fedmagic.engine.state import NodeStatus, epsilon_series
from fedmagic.notebook.charts import MetricCharts, round_ticks, value_ticks
from fedmagic.notebook.task_html import MASK, STYLE, is_percent_metric, value_text
from fedmagic.notebook.widget import TaskWidget
from fedmagic.strategies import DifferentialPrivacy, FedAvg, SecureAggregation
from fedmagic.wire.relay import EmbeddedRelay, Relay
from tiny import SlowTiny, Tiny

TOKEN = "widget-join-token"
pytestmark = pytest.mark.timeout(60)


class Graded(Tiny):
    """Tiny whose test() reports a falling loss and an accuracy that peaks in round 2."""

    def test(self):
        return {"loss": {1: 0.9, 2: 0.6, 3: 0.25}[self.current_round],
                "accuracy": {1: 0.5, 2: 0.942, 3: 0.9}[self.current_round]}


def graded(**options) -> Graded:
    """Three rounds, each tested."""
    return Graded(**{"min_clients": 1, "max_clients": 1, "max_rounds": 3, "log_rounds": 1,
                     **options})


class OwnData(Graded):
    """Graded, with test data on every node: each participant's test() gives 80% on its own."""

    def make_test_dataloader(self):
        return torch.utils.data.DataLoader(torch.utils.data.TensorDataset(torch.zeros(20)))

    def test(self):
        if self.current_round == 0:  # a participant's copy: it counts no rounds
            return {"loss": 0.5, "accuracy": 0.8}
        return super().test()


class Broken(Tiny):
    def test(self):
        raise ValueError("no test images in this copy")


class Faulty(Tiny):
    def train(self):
        raise RuntimeError("disk full")


@pytest.fixture(autouse=True)
def in_tmp_path(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)  # checkpoints go to models/


@contextlib.contextmanager
def relay(task_id: str, nodes: tuple[str, ...] = ("a",)) -> Iterator[str]:
    """A relay's URL, with ``nodes`` waiting to join ``task_id`` and consenting."""
    with EmbeddedRelay("127.0.0.1", 0, Relay()) as embedded:
        joins = [start_join(embedded.url, task_id, TOKEN, node, lambda package: True, wait=10,
                            quiet=True) for node in nodes]
        yield embedded.url
        for join in joins:
            join.wait(10)


def launch(scheduler, task_id: str, url: str, **options) -> TaskRun:
    return start_task(scheduler, task_id, relay=url, token=TOKEN, join_timeout=10,
                      join_grace=0, quiet=True, **{"strategy": FedAvg(weighted=False), **options})


def widget_of_finished(scheduler, task_id: str, **options) -> TaskWidget:
    """The widget of a task, watched from its start to its end."""
    with relay(task_id) as url:
        widget = TaskWidget(launch(scheduler, task_id, url, **options))
        with contextlib.suppress(Exception):  # a failed task is what some tests want
            widget.run.wait(30)
    return widget


@contextlib.contextmanager
def widget_in_training(task_id: str) -> Iterator[TaskWidget]:
    """The widget of a five-round task whose one node trains round 1 now."""
    with relay(task_id) as url:
        run = launch(SlowTiny(min_clients=1, max_clients=1, max_rounds=5, epoch_seconds=0.2),
                     task_id, url)
        widget = TaskWidget(run)
        wait_until_training(run)
        yield widget


def wait_until_training(run: TaskRun) -> None:
    deadline = time.monotonic() + 10
    while not any(p.status == NodeStatus.TRAINING for p in run.snapshot().participants):
        assert time.monotonic() < deadline, run.events
        time.sleep(0.01)


def html_parts(widget: TaskWidget) -> list[str]:
    return [part.value for part in widget.children if hasattr(part, "value")] + [
        widget.join_line.value, widget.summary.value]


def text(markup: str) -> str:
    """What a reader sees of some HTML: no tags, no style sheet, entities decoded."""
    return html.unescape(re.sub(r"<[^>]*>", "", re.sub(r"<style>.*?</style>", "", markup,
                                                       flags=re.S)))


def log_lines(widget: TaskWidget) -> list[tuple[str, str]]:
    """The log's lines as ``(class, text)``, in the order they are written (newest first)."""
    return [(kind, text(line)) for kind, line in re.findall(
        r"<div class='(fm-line[^']*)'>(.*?)</div>", widget.event_log.value, flags=re.S)]


def clock_thread(task_id: str) -> threading.Thread | None:
    return next((t for t in threading.enumerate() if t.name == f"fedmagic-widget-{task_id}"),
                None)


# -- the status header and the end of a task ---------------------------------------------------

def test_the_header_shows_the_task_its_state_and_the_round_count_on_the_bar():
    widget = widget_of_finished(graded(), "header")

    header = widget.header.value
    assert "task header" in text(header)
    assert "<span class='fm-badge fm-finished'>finished</span>" in header
    assert "aria-valuenow='3' aria-valuemax='3'" in header and "width:100.0%" in header
    assert "3 / 3" in text(header)
    assert re.search(r"round 3/3 · \d:\d\d elapsed · \d+\.\d s/round", text(header))
    assert "fm-budget" not in header and "fm-guarantee" not in header  # no privacy: no section
    assert "privacy" not in text(header) and "ε" not in text(header)


def test_after_the_end_a_summary_replaces_stop_with_best_values_and_the_checkpoint():
    widget = widget_of_finished(graded(), "summary")

    assert widget.children[1] is widget.stop_or_summary  # under the header
    assert widget.stop_or_summary.children == (widget.summary,)
    summary = text(widget.summary.value)
    assert "Finished all 3 rounds" in summary
    assert "rounds3 of 3" in summary
    assert re.search(r"time taken\d:\d\d · \d+\.\d s/round", summary)
    assert "best loss0.25 in round 3" in summary  # lower is better for a loss
    assert "best accuracy94.2% in round 2" in summary  # a share, as a percentage
    assert f"checkpoint{widget.run.checkpoint}" in summary
    assert widget.join_line.layout.display == "none"  # nobody joins a task that ended
    assert not any("finished: finished" in text(part) for part in html_parts(widget))


def test_while_running_the_header_shows_the_best_value_of_each_metric_so_far():
    headers: list[str] = []
    with relay("best") as url:
        run = launch(graded(), "best", url)
        widget = TaskWidget(run)
        run.subscribe(lambda event: headers.append(widget.header.value))  # after the widget's
        run.wait(30)

    assert any("best so far: loss <b>0.6</b> (round 2) · accuracy <b>94.2%</b> (round 2)"
               in header for header in headers), headers
    assert "best so far" not in widget.header.value  # the summary says it once it ended


def test_stop_says_it_is_stopping_then_gives_way_to_the_summary():
    with widget_in_training("stop") as widget:
        run = widget.run
        assert widget.stop_button.description == "Stop after this round"
        assert not widget.stop_button.disabled

        widget.stop_button.click()
        stopping = (widget.stop_button.description, widget.stop_button.disabled,
                    widget.header.value)
        run.wait(30)

    assert stopping[:2] == ("Stopping after this round…", True)
    assert "<span class='fm-badge fm-stopping'>stopping</span>" in stopping[2]
    assert widget.stop_or_summary.children == (widget.summary,)
    assert "Stopped by its author after round 1 of 5" in text(widget.summary.value)


def test_the_end_of_a_task_leaves_every_other_part_in_place():
    # ipywidgets draws every part after a changed one anew: the charts too, which drawn in
    # a hidden tab get no size
    with widget_in_training("in-place") as widget:
        parts = widget.children
        widget.stop_button.click()
        widget.run.wait(30)

    assert widget.stop_or_summary.children == (widget.summary,)
    assert widget.children == parts


def test_a_failed_task_says_why_once_with_its_traceback():
    widget = widget_of_finished(Broken(min_clients=1, max_clients=1, max_rounds=3), "broken")

    summary = widget.summary.value
    assert "<div class='fm-outcome fm-failed'>Failed: ValueError: no test images in this copy" \
        in summary
    assert "<summary>traceback</summary>" in summary
    assert "raise ValueError(&quot;no test images in this copy&quot;)" in summary
    assert "<span class='fm-badge fm-failed'>failed</span>" in widget.header.value
    assert "checkpoint" not in text(summary)  # no round ended: nothing was saved


def test_a_task_failed_error_is_not_prefixed_with_its_task_twice():
    # Tiny reports no samples: weighted averaging refuses every update, and the task fails.
    widget = widget_of_finished(Tiny(min_clients=1, max_clients=1, max_rounds=3), "twice",
                                strategy=FedAvg())

    outcome = text(re.search(r"<div class='fm-outcome[^']*'>.*?</div>",
                             widget.summary.value).group())
    assert outcome.startswith("Failed in round 1: only 0 of the 1 participants needed")
    everything = " ".join(text(part) for part in html_parts(widget))
    assert "task 'twice' failed in round 1" in everything  # the log's own line, once
    assert "failed: task" not in everything
    assert "failed in round 1: task" not in everything
    assert "log above" not in everything


def test_a_private_task_shows_its_guarantee_and_the_epsilon_spent_of_its_target():
    privacy = DifferentialPrivacy(FedAvg(weighted=False), noise_multiplier=2.0,
                                  target_epsilon=50.0)
    headers: list[str] = []
    with relay("private") as url:
        run = launch(graded(), "private", url, strategy=privacy)
        widget = TaskWidget(run)
        run.subscribe(lambda event: headers.append(widget.header.value))
        run.wait(30)

    spent = run.history[-1]["epsilon"]
    header = text(widget.header.value)
    assert f"ε {spent:.3g} of 50 spent at δ 1e-05" in header
    assert ("privacy differential privacy: epsilon at most 50 at delta 1e-05 (each update "
            "clipped to L2 norm 1") in header
    assert any("ε 0 of 50 spent at δ 1e-05" in text(h) for h in headers)  # before round 1
    assert re.search(r"<span class='fm-budget'[^>]*>ε ", widget.header.value)
    assert "epsilon" not in widget.charts.charts  # no metric of test()'s


def test_a_secure_task_shows_its_guarantee_and_what_the_initiator_saw_of_each_round():
    with relay("secure", nodes=("a", "b", "c")) as url:
        widget = TaskWidget(launch(graded(min_clients=3, max_clients=3), "secure", url,
                                   strategy=SecureAggregation(FedAvg(weighted=False))))
        widget.run.wait(30)

    header = text(widget.header.value)
    assert "seen: only the sum of 3 masked updates (t=2)" in header
    assert "privacy secure aggregation (SecAgg+): the initiator and the relay see each " \
           "round's sum of the updates, never one update" in header
    assert "threshold" not in widget.charts.charts and "error_bound" not in widget.charts.charts


def test_the_epsilon_chart_has_every_rounds_epsilon_under_the_target_line():
    privacy = DifferentialPrivacy(FedAvg(weighted=False), noise_multiplier=2.0,
                                  target_epsilon=50.0)
    widget = widget_of_finished(graded(log_rounds=0), "budget", strategy=privacy)

    chart = widget.charts.epsilon
    assert chart is not None and widget.charts.children[-1] is chart.figure  # after the metrics
    assert list(widget.charts.charts["loss"].line.x) == [1, 3]  # the first and last: tested
    assert list(chart.line.x) == list(chart.dots.x) == [1, 2, 3]  # every round
    assert list(chart.line.y) == pytest.approx([y for _, y in
                                                epsilon_series(widget.run.history)])
    assert 0 < chart.line.y[0] < chart.line.y[1] < chart.line.y[2] < 50
    assert list(chart.target_line.x) == [1, 3] and list(chart.target_line.y) == [50, 50]
    assert chart.y_scale.min == 0 and chart.y_scale.max > 50  # the target is in sight
    assert chart.figure.title == "epsilon spent"
    assert chart.tooltip.labels == ["round", "epsilon at δ 1e-05"]
    assert chart.target_line.labels == ["target 50"] and chart.target_line.display_legend
    assert all(colour.startswith("var(--jp-") for colour in
               chart.line.colors + chart.dots.colors + chart.target_line.colors)
    assert chart.target_line.line_style == "dashed"


# -- the log -----------------------------------------------------------------------------------

def test_the_newest_log_line_is_in_sight_and_info_lines_read_plainly():
    widget = widget_of_finished(graded(), "log")

    lines = log_lines(widget)
    assert len(lines) == len(widget.run.events)
    assert lines[0][1].endswith(widget.run.events[-1][1])  # written first, shown at the end
    assert re.search(r"\.fm-log \{[^}]*flex-direction: column-reverse", STYLE)
    assert {kind for kind, _ in lines} == {"fm-line"}  # nothing looks like an error


def test_the_log_shows_a_failure_as_an_error():
    widget = widget_of_finished(Broken(min_clients=1, max_clients=1, max_rounds=3), "red")

    (newest_kind, newest), *older = log_lines(widget)
    assert newest_kind == "fm-line fm-bad" and "failed: no test images" in newest
    assert all(kind == "fm-line" for kind, _ in older)


# -- the charts --------------------------------------------------------------------------------

def test_one_chart_per_metric_with_a_point_and_a_tooltip_per_tested_round():
    widget = widget_of_finished(graded(), "charts")

    assert list(widget.charts.charts) == ["loss", "accuracy"]
    assert len(widget.charts.children) == 2
    for name, chart in widget.charts.charts.items():
        assert chart.figure.marks[0] is chart.line
        assert list(chart.line.x) == list(chart.dots.x) == [1, 2, 3]
        assert chart.dots.tooltip.fields == ["x", "y"]
        assert chart.dots.tooltip.labels == ["round", name]
        assert (chart.x_axis.label, chart.y_axis.label) == ("round", name)
        assert 2 <= len(chart.y_axis.tick_values) <= 5
        assert (chart.figure.layout.width, chart.figure.layout.height) == ("420px", "260px")
    accuracy, loss = widget.charts.charts["accuracy"], widget.charts.charts["loss"]
    assert accuracy.y_axis.tick_format.endswith("%") and accuracy.tooltip.formats[1] == ".1%"
    assert loss.y_axis.tick_format == "~g" and loss.tooltip.formats[1] == ".4~g"


def test_the_federated_evaluation_shares_its_metrics_chart_with_a_legend():
    widget = widget_of_finished(OwnData(min_clients=1, max_clients=1, max_rounds=3,
                                        log_rounds=1), "federated")

    assert list(widget.charts.charts) == ["loss", "accuracy"]  # no chart of its own
    accuracy = widget.charts.charts["accuracy"]
    assert list(accuracy.line.y) == [0.5, 0.942, 0.9]
    assert list(accuracy.federated_line.x) == list(accuracy.federated_dots.x) == [1, 2, 3]
    assert list(accuracy.federated_line.y) == pytest.approx([0.8] * 3)
    assert accuracy.line.display_legend and accuracy.federated_line.labels == ["federated"]
    assert accuracy.federated_tooltip.labels == ["round", "accuracy on participants' data"]
    table = widget.table.value
    assert "<th title='the global model tested on its own data" in table
    assert "loss 0.5, accuracy 80.0%" in text(table)


def test_the_charts_show_before_their_first_figure_joins_them():
    # bqplot sizes a figure as it first renders: one rendered in a hidden box gets a plot
    # area of minus its margins, and the browser logs negative <rect> sizes
    charts = MetricCharts(max_rounds=3)
    display_as_figures_join: list[str | None] = []
    charts.observe(lambda change: display_as_figures_join.append(charts.layout.display),
                   names="children")

    charts.show([{"round": 1, "tested": True, "loss": 0.9, "accuracy": 0.5}])

    assert len(charts.children) == 2 and display_as_figures_join == [None, None]


def test_without_federated_evaluation_charts_have_one_line_and_no_legend():
    widget = widget_of_finished(graded(), "alone")

    chart = widget.charts.charts["accuracy"]
    assert list(chart.federated_line.x) == [] and not chart.line.display_legend
    assert "on its data" not in widget.table.value
    assert widget.charts.epsilon is None and len(widget.charts.children) == 2  # no privacy


def test_where_elected_nodes_aggregate_each_row_says_which_rounds_that_node_aggregated():
    with relay("elected", nodes=("a", "b")) as url:
        widget = TaskWidget(launch(Tiny(min_clients=2, max_clients=2, max_rounds=3,
                                        is_centralized=False), "elected", url))
        widget.run.wait(30)

    table = widget.table.value
    assert "<th title='the rounds this node was elected to aggregate" in table
    assert "a● uploaded" in text(table) and "1, 3" in text(table) and "2" in text(table)
    assert "aggregated by b" in text(widget.event_log.value)


def test_the_round_axis_spans_every_round_from_the_first_point_with_whole_round_ticks():
    with widget_in_training("axis") as widget:
        widget.stop_button.click()  # the task ends after round 1: one point
        widget.run.wait(30)

    (chart,) = widget.charts.charts.values()
    assert list(chart.line.x) == list(chart.dots.x) == [1]  # a marker, where a line has none
    assert (chart.x_scale.min, chart.x_scale.max) == (1, 5)
    assert list(chart.x_axis.tick_values) == [1, 2, 3, 4, 5]
    assert chart.x_axis.tick_format == "d"


def test_long_tasks_label_a_few_whole_rounds_and_values_get_a_few_round_ticks():
    assert round_ticks(5) == [1, 2, 3, 4, 5]
    assert round_ticks(10) == [1, 2, 4, 6, 8, 10]
    assert round_ticks(500) == [1, 100, 200, 300, 400, 500]
    assert value_ticks(0.5, 0.92) == [0.5, 0.6, 0.7, 0.8, 0.9]
    assert value_ticks(0.93, 0.95) == [0.93, 0.935, 0.94, 0.945, 0.95]
    assert value_ticks(0.0, 1.0) == [0.0, 0.25, 0.5, 0.75, 1.0]


@pytest.mark.parametrize("name, values, shown", [
    ("accuracy", [0.942], "94.2%"),
    ("correct_rate", [0.5], "50.0%"),
    ("val_f1", [0.875], "87.5%"),
    ("accuracy", [94.2], "94.2"),  # already a percentage
    ("loss", [0.25], "0.25"),
    ("accumulated", [0.5], "0.5"),  # "acc" only as a word of its own
])
def test_shares_show_as_percentages_and_everything_else_as_numbers(name, values, shown):
    assert value_text(values[-1], is_percent_metric(name, values)) == shown


# -- participants, hyperparameters, joining ----------------------------------------------------

def test_participants_show_their_epoch_samples_and_when_they_were_last_seen():
    tables = []
    with relay("epochs") as url:
        run = launch(SlowTiny(min_clients=1, max_clients=1, max_rounds=1, merge_epochs=3,
                              epoch_seconds=0.15), "epochs", url)
        widget = TaskWidget(run)
        while not run.done():
            widget.refresh()
            tables.append(widget.table.value)
            time.sleep(0.02)
        run.wait(10)

    assert any("epoch 2/3" in table and "<td>just now</td>" in table for table in tables)
    assert any("<td class='fm-busy'>● training</td>" in table for table in tables)
    final = widget.table.value
    assert final.count("<tr>") == 2 and "<tr><td>a</td>" in final
    assert "<td class='fm-good'>● uploaded</td>" in final
    assert re.search(r"<td>\d\d:\d\d:\d\d</td>", final)  # once ended, when, not how long ago


def test_a_participants_traceback_is_one_click_away_below_the_table():
    widget = widget_of_finished(Faulty(min_clients=1, max_clients=1, max_rounds=3), "faulty")

    assert "(traceback below the table)" in widget.table.value
    assert "<td class='fm-bad'>● failed</td>" in widget.table.value
    tracebacks = widget.tracebacks.value
    assert tracebacks.startswith("<details><summary>traceback of <b>a</b>")
    assert "RuntimeError: disk full" in text(tracebacks)
    assert widget.children.index(widget.tracebacks) == widget.children.index(widget.table) + 1
    logged = [line for _, line in log_lines(widget) if "'a' failed during train" in line]
    assert logged and not [line for line in logged if "Traceback" in line]  # first lines only


def test_the_hyperparameters_are_collapsed_until_asked_for():
    widget = widget_of_finished(graded(merge_epochs=2), "hyper")

    part = widget.hyperparameters.value
    assert part.startswith("<details class='fm-hyperparameters'><summary>")  # not open
    assert "<tr><th>merge_epochs</th><td><code>2</code></td></tr>" in part


def test_the_join_token_is_masked_everywhere_but_in_the_copy_controls_data():
    with relay("secret", nodes=()) as url:  # nobody joins: the task waits, showing its join line
        run = launch(Tiny(min_clients=1, max_clients=1, max_rounds=1), "secret", url)
        widget = TaskWidget(run)
        parts, plain = html_parts(widget), widget._repr_mimebundle_()["text/plain"]
        join = widget.join_line.value
        run.stop()
        run.wait(10)

    assert f"--token {MASK} --node NAME</code>" in join
    copied = re.search(r'data-copy="([^"]*)"', join).group(1)
    assert html.unescape(copied) == run.join_command and TOKEN in run.join_command
    handler = html.unescape(re.search(r'onclick="([^"]*)"', join).group(1))
    assert "navigator.clipboard.writeText(t)" in handler
    assert "document.execCommand('copy')" in handler  # where the Clipboard API is not offered
    assert not [part for part in parts if TOKEN in re.sub(r'data-copy="[^"]*"', "", part)]
    assert any(f"participants join with:  fedmagic join {url}" in text(line)
               for _, line in log_lines(widget))  # the log's copy of the line, masked too
    assert TOKEN not in plain


# -- colours, the clock, and where widgets do not render ---------------------------------------

def test_colours_come_from_the_jupyterlab_theme():
    widget = widget_of_finished(graded(), "theme")

    theme_variable = r"var\(--[\w-]+(?:, #[0-9a-fA-F]{3,8})?\)"  # with a light-theme fallback
    for part in html_parts(widget):
        left = re.sub(theme_variable, "", part)
        assert not re.findall(r"#[0-9a-fA-F]{3,8}\b|rgba?\(", left), left
    assert re.findall(r"--fm-[\w-]+: var\(--jp-", STYLE)  # its own names stand for the theme's
    assert "[data-jp-theme-light='false'] .fedmagic-task" in STYLE
    assert "--bq-content-font-color: var(--jp-ui-font-color1" in STYLE  # bqplot's dark labels
    for chart in widget.charts.charts.values():
        assert all(colour.startswith("var(--jp-") for colour in
                   chart.line.colors + chart.dots.colors)


def test_the_clock_ticks_between_events_and_stops_with_the_task():
    with relay("clock") as url:
        run = launch(SlowTiny(min_clients=1, max_clients=1, max_rounds=1, epoch_seconds=1.6),
                     "clock", url)
        widget = TaskWidget(run)
        wait_until_training(run)
        events, before = len(run.events), widget.header.value
        time.sleep(1.1)
        quiet, after = len(run.events) == events, widget.header.value
        ticking = clock_thread("clock")
        run.wait(30)

    assert quiet  # no event came: only the clock refreshed the header
    assert after != before and "0:01 elapsed" in after
    assert ticking is not None and ticking.daemon
    ticking.join(2)
    assert not ticking.is_alive()


def test_the_widget_of_a_task_that_already_ended_starts_no_clock():
    with relay("late") as url:
        run = launch(Tiny(min_clients=1, max_clients=1, max_rounds=1), "late", url)
        run.wait(30)
    widget = TaskWidget(run)

    assert clock_thread("late") is None
    assert widget.stop_or_summary.children == (widget.summary,)
    assert "Finished" in text(widget.summary.value)


def test_where_widgets_do_not_render_the_task_shows_as_text():
    widget = widget_of_finished(Tiny(min_clients=1, max_clients=1, max_rounds=1), "plain")

    bundle = widget._repr_mimebundle_()

    assert bundle["text/plain"] == widget.run.summary()
    assert "application/vnd.jupyter.widget-view+json" in bundle
    assert "fedmagic-task" in widget._dom_classes


def test_where_participants_train_with_dp_sgd_each_row_says_the_epsilon_that_node_spent():
    from fedmagic.engine.state import ParticipantState, TaskSnapshot, TaskStatus
    from fedmagic.notebook.task_html import TaskMarkup

    def table(*epsilons):
        rows = tuple(ParticipantState(f"n{i}", NodeStatus.UPLOADED, 64, epsilon=epsilon)
                     for i, epsilon in enumerate(epsilons))
        snapshot = TaskSnapshot("private", TaskStatus.RUNNING, None, "", False, 5, rows, (),
                                "fedmagic join ws://x --task private")
        return TaskMarkup("").participants(snapshot)

    private = table(1.23456, None)
    assert "its ε</th>" in private
    assert "<td class='fm-number'>1.23</td>" in private  # n1 has not trained yet: blank
    assert "its ε" not in table(None, None)
