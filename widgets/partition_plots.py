"""Predictive partitioning, static views: plans side by side, the model graph by stage, stage
loads against the anchors, the pipeline schedule, the controller's run (house style throughout)."""
from __future__ import annotations

import math
from collections.abc import Mapping, Sequence

import networkx as nx
import numpy as np
import pandas as pd
from bokeh.models import (
    ColumnDataSource,
    DataRange1d,
    FactorRange,
    HoverTool,
    MultiLine,
    Scatter,
    Span,
)
from bokeh.palettes import Category10_10
from bokeh.plotting import figure, from_networkx

from adaptive_kit.partition import Simulation, simulate

from .plots import colour_key, house_style

OURS = "ours"
METIS = "METIS (repaired)"
ANCHORS = ("equal layers", "parameter balanced", "GPipe balance")
METHODS = (OURS, *ANCHORS, METIS)  # the order of the stage-load bars
STAGE_COLORS = Category10_10  # stage j's colour in every plot (k <= 10)
METHOD_COLORS = dict(zip(METHODS, (Category10_10[3], Category10_10[7], Category10_10[8], Category10_10[9],
                                   Category10_10[5])))
KIND_COLORS = {"F": Category10_10[0], "B": Category10_10[1], "U": Category10_10[7]}
MAX_K = 8  # the panel's k slider; the live load plot has glyphs for this many devices


# --- the graph -------------------------------------------------------------------------------------

def layered_layout(g: nx.DiGraph) -> dict[str, tuple[float, float]]:
    """Node positions: x the topological generation (distance from the inputs), y spread evenly
    and centred within a generation, in the graph's own node order."""
    rank = {v: i for i, v in enumerate(g.nodes)}
    pos = {}
    for x, gen in enumerate(nx.topological_generations(g)):
        for i, v in enumerate(sorted(gen, key=rank.__getitem__)):
            pos[v] = (float(x), i - (len(gen) - 1) / 2)
    return pos


def _graph_renderer(g: nx.DiGraph, stage_of: Mapping[str, int], cost: str):
    """``from_networkx`` with a layered layout; node columns ``stage``, ``color``, ``size`` and ``cost_ms``."""
    r = from_networkx(g, layered_layout(g))
    data = r.node_renderer.data_source.data
    c = np.array([float(g.nodes[v].get(cost, 0.0)) for v in data["index"]])
    top = c.max() if len(c) and c.max() > 0 else 1.0
    data["stage"] = [int(stage_of[v]) for v in data["index"]]
    data["color"] = [STAGE_COLORS[j % 10] for j in data["stage"]]
    data["size"] = (5 + 17 * np.sqrt(c / top)).tolist()  # area ~ cost
    data["cost_ms"] = (c * 1e3).tolist()
    return r


def graph_figure(g: nx.DiGraph, stage_of: Mapping[str, int], *, cost: str = "cost_s", title: str = "",
                 width: int = 960, height: int = 300):
    """The graph in a layered layout, nodes coloured by stage and sized by ``cost`` (hover: name,
    operation, stage, milliseconds). The node source is ``fig.renderers[0].node_renderer.data_source``."""
    fig = figure(title=title or f"{g.number_of_nodes()} nodes in {len(set(stage_of.values()))} stages",
                 width=width, height=height, tools="pan,wheel_zoom,box_zoom,reset,save",
                 x_axis_label="topological generation")
    fig.yaxis.visible = False
    fig.xgrid.visible = fig.ygrid.visible = False
    r = _graph_renderer(g, stage_of, cost)
    _style_graph(r)
    fig.renderers.append(r)
    fig.add_tools(HoverTool(renderers=[r], tooltips=[("node", "@index"), ("op", "@op @target"),
                                                     ("stage", "@stage"), ("cost", "@cost_ms{0.000} ms")]))
    stage_key(fig, len(set(stage_of.values())))
    return house_style(fig)


def stage_key(fig, k: int):
    """The legend of stage colours (node size: cost) on the right of ``fig``."""
    return colour_key(fig, {f"stage {j}": STAGE_COLORS[j % 10] for j in range(k)}, marker="circle",
                      title="size: cost")


def _style_graph(r) -> None:
    r.node_renderer.glyph = Scatter(size="size", fill_color="color", line_color="#333333", line_width=0.5)
    r.edge_renderer.glyph = MultiLine(line_color="#888888", line_alpha=0.5, line_width=1)


