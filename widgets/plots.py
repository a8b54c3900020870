"""Static bokeh figures for the points a notebook makes: bars, lines, labelled scatters."""
from __future__ import annotations

from collections.abc import Sequence

from bokeh.models import ColumnDataSource, HoverTool, LabelSet
from bokeh.palettes import Category10_10
from bokeh.plotting import figure


def bar(categories: Sequence[str], values: Sequence[float], *, title: str = "", y_label: str = "",
        y_log: bool = False, width: int = 560, height: int = 280):
    """A bar chart of one value per category."""
    cats = [str(c) for c in categories]
    src = ColumnDataSource({"x": cats, "y": list(values),
                            "color": [Category10_10[i % 10] for i in range(len(cats))]})
    # a log axis needs an explicit range; a linear one keeps bokeh's automatic range
    extra = {"y_range": (min(v for v in values if v > 0) / 2, max(values) * 2)} if y_log else {}
    fig = figure(x_range=cats, title=title, width=width, height=height, y_axis_label=y_label,
                 y_axis_type="log" if y_log else "linear", tools="save", **extra)
    fig.vbar(x="x", top="y", width=0.7, color="color", source=src, bottom=0.001 if y_log else 0)
    fig.add_tools(HoverTool(tooltips=[("", "@x"), (y_label or "value", "@y{0,0.[000]}")]))
    return fig


def lines(x: Sequence[float], series: dict[str, Sequence[float]], *, title: str = "",
          x_label: str = "", y_label: str = "", width: int = 560, height: int = 280):
    """One line per named series over a shared x."""
    fig = figure(title=title, width=width, height=height, x_axis_label=x_label, y_axis_label=y_label,
                 tools="pan,wheel_zoom,reset,save")
    for i, (name, ys) in enumerate(series.items()):
        fig.line(list(x), list(ys), legend_label=name, color=Category10_10[i % 10], line_width=2)
    fig.legend.location = "top_left"
    return fig


def labelled_scatter(x: Sequence[float], y: Sequence[float], labels: Sequence[str], *, title: str = "",
                     x_label: str = "", y_label: str = "", x_log: bool = False,
                     width: int = 560, height: int = 320):
    """Points with a text label each (e.g. policies placed by bytes and recall)."""
    src = ColumnDataSource({"x": list(x), "y": list(y), "label": list(labels),
                            "color": [Category10_10[i % 10] for i in range(len(labels))]})
    fig = figure(title=title, width=width, height=height, x_axis_label=x_label, y_axis_label=y_label,
                 x_axis_type="log" if x_log else "linear", tools="save")
    fig.scatter("x", "y", size=12, color="color", source=src)
    fig.add_layout(LabelSet(x="x", y="y", text="label", source=src, x_offset=6, y_offset=4,
                            text_font_size="9pt"))
    fig.add_tools(HoverTool(tooltips=[("", "@label"), (x_label, "@x"), (y_label, "@y")]))
    return fig
