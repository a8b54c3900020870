"""The predictive-partitioning panel: the model graph by stage, stage loads against the anchors,
the pipeline schedule, and the runtime controller reacting live to a device you slow down."""
from __future__ import annotations

import html
import math
import time
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass, field

import ipywidgets as w
import networkx as nx
import numpy as np
import pandas as pd
import torch
from bokeh.models import ColumnDataSource, FactorRange, HoverTool, MultiLine, Scatter, Span
from bokeh.palettes import Category10_10
from bokeh.plotting import figure, from_networkx
from jupyter_bokeh.widgets import BokehModel

from adaptive_kit.partition import (
    Bound,
    EmulatedPipeline,
    ModelPlan,
    Simulation,
    best_plan,
    metis_parts,
    milp_bound,
    plan_model,
    repair,
    simulate,
    stage_graph,
)
from adaptive_kit.partition.models import zoo
from adaptive_kit.partition.simulate import SCHEDULES

from .common import LivePlot, Panel, control_row, panel_layout

OURS = "ours"
METIS = "METIS (repaired)"
ANCHORS = ("equal layers", "parameter balanced", "GPipe balance")
METHODS = (OURS, *ANCHORS, METIS)  # the order of the stage-load bars
STAGE_COLORS = Category10_10  # stage j's colour in every plot (k <= 10)
METHOD_COLORS = dict(zip(METHODS, (Category10_10[3], Category10_10[7], Category10_10[8], Category10_10[9],
                                   Category10_10[5])))
KIND_COLORS = {"F": Category10_10[0], "B": Category10_10[1], "U": Category10_10[7]}
MAX_K = 8  # the panel's k slider; the live load plot has glyphs for this many devices


def _anchor_functions() -> dict[str, Callable]:
    """The baseline partitioners of :mod:`adaptive_kit.partition.anchors` by display name."""
    from adaptive_kit.partition import anchors

    return {"equal layers": anchors.equal_layers, "parameter balanced": anchors.parameter_balanced,
            "GPipe balance": anchors.gpipe_balance}


# --- plans side by side --------------------------------------------------------------------------

@dataclass
class Comparison:
    """Stage plans of one graph by every method, their stage loads (seconds at speed 1) and
    what failed: ``errors`` maps a method to its message; ``metis_cyclic`` says whether METIS's
    raw parts had a cycle among stages (so :func:`~adaptive_kit.partition.repair` had to fix it)."""

    k: int
    plans: dict[str, dict[str, int]] = field(default_factory=dict)
    loads: dict[str, np.ndarray] = field(default_factory=dict)
    errors: dict[str, str] = field(default_factory=dict)
    metis_cyclic: bool | None = None
    bound: Bound | None = None

    def bottlenecks(self) -> dict[str, float]:
        """The slowest stage's seconds per method."""
        return {m: float(v.max()) for m, v in self.loads.items()}


def stage_loads(g: nx.DiGraph, stage_of: Mapping[str, int], k: int, cost: str = "cost_s") -> np.ndarray:
    """(k,) summed node ``cost`` of each stage."""
    loads = np.zeros(k)
    for v, j in stage_of.items():
        loads[j] += g.nodes[v][cost]
    return loads


