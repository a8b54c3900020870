"""The house style of every bokeh figure in ``widgets``, and static figures that follow it.

House style (:func:`house_style`, applied to every figure a panel or a figure function builds):
legends sit outside the data area (right of it, or below a wide figure) and hide their series
on a click; titles and axis labels wrap to the figure's size (:func:`fit_text`; live titles go
through :func:`set_title`); colour that means something has a legend or a colour bar; axis labels
carry their units ("time (s)", "bytes per step (B)"); axis ranges follow the data (bokeh's
``DataRange1d``, never a hand-set start that cuts points off). The browser tests check these
rules on every figure of every notebook (``tests/browser/probe.js``: ``layoutProblems``).
"""
from __future__ import annotations

import textwrap
from collections.abc import Sequence
from typing import Any

from bokeh.models import ColumnDataSource, HoverTool, LabelSet, Legend
from bokeh.palettes import Category10_10
from bokeh.plotting import figure

TITLE_PX = 13  # bokeh's title font size (bold)
LABEL_PX = 13  # bokeh's axis-label font size (italic)
# mean advance of a character as a share of the font size; DejaVu Sans (Debian's chromium) is wide,
# so the estimate errs on the wide side and the browser check (exact, measured) never sees a cut
CHAR_EM = {"bold": 0.66, "normal": 0.60, "italic": 0.60}
LEGEND_PX = 11  # legend labels, in px


def fit_text(text: str, width_px: float, *, font_px: float = TITLE_PX, style: str = "bold") -> str:
    """``text`` broken at spaces into lines no wider than ``width_px`` (bokeh draws ``\n`` as a
    new line); a word longer than a line stays whole on its own line."""
    chars = max(8, int(width_px / (font_px * CHAR_EM.get(style, 0.66))))
    lines = [textwrap.fill(part, chars, break_long_words=False, break_on_hyphens=False)
             for part in str(text).split("\n")]
    return "\n".join(lines)


def title_width(fig: Any) -> float:
    """Pixels a title may take: the figure's width less the toolbar."""
    return fig.width - (40 if fig.toolbar_location in ("right", "left") else 10)


def set_title(fig: Any, text: str) -> None:
    """Give ``fig`` the title ``text``, wrapped to the figure's width (for titles that change live)."""
    fig.title.text = fit_text(text, title_width(fig))


def house_style(fig: Any, *, legend: str = "right") -> Any:
    """Apply the house style to ``fig`` and return it: wrapped title and axis labels, and its
    legends moved out of the data area (``legend``: ``"right"``, ``"below"``, ``"above"``, or
    ``"none"`` to drop a legend with one entry that the title already names)."""
    if legend not in ("right", "below", "above", "none"):
        raise ValueError(f"house_style(legend={legend!r}): expected right, below, above or none")
    if fig.title is not None and fig.title.text:
        set_title(fig, fig.title.text)
    for ax in fig.xaxis:
        if isinstance(ax.axis_label, str) and ax.axis_label:
            ax.axis_label = fit_text(ax.axis_label, fig.width - 90, font_px=LABEL_PX, style="italic")
    for ax in fig.yaxis:
        if isinstance(ax.axis_label, str) and ax.axis_label:
            ax.axis_label = fit_text(ax.axis_label, fig.height - 70, font_px=LABEL_PX, style="italic")
    for lg in [r for r in fig.center if isinstance(r, Legend)]:
        fig.center.remove(lg)
        if legend == "none":
            continue
        lg.location = "top_left" if legend == "right" else "left"
        lg.orientation = "vertical" if legend == "right" else "horizontal"
        fig.add_layout(lg, legend)
    for lg in fig.legend:
        lg.click_policy = "hide"
        lg.label_text_font_size = f"{LEGEND_PX}px"
        lg.glyph_height = lg.glyph_width = 14
        lg.label_height = 14
        lg.spacing = 2
        lg.padding = 4
        lg.margin = 2
        lg.border_line_alpha = 0
        lg.background_fill_alpha = 0.0
    return fig


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
    return house_style(fig)


def lines(x: Sequence[float], series: dict[str, Sequence[float]], *, title: str = "",
          x_label: str = "", y_label: str = "", width: int = 560, height: int = 280):
    """One line per named series over a shared x."""
    fig = figure(title=title, width=width, height=height, x_axis_label=x_label, y_axis_label=y_label,
                 tools="pan,wheel_zoom,reset,save")
    for i, (name, ys) in enumerate(series.items()):
        fig.line(list(x), list(ys), legend_label=name, color=Category10_10[i % 10], line_width=2)
    return house_style(fig)


