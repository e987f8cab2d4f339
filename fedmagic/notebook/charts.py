"""The task widget's charts: one bqplot figure per numeric metric, by round.

Where participants evaluate the model on their own data too, a metric's
chart holds both lines: the initiator's test and the federated one
(``federated_accuracy`` beside ``accuracy``), with a legend. A
differentially private task has one more chart, after the metrics': the
epsilon spent after every round, tested or not, under its target.

The round axis is fixed to ``1..max_rounds`` from the first point, with
integer ticks, so it does not rescale as rounds come; each point has a
marker (round 1 alone shows) and a tooltip with its round and value.
Everything is a bqplot trait, so a saved notebook replays the charts.
"""

from __future__ import annotations

import math
from itertools import count
from typing import Any, Sequence

import bqplot
import ipywidgets as widgets

from ..engine.state import FEDERATED, epsilon_series, metric_series
from .task_html import is_percent_metric

__all__ = [
    "EpsilonChart",
    "MetricChart",
    "MetricCharts",
    "round_ticks",
    "value_domain",
    "value_ticks",
]

#: The line and its markers; JupyterLab's brand colour reads in the light and dark themes.
COLOUR = "var(--jp-brand-color1, #1976d2)"
#: The federated evaluation's line: the theme's warning colour, apart from the brand's.
FEDERATED_COLOUR = "var(--jp-warn-color1, #f57c00)"
#: The privacy budget's target: the theme's error colour, a line not to cross.
TARGET_COLOUR = "var(--jp-error-color1, #d32f2f)"
WIDTH, HEIGHT = "420px", "260px"
#: At most this many labelled values on the value axis.
VALUE_TICKS = 5
#: At most this many labelled rounds on the round axis.
ROUND_TICKS = 8


def round_ticks(last: int, most: int = ROUND_TICKS) -> list[int]:
    """Whole rounds to label on an axis from 1 to ``last``: all of them, or every 2, 5, 10..."""
    if last <= most:
        return list(range(1, last + 1))
    step = next(
        step
        for power in count()
        for step in (2 * 10**power, 5 * 10**power, 10 ** (power + 1))
        if last // step < most
    )
    return [1, *range(step, last + 1, step)]


def value_domain(values: Sequence[float], percent: bool) -> tuple[float, float]:
    """The value axis's range: the values with a margin; never empty, shares kept in [0, 1]."""
    low, high = min(values), max(values)
    margin = (high - low) * 0.08 or max(abs(high) * 0.1, 0.01 if percent else 1e-6)
    low, high = low - margin, high + margin
    if percent:
        low, high = max(low, 0.0), min(high, 1.0)
    return low, high


def value_ticks(low: float, high: float, most: int = VALUE_TICKS) -> list[float]:
    """Round values from ``low`` to ``high`` to label: at most ``most``, 1, 2, 2.5 or 5 apart."""
    power = math.floor(math.log10((high - low) / most))
    for step in (m * 10.0**p for p in range(power, power + 3) for m in (1, 2, 2.5, 5)):
        first, last = math.ceil(low / step), math.floor(high / step)
        if last - first + 1 <= most:
            break
    return [round(i * step, 12) for i in range(first, last + 1)]


def percent_format(ticks: Sequence[float]) -> str:
    """A d3 format for shares with as many decimals as the ticks need: ``.0%``, ``.1%``..."""
    for decimals in range(4):
        if all(abs(round(t * 100, decimals) - t * 100) < 1e-9 for t in ticks):
            return f".{decimals}%"
    return ".4%"


class MetricChart:
    """One metric's chart: a line through its tested rounds, a marker and tooltip on each."""

    def __init__(self, name: str, max_rounds: int) -> None:
        self.name = name
        if max_rounds > 1:
            self.x_scale = bqplot.LinearScale(min=1.0, max=float(max_rounds))
        elif max_rounds == 1:  # one round: in the middle, not on the axis
            self.x_scale = bqplot.LinearScale(min=0.5, max=1.5)
        else:  # rounds not known in advance: the axis grows with them
            self.x_scale = bqplot.LinearScale(min=1.0)
        self.y_scale = bqplot.LinearScale()
        scales = {"x": self.x_scale, "y": self.y_scale}
        self.tooltip = bqplot.Tooltip(fields=["x", "y"], labels=["round", name])
        self.tooltip.add_class("fm-tooltip")
        self.line = bqplot.Lines(
            x=[], y=[], scales=scales, colors=[COLOUR], stroke_width=2, labels=["initiator"]
        )
        self.dots = bqplot.Scatter(
            x=[], y=[], scales=scales, colors=[COLOUR], default_size=36, tooltip=self.tooltip
        )
        self.federated_tooltip = bqplot.Tooltip(
            fields=["x", "y"], labels=["round", f"{name} on participants' data"]
        )
        self.federated_tooltip.add_class("fm-tooltip")
        self.federated_line = bqplot.Lines(
            x=[],
            y=[],
            scales=scales,
            colors=[FEDERATED_COLOUR],
            stroke_width=2,
            line_style="dashed",
            labels=["federated"],
        )
        self.federated_dots = bqplot.Scatter(
            x=[],
            y=[],
            scales=scales,
            colors=[FEDERATED_COLOUR],
            default_size=36,
            tooltip=self.federated_tooltip,
        )
        self.x_axis = bqplot.Axis(
            scale=self.x_scale,
            label="round",
            tick_format="d",
            tick_values=round_ticks(max_rounds) if max_rounds else None,
        )
        self.y_axis = bqplot.Axis(scale=self.y_scale, side="left", label=name, label_offset="45px")
        self.figure = bqplot.Figure(
            marks=[self.line, self.dots, self.federated_line, self.federated_dots],
            axes=[self.x_axis, self.y_axis],
            title=name,
            title_style={"font-size": "14px"},
            fig_margin={"top": 36, "bottom": 46, "left": 64, "right": 24},
            padding_x=0.04,
            padding_y=0.04,
            layout=widgets.Layout(width=WIDTH, height=HEIGHT),
        )
        self._max_rounds = max_rounds
        self._points: tuple[list[tuple[int, float]], list[tuple[int, float]]] = ([], [])

    def show(
        self, points: list[tuple[int, float]], federated: list[tuple[int, float]] | None = None
    ) -> None:
        """Plot these ``(round, value)`` points, and the federated evaluation's, if they changed."""
        federated = federated or []
        if (points, federated) == self._points:
            return
        self._points = (points, federated)
        rounds = [x for x, _ in points + federated]
        values = [y for _, y in points + federated]
        percent = is_percent_metric(self.name, values)
        low, high = self._domain(values, percent)
        ticks = value_ticks(low, high)
        # The format first: bqplot redraws an axis with a transition that writes its labels
        # in the format current when the transition began.
        self.y_axis.tick_format = percent_format(ticks) if percent else "~g"
        self.tooltip.formats = ["d", ".1%" if percent else ".4~g"]
        self.federated_tooltip.formats = self.tooltip.formats
        self.y_axis.tick_values = ticks
        self.y_scale.min, self.y_scale.max = low, high
        if not self._max_rounds:
            self.x_axis.tick_values = round_ticks(max(rounds))
        for series, marks in (
            (points, (self.line, self.dots)),
            (federated, (self.federated_line, self.federated_dots)),
        ):
            for mark in marks:
                mark.x, mark.y = [x for x, _ in series], [y for _, y in series]
        self.line.display_legend = self.federated_line.display_legend = bool(federated)

    def _domain(self, values: list[float], percent: bool) -> tuple[float, float]:
        return value_domain(values, percent)