def load_bars(loads: Mapping[str, Sequence[float]], *, bound: float | None = None, title: str = "stage loads",
              width: int = 560, height: int = 280):
    """Grouped bars: each method's stage seconds side by side (ms), with the MILP lower bound on
    the bottleneck as a dashed line when given."""
    fig = figure(x_range=FactorRange(factors=[]), title=title, width=width, height=height,
                 y_axis_label="ms per step (speed 1)", tools="save", y_range=DataRange1d(start=0))
    src = ColumnDataSource(_bar_data(loads))
    fig.vbar(x="x", top="ms", width=0.85, color="color", source=src)
    fig.x_range.factors = list(src.data["x"])
    fig.xaxis.major_label_orientation = 1.2
    fig.xaxis.major_label_text_font_size = "7pt"
    span = Span(location=(bound or 0.0) * 1e3, dimension="width", line_dash="dashed", line_color="black",
                visible=bound is not None)
    fig.add_layout(span)
    fig.add_tools(HoverTool(tooltips=[("", "@method, stage @stage"), ("ms", "@ms{0.000}"),
                                      ("× bottleneck of ours", "@vs_ours{0.00}")]))
    return house_style(fig), src, span


def _bar_data(loads: Mapping[str, Sequence[float]]) -> dict[str, list]:
    ours = max(loads[OURS]) if OURS in loads else math.nan
    data: dict[str, list] = {"x": [], "method": [], "stage": [], "ms": [], "color": [], "vs_ours": []}
    for method, v in loads.items():
        for j, s in enumerate(v):
            data["x"].append((method, str(j)))
            data["method"].append(method)
            data["stage"].append(j)
            data["ms"].append(float(s) * 1e3)
            data["color"].append(METHOD_COLORS.get(method, Category10_10[j % 10]))
            data["vs_ours"].append(float(s) / ours)
    return data


def ratio_bars(table: pd.DataFrame, *, title: str = "bottleneck ÷ lower bound", y_label: str = "× lower bound",
               width: int = 760, height: int = 300):
    """Grouped bars of a (group x method) table, e.g. models x partitioners, with a line at 1."""
    x = [(str(g), str(m)) for g in table.index for m in table.columns]
    src = ColumnDataSource({"x": x, "group": [g for g, _ in x], "method": [m for _, m in x],
                            "y": [float(table.loc[g, m]) for g in table.index for m in table.columns],
                            "color": [METHOD_COLORS.get(m, Category10_10[i % 10])
                                      for _ in table.index for i, m in enumerate(table.columns)]})
    fig = figure(x_range=FactorRange(*x), title=title, width=width, height=height, y_axis_label=y_label,
                 tools="save")
    fig.vbar(x="x", top="y", width=0.85, color="color", source=src)
    fig.add_layout(Span(location=1.0, dimension="width", line_dash="dashed", line_color="black"))
    fig.xaxis.major_label_orientation = 1.2
    fig.xaxis.major_label_text_font_size = "7pt"
    fig.y_range.start = 0
    fig.add_tools(HoverTool(tooltips=[("", "@group: @method"), (y_label, "@y{0.000}")]))
    return house_style(fig)


def interval_figure(frame: pd.DataFrame, *, title: str = "one-step forecast with its interval",
                    width: int = 760, height: int = 260):
    """:func:`~adaptive_kit.partition.rolling_origin`'s frame: actual, ETS forecast and its interval."""
    fig = figure(title=title, width=width, height=height, x_axis_label="t", y_axis_label="utilisation",
                 tools="pan,wheel_zoom,reset,save")
    fig.varea(frame["t"], _finite(frame["lower"]), _finite(frame["upper"]), color=Category10_10[1], alpha=0.2,
              legend_label="ETS interval")
    fig.line(frame["t"], frame["actual"], color="black", legend_label="actual")
    fig.line(frame["t"], frame["ets"], color=Category10_10[1], line_width=2, legend_label="ETS")
    fig.line(frame["t"], frame["seasonal_naive"], color=Category10_10[2], line_dash="dashed",
             legend_label="seasonal naive")
    return house_style(fig)


# --- the schedule ------------------------------------------------------------------------------------