def shared_labels(x: Sequence[float], y: Sequence[float], labels: Sequence[str], *, x_log: bool = False,
                  near: float = 0.04) -> list[str]:
    """Per point, the text to write beside it: points closer than ``near`` (a share of each axis's
    span) to an earlier labelled point write nothing, and that point writes all their names."""
    import math

    fx = [math.log10(v) if x_log and v > 0 else float(v) for v in x]
    fy = [float(v) for v in y]
    span_x = (max(fx) - min(fx)) or 1.0
    span_y = (max(fy) - min(fy)) or 1.0
    text = [""] * len(fx)
    heads: list[int] = []
    for i in range(len(fx)):
        head = next((h for h in heads if abs(fx[h] - fx[i]) / span_x < near and abs(fy[h] - fy[i]) / span_y < near),
                    None)
        if head is None:
            heads.append(i)
            text[i] = str(labels[i])
        else:
            text[head] += f", {labels[i]}"
    return text


def labelled_scatter(x: Sequence[float], y: Sequence[float], labels: Sequence[str], *, title: str = "",
                     x_label: str = "", y_label: str = "", x_log: bool = False,
                     width: int = 560, height: int = 320):
    """Points with a text label each (e.g. policies placed by bytes and recall). Points that would
    sit on one another share one label ("rule, q-learning"), so that no label is written over another."""
    text = shared_labels(x, y, labels, x_log=x_log)
    src = ColumnDataSource({"x": list(x), "y": list(y), "label": list(labels), "text": text,
                            "color": [Category10_10[i % 10] for i in range(len(labels))]})
    fig = figure(title=title, width=width, height=height, x_axis_label=x_label, y_axis_label=y_label,
                 x_axis_type="log" if x_log else "linear", tools="save")
    fig.scatter("x", "y", size=12, color="color", source=src)
    fig.add_layout(LabelSet(x="x", y="y", text="text", source=src, x_offset=6, y_offset=4,
                            text_font_size="9pt"))
    fig.x_range.range_padding = 0.35  # room right of the last point for its label
    fig.y_range.range_padding = 0.15
    fig.add_tools(HoverTool(tooltips=[("", "@label"), (x_label, "@x"), (y_label, "@y")]))
    return house_style(fig)


def colour_key(fig: Any, entries: dict[str, str], *, side: str = "right", marker: str = "square",
               title: str | None = None) -> Legend:
    """A legend of colour swatches (label -> colour) for colour that a glyph takes from its data
    (stages, kinds, levels): one invisible point per entry (NaN coordinates draw nothing), so that
    every swatch shows even before any data arrives. Returns the legend, placed on ``side``."""
    from bokeh.models import LegendItem

    labels = list(entries)
    nan = float("nan")
    src = ColumnDataSource({"x": [nan] * len(labels), "y": [nan] * len(labels), "color": list(entries.values())})
    r = fig.scatter("x", "y", source=src, color="color", marker=marker, size=12)
    lg = Legend(items=[LegendItem(label=lb, renderers=[r], index=i) for i, lb in enumerate(labels)],
                orientation="vertical" if side == "right" else "horizontal", location="top_left",
                title=title, title_text_font_size=f"{LEGEND_PX}px", label_text_font_size=f"{LEGEND_PX}px",
                glyph_height=14, glyph_width=14, label_height=14, spacing=2, padding=4, margin=2,
                border_line_alpha=0, background_fill_alpha=0.0)
    fig.add_layout(lg, side)
    return lg


def set_colour_key(lg: Legend, entries: dict[str, str]) -> None:
    """Give a :func:`colour_key` legend new entries (label -> colour), e.g. when k changes."""
    from bokeh.models import LegendItem

    r = lg.items[0].renderers[0] if lg.items else None
    if r is None:
        raise ValueError("set_colour_key: the legend was not made by colour_key")
    nan = float("nan")
    r.data_source.data = {"x": [nan] * len(entries), "y": [nan] * len(entries), "color": list(entries.values())}
    lg.items = [LegendItem(label=lb, renderers=[r], index=i) for i, lb in enumerate(entries)]


def key_entry(fig: Any, label: str, **glyph: Any) -> Any:
    """A legend entry for marks that may not exist yet (rollbacks, re-partitions): a scatter of one
    NaN point (it draws nothing) with the marks' ``glyph`` looks, so the key always shows its swatch."""
    nan = float("nan")
    return fig.scatter([nan], [nan], legend_label=label, **glyph)