def compare_plans(g: nx.DiGraph, k: int, *, cost: str = "cost_s", ours: Mapping[str, int] | None = None,
                  bound_time_s: float = 0.0, seed: int = 0) -> Comparison:
    """Ours (``best_plan``, or the plan given), the three anchors and METIS (repaired) on ``g``.

    A method that raises (an anchor asked for more stages than layers, pymetis missing) is left
    out and its message kept in ``errors``. With ``bound_time_s`` > 0 the MILP lower bound is
    computed within that time.
    """
    out = Comparison(k)
    makers: dict[str, Callable[[], dict[str, int]]] = {
        OURS: (lambda: dict(ours)) if ours is not None else (lambda: best_plan(g, k, cost=cost).stage_of)}
    try:
        makers |= {name: (lambda fn=fn: fn(g, k, cost)) for name, fn in _anchor_functions().items()}
    except ImportError as e:
        out.errors |= {name: f"unavailable: {e}" for name in ANCHORS}

    def metis() -> dict[str, int]:
        raw = metis_parts(g, k, cost, seed=seed)
        out.metis_cyclic = not nx.is_directed_acyclic_graph(stage_graph(g, raw))
        return repair(g, raw)

    makers[METIS] = metis
    for name, make in makers.items():
        try:
            out.plans[name] = make()
        except Exception as e:  # noqa: BLE001 - a failed baseline is reported, not fatal
            out.errors[name] = f"{type(e).__name__}: {e}"
            continue
        out.loads[name] = stage_loads(g, out.plans[name], k, cost)
    if bound_time_s > 0:
        out.bound = milp_bound(g, k, cost=cost, time_limit=bound_time_s)
    return out


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
    return fig


def _style_graph(r) -> None:
    r.node_renderer.glyph = Scatter(size="size", fill_color="color", line_color="#333333", line_width=0.5)
    r.edge_renderer.glyph = MultiLine(line_color="#888888", line_alpha=0.5, line_width=1)


def load_bars(loads: Mapping[str, Sequence[float]], *, bound: float | None = None, title: str = "stage loads",
              width: int = 560, height: int = 280):
    """Grouped bars: each method's stage seconds side by side (ms), with the MILP lower bound on
    the bottleneck as a dashed line when given."""
    fig = figure(x_range=FactorRange(factors=[]), title=title, width=width, height=height,
                 y_axis_label="ms per step (speed 1)", tools="save")
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
    return fig, src, span


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
    return fig


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
    fig.legend.location = "top_left"
    fig.legend.click_policy = "hide"
    return fig


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
    fig = figure(title=title, width=width, height=height, x_axis_label="ms", y_axis_label="stage",
                 y_range=(k - 0.5, -0.5), tools="xpan,xwheel_zoom,reset,save")
    fig.hbar(y="stage", left="start", right="end", height=0.8, color="color", line_color="white",
             source=src)
    fig.scatter(x=[], y=[], color=KIND_COLORS["F"], legend_label="forward", marker="square")
    fig.scatter(x=[], y=[], color=KIND_COLORS["B"], legend_label="backward", marker="square")
    fig.legend.location = "bottom_right"
    fig.yaxis.ticker = list(range(k))
    fig.add_tools(HoverTool(tooltips=[("", "@kind micro-batch @micro on stage @stage"),
                                      ("ms", "@start{0.000} – @end{0.000}")]))
    return fig, src


# --- the controller, static (for a finished run) -------------------------------------------------------

def throughput_figure(frame: pd.DataFrame, *, title: str = "throughput against the optimum",
                      width: int = 560, height: int = 260):
    """:meth:`EmulatedPipeline.frame` as lines of throughput and optimum, re-partitions as red crosses."""
    fig = figure(title=title, width=width, height=height, x_axis_label="window", y_axis_label="steps / s",
                 tools="pan,wheel_zoom,reset,save")
    fig.line(frame["window"], frame["throughput"], legend_label="throughput", color=Category10_10[0], line_width=2)
    fig.line(frame["window"], frame["optimum"], legend_label="optimum", color="black", line_dash="dashed")
    rep = frame[frame["repartition"]]
    fig.scatter(rep["window"], rep["throughput"], marker="x", size=12, color="red", line_width=2,
                legend_label="re-partition")
    fig.legend.location = "bottom_right"
    return fig


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
    fig.legend.location = "top_left"
    fig.legend.click_policy = "hide"
    return fig


def _finite(a: np.ndarray) -> np.ndarray:
    """Non-finite values (an interval before the forecaster has data) as NaN: bokeh leaves a gap."""
    a = np.asarray(a, dtype=float).copy()
    a[~np.isfinite(a)] = np.nan
    return a


