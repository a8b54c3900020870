"""What every panel shares: inline bokeh set-up, a throttled live line plot, layout helpers."""
from __future__ import annotations

import math
import time
from collections.abc import Sequence
from typing import Any

import ipywidgets as w
import torch
from bokeh.models import ColumnDataSource
from bokeh.palettes import Category10_10
from bokeh.plotting import figure
from jupyter_bokeh.widgets import BokehModel


def setup_notebook() -> None:
    """Load bokeh with inline resources (no CDN is reachable offline) and no banner."""
    from bokeh.io import output_notebook
    from bokeh.resources import INLINE

    output_notebook(resources=INLINE, hide_banner=True)


class LivePlot:
    """A bokeh line plot that takes points as they come and redraws at most every ``min_interval_s``.

    ``push`` buffers points (numbers or 0-d torch tensors still on their device); a redraw
    converts the whole buffer at once (one device->host transfer) and streams it into
    :attr:`source` with ``rollover``, so a browser is never flooded with one message per
    step. Call :meth:`flush` at the end of a run to draw the last points.

    Attributes:
        source: the ``ColumnDataSource`` (columns ``x_name`` and one per series).
        figure: the bokeh figure.
        widget: the ``jupyter_bokeh.BokehModel`` to put in a layout.
        redraws: how many times points were streamed to the plot.
    """

    def __init__(self, series: Sequence[str], *, x_name: str = "step", title: str = "",
                 y_label: str = "", y_log: bool = False, rollover: int = 5000,
                 min_interval_s: float = 0.25, width: int = 640, height: int = 260) -> None:
        if not series or len(set(series)) != len(series):
            raise ValueError(f"LivePlot(series={list(series)!r}): need distinct series names")
        if x_name in series:
            raise ValueError(f"LivePlot(x_name={x_name!r}): clashes with a series name")
        if rollover < 1:
            raise ValueError(f"LivePlot(rollover={rollover!r}): must be >= 1")
        if min_interval_s < 0:
            raise ValueError(f"LivePlot(min_interval_s={min_interval_s!r}): must be >= 0")
        self.series = tuple(series)
        self.x_name = x_name
        self.rollover = rollover
        self.min_interval_s = min_interval_s
        self.source = ColumnDataSource({x_name: [], **{s: [] for s in self.series}})
        self.figure = figure(title=title, width=width, height=height, x_axis_label=x_name,
                             y_axis_label=y_label, y_axis_type="log" if y_log else "linear",
                             tools="pan,wheel_zoom,box_zoom,reset,save")
        for i, name in enumerate(self.series):
            self.figure.line(x_name, name, source=self.source, legend_label=name,
                             color=Category10_10[i % 10], line_width=2)
        self.figure.legend.location = "top_right"
        self.figure.legend.click_policy = "hide"
        self.widget = BokehModel(self.figure)
        self.redraws = 0
        self._pending: list[tuple[Any, dict[str, Any]]] = []
        self._last = -math.inf

    def push(self, x: Any, **values: Any) -> None:
        """Add one point per named series at ``x``; missing series get NaN.

        Raises:
            ValueError: a name is not one of the plot's series.
        """
        unknown = set(values) - set(self.series)
        if unknown:
            raise ValueError(f"LivePlot.push: unknown series {sorted(unknown)}; known {self.series}")
        self._pending.append((x, values))
        if time.monotonic() - self._last >= self.min_interval_s:
            self.flush()

    def flush(self) -> None:
        """Draw every buffered point now."""
        if not self._pending:
            return
        cells = [x for x, _ in self._pending] + [v.get(s, math.nan) for _, v in self._pending
                                                 for s in self.series]
        floats = _to_floats(cells)
        n = len(self._pending)
        new = {self.x_name: floats[:n]}
        for j, s in enumerate(self.series):
            new[s] = floats[n + j::len(self.series)]
        self.source.stream(new, rollover=self.rollover)
        self._pending.clear()
        self._last = time.monotonic()
        self.redraws += 1

    def clear(self) -> None:
        """Drop every point, drawn or pending."""
        self._pending.clear()
        self.source.data = {self.x_name: [], **{s: [] for s in self.series}}


def _to_floats(cells: list[Any]) -> list[float]:
    """Numbers as floats; torch tensors among them move to the host in one stacked copy."""
    at = [i for i, c in enumerate(cells) if isinstance(c, torch.Tensor)]
    out = [math.nan if isinstance(c, torch.Tensor) else float(c) for c in cells]
    if at:
        host = torch.stack([cells[i].detach().reshape(()).double() for i in at]).cpu().tolist()
        for i, v in zip(at, host):
            out[i] = v
    return out


def refresh_plots(widget: w.Widget) -> int:
    """Re-send every bokeh plot under ``widget`` whole; returns how many.

    jupyter_bokeh sends a change to a plot only to the views that exist; a change made before the
    plot is first displayed (a panel drawing its first state in its constructor) would be lost and
    the page would show the plot as it was when wrapped. Re-serialising at display time fixes that.
    """
    stack, n = [widget], 0
    while stack:
        x = stack.pop()
        if isinstance(x, BokehModel):
            x.update_from_model(x._model)  # jupyter_bokeh keeps the wrapped model only privately
            n += 1
        stack.extend(getattr(x, "children", ()))
    return n


def display_fresh(widget: w.Widget) -> None:
    """Display ``widget`` with its plots as they are now (:func:`refresh_plots`, then ``display``):
    the way to show a part of a panel a second time, further down a notebook."""
    from IPython.display import display

    refresh_plots(widget)
    display(widget)


class Panel:
    """What every panel shares: ``widget`` (its layout), shown as it is now when the panel is displayed."""

    widget: w.Widget

    def _ipython_display_(self) -> None:
        display_fresh(self.widget)


def control_row(*children: w.Widget) -> w.HBox:
    """Controls side by side, wrapping when the page is narrow."""
    return w.HBox(list(children), layout=w.Layout(flex_flow="row wrap", grid_gap="8px"))


def panel_layout(title: str, controls: Sequence[w.Widget], body: Sequence[w.Widget],
                 output: w.Output | None = None) -> w.VBox:
    """The standard panel: a title, a row of controls, the plots, and an output area."""
    children: list[w.Widget] = [w.HTML(f"<h3 style='margin:4px 0'>{title}</h3>"), control_row(*controls)]
    children.extend(body)
    if output is not None:
        children.append(output)
    return w.VBox(children)