class EpsilonChart(MetricChart):
    """The privacy budget spent: epsilon after each round, and its target as a dashed line.

    The value axis starts at 0 and reaches past the target, so the line
    shows how much of the budget is left.
    """

    def __init__(self, max_rounds: int, delta: float, target: float | None) -> None:
        super().__init__("epsilon", max_rounds)
        self.target = target
        self.figure.title = "epsilon spent"
        self.tooltip.labels = ["round", f"epsilon at δ {delta:g}"]
        self.line.labels = ["spent"]
        self.target_line = bqplot.Lines(
            x=[],
            y=[],
            scales={"x": self.x_scale, "y": self.y_scale},
            colors=[TARGET_COLOUR],
            stroke_width=2,
            line_style="dashed",
            labels=[f"target {target:g}" if target is not None else "target"],
            display_legend=target is not None,
        )
        self.figure.marks = [*self.figure.marks, self.target_line]

    def show(
        self, points: list[tuple[int, float]], federated: list[tuple[int, float]] | None = None
    ) -> None:
        """Plot epsilon after each round, and the target across every round."""
        if self.target is not None and points != self._points[0]:
            last = max(x for x, _ in points)
            ends = [self.x_scale.min, self.x_scale.max] if self._max_rounds else [1.0, float(last)]
            self.target_line.x, self.target_line.y = ends, [self.target] * 2
        super().show(points)
        self.line.display_legend = self.target is not None

    def _domain(self, values: list[float], percent: bool) -> tuple[float, float]:
        target = [] if self.target is None else [self.target]
        return 0.0, value_domain([0.0, *values, *target], False)[1]


class MetricCharts(widgets.Box):
    """A chart per numeric metric ``test()`` returned, side by side, wrapping."""

    def __init__(self, max_rounds: int, **kwargs: Any) -> None:
        super().__init__(layout=widgets.Layout(flex_flow="row wrap", display="none"), **kwargs)
        self.max_rounds = max_rounds
        self.charts: dict[str, MetricChart] = {}
        #: The privacy budget's chart, once a round recorded the epsilon it spent.
        self.epsilon: EpsilonChart | None = None

    def show(
        self,
        history: Sequence[dict[str, Any]],
        privacy_target: tuple[float, float] | None = None,
    ) -> None:
        """Plot the tested rounds of ``history``; a new metric gets a new chart, and a
        federated one joins its metric's chart. Rounds that recorded the epsilon they
        spent get the epsilon chart, with ``privacy_target``'s epsilon as its target."""
        series = metric_series(history)
        for name, points in series.items():
            base = name.removeprefix(FEDERATED)
            if name != base and base in series:
                continue  # drawn with its metric
            chart = self.charts.get(name)
            if chart is None:
                chart = self.charts[name] = MetricChart(name, self.max_rounds)
                self._place()
            chart.show(points, series.get(FEDERATED + name))
        spent = epsilon_series(history)
        if spent:
            if self.epsilon is None:
                delta = next(row["delta"] for row in history if "epsilon" in row)
                target = None if privacy_target is None else privacy_target[0]
                self.epsilon = EpsilonChart(self.max_rounds, delta, target)
                self._place()
            self.epsilon.show(spent)

    def _place(self) -> None:
        """Show every chart's figure, the metrics' first."""
        # Shown before its first figure joins it: bqplot sizes a figure as it first
        # renders, and one rendered in a hidden box gets a plot area of minus its
        # margins, which the browser logs as errors (negative <rect> sizes).
        self.layout.display = None
        charts = [*self.charts.values(), *([self.epsilon] if self.epsilon else [])]
        self.children = tuple(each.figure for each in charts)