class LiveLoads:
    """Per-device load factor streamed as the controller sees it: measured (solid), the forecast
    made the window before with its interval (dashed, band), the assumed load (dotted).

    ``push`` takes the controller's history rows of one window; a redraw streams the buffer at
    most every ``min_interval_s``. Call :meth:`flush` at the end of a run.

    Attributes:
        source: columns ``window`` and ``load{j}``, ``forecast{j}``, ``lower{j}``, ``upper{j}``,
            ``assumed{j}`` for j < :data:`MAX_K`.
        figure, widget (its ``BokehModel``), redraws.
    """

    FIELDS = ("load", "forecast", "lower", "upper", "assumed")

    def __init__(self, k: int, *, min_interval_s: float = 0.5, rollover: int = 2000, width: int = 560,
                 height: int = 260) -> None:
        if min_interval_s < 0:
            raise ValueError(f"LiveLoads(min_interval_s={min_interval_s!r}): must be >= 0")
        self.min_interval_s, self.rollover = min_interval_s, rollover
        self.source = ColumnDataSource(self._empty())
        self.figure = figure(title="load per device: measured, forecast ± interval, assumed", width=width,
                             height=height, x_axis_label="window", y_axis_label="measured / predicted",
                             tools="pan,wheel_zoom,reset,save")
        self.glyphs: list[list] = []
        for j in range(MAX_K):
            color = STAGE_COLORS[j % 10]
            label = f"device {j}"
            self.glyphs.append([
                self.figure.varea("window", f"lower{j}", f"upper{j}", source=self.source, color=color,
                                  alpha=0.15, legend_label=label),
                self.figure.line("window", f"load{j}", source=self.source, color=color, line_width=2,
                                 legend_label=label),
                self.figure.line("window", f"forecast{j}", source=self.source, color=color, line_dash="dashed",
                                 legend_label=label),
                self.figure.line("window", f"assumed{j}", source=self.source, color=color, line_dash="dotted",
                                 legend_label=label)])
        self.figure.legend.location = "top_left"
        self.figure.legend.click_policy = "hide"
        self.figure.add_tools(HoverTool(renderers=[g[1] for g in self.glyphs], tooltips=[
            ("window", "@window"), ("load", "$y{0.00}")]))
        self.widget = BokehModel(self.figure)
        self.redraws = 0
        self.k = k
        self._pending: list[dict[str, float]] = []
        self._previous: dict[int, tuple[float, float, float]] = {}
        self._last = -math.inf

    @property
    def k(self) -> int:
        return self._k

    @k.setter
    def k(self, k: int) -> None:
        self._k = k
        for j, glyphs in enumerate(self.glyphs):
            for g in glyphs:
                g.visible = j < k
        for item in self.figure.legend.items:
            item.visible = int(item.label.value.split()[-1]) < k

    def _empty(self) -> dict[str, list]:
        return {"window": [], **{f"{f}{j}": [] for j in range(MAX_K) for f in self.FIELDS}}

    def push(self, rows: pd.DataFrame) -> None:
        """One window's rows of :meth:`Controller.history` (``window``, ``device``, ``load``, ...).

        Raises:
            ValueError: the rows span several windows.
        """
        windows = rows["window"].unique()
        if len(windows) != 1:
            raise ValueError(f"LiveLoads.push: rows of one window expected, got windows {windows.tolist()}")
        row = {"window": float(windows[0])}
        for f in self.FIELDS:
            row |= {f"{f}{j}": math.nan for j in range(MAX_K)}
        for r in rows.itertuples():
            j = int(r.device)
            # the forecast shown at window w is the one made at w - 1 for w: forecast against actual
            fc, lo, hi = self._previous.get(j, (math.nan,) * 3)
            row |= {f"load{j}": float(r.load), f"assumed{j}": float(r.assumed), f"forecast{j}": fc,
                    f"lower{j}": lo, f"upper{j}": hi}
            self._previous[j] = tuple(float(v) if math.isfinite(v) else math.nan
                                      for v in (r.forecast, r.lower, r.upper))
        self._pending.append(row)
        if time.monotonic() - self._last >= self.min_interval_s:
            self.flush()

    def flush(self) -> None:
        """Draw every buffered window now."""
        if not self._pending:
            return
        new = {c: [r[c] for r in self._pending] for c in self.source.data}
        self.source.stream(new, rollover=self.rollover)
        self._pending.clear()
        self._last = time.monotonic()
        self.redraws += 1

    def clear(self) -> None:
        """Drop every point, drawn or pending."""
        self._pending.clear()
        self._previous.clear()
        self.source.data = self._empty()


