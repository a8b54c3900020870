"""What every panel shares: inline bokeh set-up, the throttled-stream base of live plots, the panel protocol, layout helpers."""
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


class ThrottledStream:
    """Buffer -> throttle -> stream -> clear: the one loop behind every live plot in ``widgets``.

    A subclass builds its figure and ``ColumnDataSource`` s, calls ``super().__init__(figure, ...)``
    and implements :meth:`_columns` (the buffered items as new columns per source) and
    :meth:`_empty` (the empty columns per source). Its ``push`` buffers with :meth:`_add`; a redraw
    streams the whole buffer, one ``stream`` per source, at most every ``min_interval_s``, so a
    browser is never flooded with one message per step. Call :meth:`flush` at the end of a run.

    Attributes:
        figure: the bokeh figure; widget: its ``BokehModel``, to put in a layout.
        redraws: how many times buffered items were streamed.

    Raises:
        ValueError: ``min_interval_s < 0`` or ``rollover < 1``.
    """

    def __init__(self, fig: Any, *, min_interval_s: float, rollover: int | None = None) -> None:
        name = type(self).__name__
        if not min_interval_s >= 0:
            raise ValueError(f"{name}(min_interval_s={min_interval_s!r}): must be >= 0")
        if rollover is not None and rollover < 1:
            raise ValueError(f"{name}(rollover={rollover!r}): must be >= 1")
        self.min_interval_s, self.rollover = min_interval_s, rollover
        self.figure = fig
        self.widget = BokehModel(fig)
        self.redraws = 0
        self._pending: list[Any] = []
        self._last = -math.inf

    def _columns(self, pending: list[Any]) -> dict[ColumnDataSource, dict[str, list]]:
        """The buffered items as new rows, per source (a source without rows is left alone)."""
        raise NotImplementedError

    def _empty(self) -> dict[ColumnDataSource, dict[str, list]]:
        """Empty columns, per source."""
        raise NotImplementedError

    def _add(self, *items: Any) -> None:
        self._pending.extend(items)
        if time.monotonic() - self._last >= self.min_interval_s:
            self.flush()

    def flush(self) -> None:
        """Draw every buffered item now."""
        if not self._pending:
            return
        for source, new in self._columns(self._pending).items():
            if new and len(next(iter(new.values()))):
                source.stream(new, rollover=self.rollover)
        self._pending.clear()
        self._last = time.monotonic()
        self.redraws += 1

    redraw = flush  # the panel protocol's name for "draw what you hold, now"

    def clear(self) -> None:
        """Drop every point, drawn or pending."""
        self._pending.clear()
        for source, empty in self._empty().items():
            source.data = empty


class LivePlot(ThrottledStream):
    """A bokeh line plot that takes points as they come and redraws at most every ``min_interval_s``.

    ``push`` buffers points (numbers or 0-d torch tensors still on their device); a redraw
    converts the whole buffer at once (one device->host transfer) and streams it into
    :attr:`source` with ``rollover``. ``labels`` names series in the legend (default: their
    names); the legend sits outside the data (house style, :func:`widgets.plots.house_style`).

    Attributes:
        source: the ``ColumnDataSource`` (columns ``x_name`` and one per series).
        figure, widget, redraws: see :class:`ThrottledStream`.
    """

    def __init__(self, series: Sequence[str], *, x_name: str = "step", title: str = "",
                 y_label: str = "", x_label: str | None = None, y_log: bool = False, rollover: int = 5000,
                 min_interval_s: float = 0.25, width: int = 640, height: int = 260,
                 labels: dict[str, str] | None = None, legend: str = "right") -> None:
        from .plots import house_style

        if not series or len(set(series)) != len(series):
            raise ValueError(f"LivePlot(series={list(series)!r}): need distinct series names")
        if x_name in series:
            raise ValueError(f"LivePlot(x_name={x_name!r}): clashes with a series name")
        if rollover < 1:
            raise ValueError(f"LivePlot(rollover={rollover!r}): must be >= 1")
        self.series = tuple(series)
        self.x_name = x_name
        self.source = ColumnDataSource({x_name: [], **{s: [] for s in self.series}})
        fig = figure(title=title, width=width, height=height, x_axis_label=x_label or x_name,
                     y_axis_label=y_label, y_axis_type="log" if y_log else "linear",
                     tools="pan,wheel_zoom,box_zoom,reset,save")
        labels = labels or {}
        self.renderers = {name: fig.line(x_name, name, source=self.source, legend_label=labels.get(name, name),
                                         color=Category10_10[i % 10], line_width=2)
                          for i, name in enumerate(self.series)}
        house_style(fig, legend=legend if len(self.series) > 1 else "none")
        super().__init__(fig, min_interval_s=min_interval_s, rollover=rollover)

    def push(self, x: Any, **values: Any) -> None:
        """Add one point per named series at ``x``; missing series get NaN.

        Raises:
            ValueError: a name is not one of the plot's series.
        """
        unknown = set(values) - set(self.series)
        if unknown:
            raise ValueError(f"LivePlot.push: unknown series {sorted(unknown)}; known {self.series}")
        self._add((x, values))

    def _columns(self, pending: list[Any]) -> dict[ColumnDataSource, dict[str, list]]:
        cells = [x for x, _ in pending] + [v.get(s, math.nan) for _, v in pending for s in self.series]
        floats = _to_floats(cells)
        n = len(pending)
        new = {self.x_name: floats[:n]}
        for j, s in enumerate(self.series):
            new[s] = floats[n + j::len(self.series)]
        return {self.source: new}

    def _empty(self) -> dict[ColumnDataSource, dict[str, list]]:
        return {self.source: {self.x_name: [], **{s: [] for s in self.series}}}


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
    """The protocol every panel follows.

    - ``widget``: the panel's whole layout (an ipywidgets box); :attr:`view` is the same object;
    - displaying the panel (``panel`` as a cell's last line, or :meth:`display`) shows it as it is
      now (:func:`display_fresh`);
    - :meth:`redraw` draws what the panel holds, now (live plots are throttled between redraws);
    - parts of a panel that a notebook shows again further down are attributes holding a
      ``BokehModel`` or a figure, shown with :func:`display_fresh`.
    """

    widget: w.Widget

    @property
    def view(self) -> w.Widget:
        """The panel's layout (``widget``)."""
        return self.widget

    def display(self) -> None:
        """Show the panel as it is now."""
        display_fresh(self.widget)

    def redraw(self) -> None:
        """Draw everything the panel holds, now."""
        refresh_plots(self.widget)

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