def schedule_of(stage_s: Sequence[float], micro: int, schedule: str) -> Simulation:
    """One step of a plan whose stages take ``stage_s`` (forward + backward of the whole batch):
    each micro-batch's forward is a third of its share, its backward two thirds."""
    per = np.asarray(stage_s, dtype=float) / micro
    return simulate(per / 3, 2 * per / 3, micro=micro, schedule=schedule)


def gantt_data(events: pd.DataFrame) -> dict[str, list]:
    """Columns for :func:`gantt_figure` from :attr:`Simulation.events` (times in ms)."""
    return {"stage": events["stage"].astype(int).tolist(), "micro": events["micro"].astype(int).tolist(),
            "kind": events["kind"].tolist(), "start": (events["start_s"] * 1e3).tolist(),
            "end": (events["end_s"] * 1e3).tolist(),
            "color": [KIND_COLORS.get(kd, "gray") for kd in events["kind"]]}


def gantt_figure(events: pd.DataFrame, *, title: str = "pipeline schedule", width: int = 560,
                 height: int = 260):
    """Stage on y (stage 0 on top), time on x; forward bars blue, backward orange, labelled by micro-batch."""
    src = ColumnDataSource(gantt_data(events))
    k = int(events["stage"].max()) + 1 if len(events) else 1
    fig = figure(title=title, width=width, height=height, x_axis_label="time in the step (ms)", y_axis_label="stage",
                 y_range=(k - 0.5, -0.5), tools="xpan,xwheel_zoom,reset,save")
    fig.hbar(y="stage", left="start", right="end", height=0.8, color="color", line_color="white",
             source=src)
    colour_key(fig, {"forward": KIND_COLORS["F"], "backward": KIND_COLORS["B"]})
    fig.yaxis.ticker = list(range(k))
    fig.add_tools(HoverTool(tooltips=[("", "@kind micro-batch @micro on stage @stage"),
                                      ("ms", "@start{0.000} – @end{0.000}")]))
    return house_style(fig), src


# --- the controller, static (for a finished run) -------------------------------------------------------

def throughput_figure(frame: pd.DataFrame, *, title: str = "throughput against the optimum",
                      width: int = 560, height: int = 260):
    """:meth:`EmulatedPipeline.frame` as lines of throughput and optimum, re-partitions as red crosses."""
    fig = figure(title=title, width=width, height=height, x_axis_label="window", y_axis_label="steps / s",
                 tools="pan,wheel_zoom,reset,save", y_range=DataRange1d(start=0))
    fig.line(frame["window"], frame["throughput"], legend_label="throughput", color=Category10_10[0], line_width=2)
    fig.line(frame["window"], frame["optimum"], legend_label="optimum", color="black", line_dash="dashed")
    rep = frame[frame["repartition"]]
    fig.scatter(rep["window"], rep["throughput"], marker="x", size=12, color="red", line_width=2,
                legend_label="re-partition")
    return house_style(fig)


def forecast_figure(history: pd.DataFrame, devices: Sequence[int] | None = None, *,
                    title: str = "load factor: measured, forecast interval, assumed", width: int = 560,
                    height: int = 260):
    """Per device: the measured load (solid), the one-window-ahead forecast interval made the
    window before (band), and the load the plan in force assumed (dotted), from
    :meth:`Controller.history`."""
    fig = figure(title=title, width=width, height=height, x_axis_label="window",
                 y_axis_label="measured / predicted", tools="pan,wheel_zoom,reset,save")
    for j in devices if devices is not None else sorted(history["device"].unique()):
        h = history[history["device"] == j].sort_values("window")
        color = STAGE_COLORS[j % 10]
        x = h["window"].to_numpy()
        lo, hi = _finite(h["lower"].to_numpy()), _finite(h["upper"].to_numpy())
        fig.varea(x[:-1] + 1, lo[:-1], hi[:-1], color=color, alpha=0.2, legend_label=f"device {j}")
        fig.line(x, h["load"], color=color, line_width=2, legend_label=f"device {j}")
        fig.line(x, h["assumed"], color=color, line_dash="dotted", legend_label=f"device {j}")
    return house_style(fig)


def _finite(a: np.ndarray) -> np.ndarray:
    """Non-finite values (an interval before the forecaster has data) as NaN: bokeh leaves a gap."""
    a = np.asarray(a, dtype=float).copy()
    a[~np.isfinite(a)] = np.nan
    return a