# --- the panel ----------------------------------------------------------------------------------------

class PartitionPanel(Panel):
    """Plan a model's pipeline, compare it with the anchors, and watch the controller adapt.

    Controls: the model (zoo names), stages k, the schedule and micro-batches of the Gantt chart,
    a device and its slowdown factor, and run/pause (a ``Play`` that steps the emulated pipeline
    one monitoring window per tick, driven by the browser, so no thread runs in the kernel).
    Changing the model or k re-plans (``plan_model``; cached per model and k); the slowdown acts
    at once on the running :class:`~adaptive_kit.partition.EmulatedPipeline`'s ``speeds``.

    Drive it headless: set the widgets' ``value``, call :meth:`step` (or set ``play.value``);
    the state is in :attr:`model_plan`, :attr:`comparison`, :attr:`simulation` and :attr:`pipe`.
    """

    def __init__(self, models: Mapping[str, tuple[torch.nn.Module, torch.Tensor]] | None = None, *,
                 model: str | None = None, k: int = 4, schedule: str = "1f1b", micro: int = 8,
                 windows: int = 120, reps: int = 3, bound_time_s: float = 2.0, noise: float = 0.05,
                 seed: int = 0, interval_ms: int = 400, min_interval_s: float = 0.5) -> None:
        self.models = dict(models) if models is not None else zoo()
        if not self.models:
            raise ValueError("PartitionPanel(models={}): need at least one model")
        model = model if model is not None else ("gpt-small" if "gpt-small" in self.models else next(iter(self.models)))
        if model not in self.models:
            raise ValueError(f"PartitionPanel(model={model!r}): expected one of {sorted(self.models)}")
        if not 2 <= k <= MAX_K:
            raise ValueError(f"PartitionPanel(k={k!r}): expected 2 <= k <= {MAX_K}")
        if schedule not in SCHEDULES:
            raise ValueError(f"PartitionPanel(schedule={schedule!r}): expected one of {SCHEDULES}")
        if windows < 1:
            raise ValueError(f"PartitionPanel(windows={windows!r}): must be >= 1")
        self.windows, self.reps, self.bound_time_s, self.noise, self.seed = windows, reps, bound_time_s, noise, seed
        slider = dict(continuous_update=False, style={"description_width": "initial"})
        self.model = w.Dropdown(options=list(self.models), value=model, description="model")
        self.k = w.IntSlider(value=k, min=2, max=MAX_K, description="stages k", **slider)
        self.schedule = w.ToggleButtons(options=list(SCHEDULES), value=schedule,
                                        tooltips=["all forwards, then all backwards", "one forward, one backward"],
                                        style={"button_width": "60px"})
        self.micro = w.IntSlider(value=micro, min=1, max=max(32, micro), description="micro-batches", **slider)
        self.slow_device = w.Dropdown(options=list(range(k)), value=min(1, k - 1), description="slow device",
                                      layout=w.Layout(width="160px"))
        self.slowdown = w.FloatSlider(value=1.0, min=1.0, max=4.0, step=0.1, description="slowdown ×", **slider)
        self.play = w.Play(value=0, min=0, max=windows, step=1, interval=interval_ms, description="run",
                           show_repeat=False)
        self.reset_button = w.Button(description="Reset", icon="refresh", tooltip="restart the emulated pipeline")
        self.status = w.HTML("<i>planning…</i>")
        self.out = w.Output()

        self.graph_fig = figure(title="model graph", width=960, height=300,
                                tools="pan,wheel_zoom,box_zoom,reset,save", x_axis_label="topological generation")
        self.graph_fig.yaxis.visible = False
        self.graph_fig.xgrid.visible = self.graph_fig.ygrid.visible = False
        self.graph_renderer = from_networkx(nx.DiGraph(), {})
        _style_graph(self.graph_renderer)
        self.graph_fig.renderers.append(self.graph_renderer)
        self.graph_fig.add_tools(HoverTool(renderers=[self.graph_renderer], tooltips=[
            ("node", "@index"), ("op", "@op @target"), ("stage", "@stage"), ("cost", "@cost_ms{0.000} ms")]))
        self.bars_fig, self.bars_source, self.bound_span = load_bars({}, title="stage loads: ours vs the anchors")
        self.gantt_fig, self.gantt_source = gantt_figure(pd.DataFrame({"stage": [], "micro": [], "kind": [],
                                                                       "start_s": [], "end_s": []}))
        self.loads_plot = LiveLoads(k, min_interval_s=min_interval_s)
        self.throughput_plot = LivePlot(["throughput", "optimum"], x_name="window", title="throughput vs optimum",
                                        y_label="steps / s", rollover=100_000, min_interval_s=min_interval_s,
                                        width=560, height=260)
        self.repartition_source = ColumnDataSource({"window": [], "throughput": [], "reason": []})
        self.throughput_plot.figure.scatter("window", "throughput", source=self.repartition_source, marker="x",
                                            size=12, line_width=2, color="red", legend_label="re-partition")
        self.graph_widget = BokehModel(self.graph_fig)
        self.bars_widget, self.gantt_widget = BokehModel(self.bars_fig), BokehModel(self.gantt_fig)

        self.model_plan: ModelPlan | None = None
        self.comparison: Comparison | None = None
        self.simulation: Simulation | None = None
        self.pipe: EmulatedPipeline | None = None
        self._cache: dict[tuple[str, int], tuple[ModelPlan, Comparison]] = {}
        self._planned: tuple[str, int] | None = None  # (model, k) of the plan shown
        self._resetting = False
        self._quiet = False  # True while the panel itself changes a control

        self.model.observe(lambda _: self._quiet or self.replan(), names="value")
        self.k.observe(lambda _: self._quiet or self.replan(), names="value")
        self.micro.observe(lambda _: self.reset(), names="value")
        self.schedule.observe(lambda _: self.redraw_gantt(), names="value")
        self.slow_device.observe(lambda _: self.apply_speeds(), names="value")
        self.slowdown.observe(lambda _: self.apply_speeds(), names="value")
        self.play.observe(self._on_play, names="value")
        self.reset_button.on_click(lambda _: self.reset())
        self.widget = panel_layout(
            "Predictive partitioning",
            [self.model, self.k, self.schedule, self.micro],
            [self.graph_widget,
             control_row(self.bars_widget, self.gantt_widget),
             control_row(self.slow_device, self.slowdown, self.play, self.reset_button, self.status),
             control_row(self.loads_plot.widget, self.throughput_plot.widget)],
            self.out)
        self.replan()

    # -- planning -----------------------------------------------------------------------------------
    def replan(self) -> ModelPlan:
        """Plan the chosen model at the chosen k (cached), compare with the anchors, redraw, and
        restart the emulated pipeline on the new plan."""
        name, k = self.model.value, int(self.k.value)
        self.status.value = f"planning <b>{html.escape(name)}</b> at k={k}…"
        try:
            if (name, k) not in self._cache:
                module, example = self.models[name]
                mp = plan_model(module, example, k, reps=self.reps)
                comp = compare_plans(mp.graph, k, ours=mp.plan.stage_of, bound_time_s=self.bound_time_s,
                                     seed=self.seed)
                self._cache[name, k] = (mp, comp)
        except Exception as e:
            self.status.value = f"<b>planning failed</b>: {html.escape(f'{type(e).__name__}: {e}')}"
            if self._planned is not None:  # the controls go back to the plan still shown
                self._quiet = True
                try:
                    self.model.value, self.k.value = self._planned
                finally:
                    self._quiet = False
            raise
        self._planned = (name, k)
        self.model_plan, self.comparison = self._cache[name, k]
        self.pipe = None  # the old pipeline has the old k
        self._draw_graph()
        self._draw_bars()
        dev = self.slow_device.value
        self._quiet = True
        try:
            self.slow_device.options = list(range(k))
            self.slow_device.value = dev if dev is not None and dev < k else k - 1
        finally:
            self._quiet = False
        self.loads_plot.k = k
        self.reset()
        return self.model_plan

    def _draw_graph(self) -> None:
        mp = self.model_plan
        new = _graph_renderer(mp.graph, mp.plan.stage_of, "cost_s")
        self.graph_renderer.node_renderer.data_source.data = dict(new.node_renderer.data_source.data)
        self.graph_renderer.edge_renderer.data_source.data = dict(new.edge_renderer.data_source.data)
        self.graph_renderer.layout_provider.graph_layout = dict(new.layout_provider.graph_layout)
        split = ", ".join(f"{n} in {p} shards" for n, p in mp.splits.items()) or "no operator split"
        self.graph_fig.title.text = (f"{self.model.value}: {mp.graph.number_of_nodes()} nodes, coloured by "
                                     f"stage (k={self.k.value}; {split})")

    def _draw_bars(self) -> None:
        comp = self.comparison
        self.bars_source.data = _bar_data(comp.loads)
        self.bars_fig.x_range.factors = list(self.bars_source.data["x"])
        self.bound_span.visible = comp.bound is not None
        self.bound_span.location = comp.bound.lower_s * 1e3 if comp.bound is not None else 0.0
        title = "stage loads: ours vs the anchors"
        if comp.bound is not None:
            title += " (dashed: MILP lower bound)"
        self.bars_fig.title.text = title

    # -- the schedule --------------------------------------------------------------------------------
    def stage_seconds(self) -> np.ndarray:
        """(k,) seconds of each stage of the plan in force at the devices' current speeds."""
        plan = self.pipe.controller.plan if self.pipe is not None else self.model_plan.plan
        return stage_loads(self.model_plan.graph, plan.stage_of, int(self.k.value)) / self.speeds()

    def redraw_gantt(self) -> Simulation:
        """Simulate one step of the plan in force at the current speeds; draw it as a Gantt chart."""
        self.simulation = schedule_of(self.stage_seconds(), int(self.micro.value), self.schedule.value)
        self.gantt_source.data = gantt_data(self.simulation.events)
        k = int(self.k.value)
        self.gantt_fig.y_range.start, self.gantt_fig.y_range.end = k - 0.5, -0.5
        self.gantt_fig.yaxis.ticker = list(range(k))
        self.gantt_fig.title.text = (f"{self.schedule.value}, {self.micro.value} micro-batches: "
                                     f"{self.simulation.makespan_s * 1e3:.2f} ms per step, "
                                     f"bubble {self.simulation.bubble:.0%}")
        return self.simulation

    # -- the live controller -----------------------------------------------------------------------
    def speeds(self) -> np.ndarray:
        """(k,) device speeds the controls describe: 1, and 1 / slowdown on the slow device."""
        s = np.ones(int(self.k.value))
        dev = self.slow_device.value
        if dev is not None and 0 <= dev < len(s):
            s[dev] = 1 / float(self.slowdown.value)
        return s

    def apply_speeds(self) -> None:
        """Give the running pipeline the controls' speeds; the controller sees them next window."""
        if self._quiet:
            return
        if self.pipe is not None:
            self.pipe.speeds = self.speeds()
        self.redraw_gantt()

    def reset(self) -> EmulatedPipeline:
        """A fresh emulated pipeline on the planned graph (the plan made for equal speeds)."""
        mp, k = self.model_plan, int(self.k.value)
        self.pipe = EmulatedPipeline(mp.graph, k, noise=self.noise, micro=int(self.micro.value),
                                     steps=10 * self.windows, steps_per_window=10, seed=self.seed)
        self.pipe.speeds = self.speeds()
        self._resetting = True
        try:
            self.play.playing = False
            self.play.value = 0
        finally:
            self._resetting = False
        self.loads_plot.clear()
        self.throughput_plot.clear()
        self.repartition_source.data = {"window": [], "throughput": [], "reason": []}
        self.redraw_gantt()
        self._status()
        return self.pipe

    def _on_play(self, change) -> None:
        if not self._resetting:
            self.step(int(change["new"]) - self.windows_run)

    @property
    def windows_run(self) -> int:
        return len(self.pipe.rows) if self.pipe is not None else 0

    def step(self, n: int = 1) -> pd.DataFrame:
        """Run up to ``n`` monitoring windows (never past ``windows``); stream the controller's view.

        Returns:
            The rows of :meth:`EmulatedPipeline.frame` these windows added.
        """
        n = max(0, min(int(n), self.windows - self.windows_run))
        first = self.windows_run
        replanned = False
        for _ in range(n):
            row = self.pipe.step()
            wdw = row["window"]
            h = self.pipe.controller.history()
            self.loads_plot.push(h[h["window"] == wdw])
            self.throughput_plot.push(wdw, throughput=row["throughput"], optimum=row["optimum"])
            if row["repartition"]:
                self.repartition_source.stream({"window": [wdw], "throughput": [row["throughput"]],
                                                "reason": [row["reason"]]})
                replanned = True
        self.loads_plot.flush()
        self.throughput_plot.flush()
        if replanned:
            self.redraw_gantt()
            self._recolour(self.pipe.controller.plan.stage_of)
        if self.play.value != self.windows_run:  # a headless step moves the Play along
            self._resetting = True
            try:
                self.play.value = self.windows_run
            finally:
                self._resetting = False
        self._status()
        return self.pipe.frame().iloc[first:]

    def _recolour(self, stage_of: Mapping[str, int]) -> None:
        """Colour the graph's nodes by ``stage_of`` (the plan in force after a re-partition)."""
        data = self.graph_renderer.node_renderer.data_source.data
        stages = [int(stage_of[v]) for v in data["index"]]
        self.graph_renderer.node_renderer.data_source.data = dict(
            data, stage=stages, color=[STAGE_COLORS[j % 10] for j in stages])

    def _status(self) -> None:
        f = self.pipe.frame() if self.pipe is not None and self.pipe.rows else None
        text = f"window {self.windows_run}/{self.windows}"
        if f is not None:
            last = f.iloc[-1]
            text += (f" · {last['throughput'] / last['optimum']:.0%} of the optimum · last decision "
                     f"<b>{html.escape(str(last['reason']))}</b> · re-partitions {int(f['repartition'].sum())}")
        errors = self.comparison.errors if self.comparison is not None else {}
        if errors:
            text += "<br>left out: " + "; ".join(html.escape(f"{m}: {e}") for m, e in errors.items())
        self.status.value = text

    def summary(self) -> pd.DataFrame:
        """One row per method: bottleneck (ms), × the MILP lower bound, × ours.

        Raises:
            RuntimeError: nothing planned yet.
        """
        if self.comparison is None:
            raise RuntimeError("PartitionPanel.summary: no plan yet")
        b = self.comparison.bottlenecks()
        bound = self.comparison.bound.lower_s if self.comparison.bound is not None else math.nan
        return pd.DataFrame({"bottleneck ms": {m: v * 1e3 for m, v in b.items()},
                             "× lower bound": {m: v / bound for m, v in b.items()},
                             "× ours": {m: v / b[OURS] for m, v in b.items()}}).rename_axis("method")

