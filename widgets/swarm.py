"""The live-swarm panel: the swarm as a similarity graph, a members x rounds heatmap, the weight
trajectories of the members you tap, compute against accuracy, and the alarms, with controls that
steer the running swarm's goals and optimiser between rounds."""
from __future__ import annotations

import dataclasses
import html
import math
import time
import traceback
from collections.abc import Iterable, Sequence
from typing import Any

import ipywidgets as w
import networkx as nx
import numpy as np
import pandas as pd
import pyarrow as pa
from bokeh.layouts import row
from bokeh.models import ColorBar, ColumnDataSource, HoverTool, LinearColorMapper, Scatter, TapTool
from bokeh.palettes import Category10_10, Viridis256
from bokeh.plotting import figure
from bokeh.transform import transform
from jupyter_bokeh.widgets import BokehModel

from adaptive_kit.swarm import Collector, Goals, Swarm
from adaptive_kit.swarm.optimiser import ALLOCATIONS, PERTURB_MODES

from .common import Panel, control_row, panel_layout

METRICS = ("val_acc", "val_loss", "loss_mean", "fitness", "lr", "compute_s", "cpu_percent", "rss_bytes", "steps")
TRAJECTORY_STATS = ("norm", "mean", "std")  # columns of the bus's ``stats`` stream a trajectory can show
GOALS = ("accuracy", "loss", "efficiency", "generalisation")
PALETTE = Viridis256
NAN_COLOR = "#cfcfcf"  # quarantined or not yet measured
ALARM_COLOR = "#d62728"
EDGE_COLOR = "#8c8c8c"
DASHES = ("solid", "dashed", "dotted", "dotdash", "dashdot")  # out, h0, h1, ...


def palette_colors(values: Sequence[float] | np.ndarray, low: float, high: float,
                   palette: Sequence[str] = PALETTE, nan_color: str = NAN_COLOR) -> list[str]:
    """Colours of ``values`` under bokeh's ``LinearColorMapper(palette, low, high)`` rule (so that
    colours computed here match the colour bar drawn in the browser); NaN gets ``nan_color``."""
    v = np.asarray(values, dtype=float)
    n = len(palette)
    span = high - low if high > low else 1.0
    idx = np.clip(np.floor((np.nan_to_num(v, nan=low) - low) * (n / span)), 0, n - 1).astype(int)
    return [palette[i] if math.isfinite(x) else nan_color for i, x in zip(idx.tolist(), v.tolist())]


def layer_dash(layer: str) -> str:
    """Line dash of a layer's trajectory: ``out`` solid, ``h0`` dashed, ``h1`` dotted, ..."""
    if layer == "out":
        return DASHES[0]
    try:
        return DASHES[1 + int(layer.lstrip("h")) % (len(DASHES) - 1)]
    except ValueError:
        return DASHES[0]


def _floats(series: pd.Series) -> list[float]:
    return pd.to_numeric(series, errors="coerce").astype(float).tolist()


KIND_STYLE = {"exploit": (Category10_10[0], "triangle"), "breed": (Category10_10[2], "diamond"),
              "quarantine": (ALARM_COLOR, "x")}  # colour and marker of each lineage event


def best_so_far(history: pd.DataFrame, n_train: int) -> pd.DataFrame:
    """Per round of :meth:`Swarm.history`: the member-epochs spent so far (steps x batch size / training
    rows, summed over members and rounds) and the best validation accuracy any member reached so far."""
    if isinstance(n_train, bool) or not isinstance(n_train, int) or n_train < 1:
        raise ValueError(f"best_so_far(n_train={n_train!r}): expected an int >= 1")
    h = history.assign(member_epochs=history["steps"] * history["batch_size"] / n_train)
    per = h.groupby("round").agg(member_epochs=("member_epochs", "sum"), val_acc=("val_acc", "max"))
    return pd.DataFrame({"round": per.index.to_numpy(), "member_epochs": per["member_epochs"].cumsum().to_numpy(),
                         "best_val_acc": per["val_acc"].cummax().to_numpy()})


def lineage_figure(lineage: pd.DataFrame, members: int, rounds: int, *,
                   title: str = "what the optimiser did", width: int = 760, height: int = 300):
    """:meth:`Swarm.lineage_frame` drawn as members (y) over rounds (x): a segment from each parent
    (the round before) to the member it replaced, a marker per event coloured by kind (exploit,
    breed, quarantine); hover shows the spec before and after."""
    seg: dict[str, list] = {"x0": [], "y0": [], "x1": [], "y1": [], "color": []}
    pts: dict[str, list] = {k: [] for k in ("round", "member", "kind", "color", "marker", "parents", "before",
                                            "after", "detail")}
    for e in lineage.itertuples():
        color, marker = KIND_STYLE.get(e.kind, ("#555555", "circle"))
        for p in e.parents:
            seg["x0"].append(e.round - 0.8)
            seg["y0"].append(int(p))
            seg["x1"].append(e.round)
            seg["y1"].append(int(e.member))
            seg["color"].append(color)
        for k, v in (("round", int(e.round)), ("member", int(e.member)), ("kind", e.kind), ("color", color),
                     ("marker", marker), ("parents", " × ".join(map(str, e.parents)) or "-"),
                     ("before", e.before), ("after", e.after), ("detail", e.detail)):
            pts[k].append(v)
    fig = figure(title=title, width=width, height=height, x_axis_label="round", y_axis_label="member",
                 y_range=(members - 0.5, -0.5), x_range=(-0.5, rounds + 0.5), tools="pan,wheel_zoom,reset,save")
    fig.segment(x0=[0] * members, y0=list(range(members)), x1=[rounds] * members, y1=list(range(members)),
                line_color="#dddddd")
    fig.segment("x0", "y0", "x1", "y1", source=ColumnDataSource(seg), line_color="color", line_width=1.5,
                line_alpha=0.7)
    dots = fig.scatter("round", "member", source=ColumnDataSource(pts), color="color", marker="marker", size=11,
                       line_width=2, legend_group="kind")
    fig.yaxis.ticker = list(range(members)) if members <= 32 else list(range(0, members, max(1, members // 16)))
    fig.legend.location = "top_left"
    fig.legend.orientation = "horizontal"
    fig.legend.background_fill_alpha = 0.6
    fig.add_tools(HoverTool(renderers=[dots], tooltips=[("", "@kind of member @member in round @round"),
                                                         ("parents", "@parents"), ("before", "@before"),
                                                         ("after", "@after"), ("", "@detail")]))
    return fig


class SwarmPanel(Panel):
    """A live dashboard over a running :class:`~adaptive_kit.swarm.Swarm`, steering it between rounds.

    Views: the members as a graph whose edges join members at least ``threshold`` similar (the
    swarm's :class:`~adaptive_kit.swarm.Similarity`; spring layout, recomputed only when the edge
    set changes), nodes sized and coloured by the chosen metric's latest value, quarantined
    members grey, members with alarms outlined red, tap (shift-tap) to select; a members x rounds
    heatmap of the chosen metric with alarm cells outlined; the chosen weight statistic per layer
    of the selected members against their step; cumulative compute against validation accuracy
    (size: parameters) and the steps allotted for the next round; the latest alarms.

    Everything drawn is what arrived on the swarm's bus (:attr:`Collector.tables`, only the
    batches not yet drawn) plus :meth:`Swarm.table` and the similarity of the members' specs; the
    panel computes no metric itself. Redraws are batched: at most one per ``min_interval_s``,
    each sending one ``stream`` or ``patch`` per data source; :meth:`flush` draws now.

    Drive it headless: :meth:`tick` (what the Play widget calls: ``rounds_per_tick`` rounds, then
    maybe a redraw), :meth:`flush`, :meth:`select`, and the widgets' ``value``. Sources, figures,
    :attr:`selected`, :attr:`redraws` and :attr:`ages` (per redraw that drew new reports, the age
    in seconds of the newest one: redraw time - the report's ``time``) are attributes.

    Raises:
        ValueError: an unknown metric or statistic, a value out of range, or a swarm without a
            collector (pass ``collector=`` when it reports to another sink).
    """

    def __init__(self, swarm: Swarm, *, metric: str = "val_acc", threshold: float = 0.7, stat: str = "norm",
                 min_interval_s: float = 0.35, interval_ms: int = 300, rounds_per_tick: int = 1,
                 max_rounds: int = 10_000, max_points: int = 100_000, max_alarms: int = 8,
                 collector: Collector | None = None, seed: int = 0) -> None:
        if metric not in METRICS:
            raise ValueError(f"SwarmPanel(metric={metric!r}): expected one of {METRICS}")
        if stat not in TRAJECTORY_STATS:
            raise ValueError(f"SwarmPanel(stat={stat!r}): expected one of {TRAJECTORY_STATS}")
        if not 0 <= threshold <= 1:
            raise ValueError(f"SwarmPanel(threshold={threshold!r}): expected 0 <= threshold <= 1")
        if not min_interval_s >= 0:
            raise ValueError(f"SwarmPanel(min_interval_s={min_interval_s!r}): must be >= 0")
        for name, v, lo in (("interval_ms", interval_ms, 0), ("rounds_per_tick", rounds_per_tick, 1),
                            ("max_rounds", max_rounds, 1), ("max_points", max_points, 1),
                            ("max_alarms", max_alarms, 1)):
            if isinstance(v, bool) or not isinstance(v, int) or v < lo:
                raise ValueError(f"SwarmPanel({name}={v!r}): expected an int >= {lo}")
        self.swarm = swarm
        self.collector = collector if collector is not None else swarm.collector
        if self.collector is None:
            raise ValueError("SwarmPanel: the swarm has no in-process collector (it reports to another sink); "
                             "pass collector=")
        self.n = len(swarm.members)
        self.min_interval_s, self.rounds_per_tick, self.max_points = min_interval_s, rounds_per_tick, max_points
        self.max_alarms, self.seed = max_alarms, seed

        # what has arrived, kept as the panel needs it
        self._consumed: dict[str, int] = {"swarm": 0, "stats": 0, "swarm_alarms": 0}
        self.latest: dict[int, dict[str, Any]] = {}  # member -> its newest report (a row of the swarm stream)
        self.compute = np.zeros(self.n)  # compute seconds per member slot over the run
        self.ranges: dict[str, tuple[float, float]] = {}  # per metric: (min, max) of the finite values seen
        self.alarm_rows: list[dict[str, Any]] = []
        self.alarm_counts = np.zeros(self.n, dtype=int)
        self._stats_parts: list[pd.DataFrame] = []
        self._stats_cache: pd.DataFrame | None = None
        self._series: dict[tuple[int, str], tuple[list[float], list[float]]] = {}  # drawn trajectories
        self._specs: list | None = None  # the specs the similarity matrix belongs to
        self.similarity = np.ones((self.n, self.n))
        self.edges: frozenset[tuple[int, int]] | None = None
        self.graph = nx.Graph()
        self.positions: dict[int, np.ndarray] = {}
        self._selected: list[int] = []

        # counters a test or a browser check reads
        self.redraws = 0
        self.ages: list[float] = []
        self.redraw_s: list[float] = []
        self.ticks = 0
        self.dropped_ticks = 0
        self.layouts = 0
        self._last_redraw = -math.inf
        self._tick_done = -math.inf
        self._pending = False
        self._quiet = False
        self._problem = ""

        self._build_controls(metric, threshold, stat, interval_ms, max_rounds)
        self._build_figures(metric)
        self.widget = panel_layout(
            "Live swarm", [self.metric, self.threshold, self.stat],
            [control_row(w.HTML("<b>goals</b>"), *self.goal.values()),
             control_row(w.HTML("<b>optimiser</b>"), self.allocation, self.temperature, self.perturb,
                         self.mutation, self.breed),
             control_row(self.play, self.step_button, self.pause, self.status),
             self.top_widget, self.bottom_widget, self.alarms_html],
            self.out)
        self.redraw()

    # == building ==================================================================================
    def _build_controls(self, metric: str, threshold: float, stat: str, interval_ms: int, max_rounds: int) -> None:
        slider = dict(continuous_update=False, style={"description_width": "initial"})
        goals, policy = self.swarm.goals, self.swarm.policy
        self.metric = w.Dropdown(options=list(METRICS), value=metric, description="metric",
                                 layout=w.Layout(width="200px"))
        self.threshold = w.FloatSlider(value=threshold, min=0.0, max=1.0, step=0.01, readout_format=".2f",
                                       description="edge: similarity ≥", **slider)
        self.stat = w.Dropdown(options=list(TRAJECTORY_STATS), value=stat, description="trajectory",
                               layout=w.Layout(width="200px"))
        self.goal = {g: w.FloatSlider(value=float(getattr(goals, g)), min=0.0, max=1.0, step=0.05,
                                      description=g, readout_format=".2f", layout=w.Layout(width="230px"), **slider)
                     for g in GOALS}
        self.allocation = w.ToggleButtons(options=list(ALLOCATIONS), value=policy.allocation,
                                          tooltips=["steps ∝ fitness^(1/temperature)", "the same steps for all"],
                                          style={"button_width": "90px"})
        self.temperature = w.FloatLogSlider(value=policy.temperature, base=10, min=-2, max=1, step=0.05,
                                            description="temperature", readout_format=".3g", **slider)
        self.perturb = w.ToggleButtons(options=list(PERTURB_MODES), value=policy.perturb,
                                       tooltips=["×0.8 / ×1.25 or a fresh draw", "one step on the grid"],
                                       style={"button_width": "70px"})
        self.mutation = w.FloatSlider(value=policy.mutation_rate, min=0.0, max=1.0, step=0.05,
                                      description="mutation rate", **slider)
        self.breed = w.FloatSlider(value=policy.breed_rate, min=0.0, max=1.0, step=0.05, description="breed rate",
                                   **slider)
        self.pause = w.ToggleButton(value=bool(self.swarm.paused), description="Pause", icon="pause",
                                    tooltip="stop training between rounds (the controls stay live)")
        self.play = w.Play(value=0, min=0, max=max_rounds, step=1, interval=interval_ms, description="run",
                           show_repeat=False)
        self.step_button = w.Button(description="Step", icon="step-forward", tooltip="one round, drawn at once")
        self.status = w.HTML("")
        self.alarms_html = w.HTML("")
        self.out = w.Output()

        self.metric.observe(lambda _: self.recolour(), names="value")
        self.threshold.observe(lambda _: self._draw_graph(force_edges=True), names="value")
        self.stat.observe(lambda _: self._rebuild_trajectories(), names="value")
        for s in self.goal.values():
            s.observe(lambda _: self.set_goals(), names="value")
        for c in (self.allocation, self.temperature, self.perturb, self.mutation, self.breed):
            c.observe(lambda _: self.set_policy(), names="value")
        self.pause.observe(lambda c: self._on_pause(bool(c["new"])), names="value")
        self.play.observe(self._on_play, names="value")
        self.step_button.on_click(lambda _: self._on_step())

    def _build_figures(self, metric: str) -> None:
        n = self.n
        self.mapper = LinearColorMapper(palette=PALETTE, low=0.0, high=1.0, nan_color=NAN_COLOR)
        # -- the graph
        self.node_source = ColumnDataSource(self._node_data(np.zeros(n), np.zeros(n)))
        self.edge_source = ColumnDataSource({"x0": [], "y0": [], "x1": [], "y1": [], "a": [], "b": [],
                                             "similarity": [], "alpha": []})
        self.graph_fig = figure(title="members (edges: similar specs)", width=440, height=420,
                                tools="pan,wheel_zoom,reset,save", x_range=(-1.3, 1.3), y_range=(-1.3, 1.3))
        self.graph_fig.axis.visible = False
        self.graph_fig.grid.visible = False
        self.graph_fig.segment("x0", "y0", "x1", "y1", source=self.edge_source, line_color=EDGE_COLOR,
                               line_alpha="alpha", line_width=1.5)
        self.node_renderer = self.graph_fig.scatter("x", "y", size="size", fill_color="color", line_color="line_color",
                                                    line_width="line_width", source=self.node_source)
        self.node_renderer.selection_glyph = Scatter(size="size", fill_color="color", line_color="#000000",
                                                     line_width=3.5)
        self.node_renderer.nonselection_glyph = Scatter(size="size", fill_color="color", fill_alpha=0.35,
                                                        line_color="line_color", line_width="line_width",
                                                        line_alpha=0.5)
        self.graph_fig.text("x", "y", text="label", source=self.node_source, text_align="center",
                            text_baseline="middle", text_font_size="8pt", text_color="#ffffff")
        self.node_hover = HoverTool(renderers=[self.node_renderer])
        self.graph_fig.add_tools(self.node_hover, TapTool(renderers=[self.node_renderer]))
        self.node_source.selected.on_change("indices", self._on_tap)
        # -- the heatmap
        # `time` (when the member reported, seconds since the epoch) lets a browser measure data age
        self.heat_source = ColumnDataSource({"member": [], "round": [], **{m: [] for m in METRICS},
                                             "status": [], "arch": [], "time": []}, name="swarm_heat")
        self.heat_alarm_source = ColumnDataSource({"member": [], "round": [], "detector": [], "evidence": []})
        self.heat_fig = figure(title="", width=600, height=420, tools="xpan,xwheel_zoom,reset,save",
                               x_axis_label="round", y_axis_label="member", y_range=(n - 0.5, -0.5))
        self.heat_renderer = self.heat_fig.rect("round", "member", width=1, height=1, source=self.heat_source,
                                                fill_color=transform(metric, self.mapper), line_color=None)
        self.heat_fig.rect("round", "member", width=0.92, height=0.92, source=self.heat_alarm_source,
                           fill_alpha=0, line_color=ALARM_COLOR, line_width=2)
        self.heat_fig.grid.visible = False
        self.heat_fig.yaxis.ticker = list(range(n)) if n <= 32 else list(range(0, n, max(1, n // 16)))
        self.heat_hover = HoverTool(renderers=[self.heat_renderer])
        self.heat_fig.add_tools(self.heat_hover)
        self.color_bar = ColorBar(color_mapper=self.mapper, width=10, title=metric)
        self.heat_fig.add_layout(self.color_bar, "right")
        # -- trajectories of the selected members
        self.traj_source = ColumnDataSource({"member": [], "layer": [], "xs": [], "ys": [], "color": [], "dash": []})
        self.traj_points = ColumnDataSource({"member": [], "layer": [], "step": [], "value": [], "color": []})
        self.traj_fig = figure(title="weights of the selected members: tap a node", width=460, height=300,
                               x_axis_label="member's step", tools="pan,wheel_zoom,box_zoom,reset,save")
        self.traj_fig.multi_line("xs", "ys", source=self.traj_source, line_color="color", line_dash="dash",
                                 line_width=2)
        points = self.traj_fig.scatter("step", "value", source=self.traj_points, color="color", size=4)
        self.traj_fig.add_tools(HoverTool(renderers=[points], tooltips=[("", "member @member, layer @layer"),
                                                                        ("step", "@step"), ("value", "@value")]))
        # -- resources against performance
        self.res_source = ColumnDataSource(self._res_data())
        self.res_fig = figure(title="compute against accuracy (size: parameters)", width=360, height=300,
                              x_axis_label="compute s (member slot, cumulative)", y_axis_label="val acc",
                              tools="pan,wheel_zoom,box_zoom,reset,save")
        dots = self.res_fig.scatter("compute", "val_acc", size="psize", fill_color="color", line_color="line_color",
                                    line_width="line_width", source=self.res_source, fill_alpha=0.8)
        self.res_fig.add_tools(HoverTool(renderers=[dots], tooltips=[
            ("member", "@member (@arch)"), ("parameters", "@n_params"), ("compute", "@compute{0.00} s"),
            ("val acc", "@val_acc{0.000}"), ("val acc per compute-s", "@per_s{0.000}")]))
        self.steps_fig = figure(title="steps allotted next round", width=360, height=300, x_axis_label="member",
                                y_axis_label="steps", tools="save")
        bars = self.steps_fig.vbar(x="member", top="steps_next", width=0.7, source=self.res_source,
                                   fill_color="color", line_color="line_color")
        self.steps_fig.scatter("member", "steps_last", source=self.res_source, marker="dash", size=14,
                               line_width=2, color="#000000", legend_label="granted last round")
        self.steps_fig.legend.location = "top_left"
        self.steps_fig.legend.background_fill_alpha = 0.5
        self.steps_fig.add_tools(HoverTool(renderers=[bars], tooltips=[
            ("member", "@member"), ("next", "@steps_next"), ("last", "@steps_last"), ("fitness", "@fitness{0.000}")]))
        # one document per row: the graph and the heatmap share the colour mapper
        self.top_widget = BokehModel(row(self.graph_fig, self.heat_fig))
        self.bottom_widget = BokehModel(row(self.traj_fig, self.res_fig, self.steps_fig))
        self._label_metric()

    def _node_data(self, x: np.ndarray, y: np.ndarray) -> dict[str, list]:
        n = self.n
        return {"member": list(range(n)), "label": [str(i) for i in range(n)], "x": list(x), "y": list(y),
                "value": [math.nan] * n, "size": [12.0] * n, "color": [NAN_COLOR] * n,
                "line_color": ["#333333"] * n, "line_width": [1.0] * n, "arch": [""] * n, "hparams": [""] * n,
                "status": [""] * n, "origin": [""] * n, "alarms": [0] * n}

    def _res_data(self) -> dict[str, list]:
        n = self.n
        return {"member": list(range(n)), "compute": [0.0] * n, "val_acc": [math.nan] * n, "per_s": [math.nan] * n,
                "n_params": [0] * n, "psize": [8.0] * n, "arch": [""] * n, "steps_next": [0] * n,
                "steps_last": [0] * n, "fitness": [math.nan] * n, "color": [NAN_COLOR] * n,
                "line_color": ["#333333"] * n, "line_width": [1.0] * n}

    # == reading the bus ===========================================================================
    def _take(self, stream: str) -> pd.DataFrame | None:
        """The batches of ``stream`` that arrived since the last redraw, as one frame (None if none)."""
        batches = self.collector.tables.get(stream, [])
        new = batches[self._consumed[stream]:]
        self._consumed[stream] = len(batches)
        new = [b for b in new if b.num_rows]
        if not new:
            return None
        return pa.Table.from_batches(new).to_pandas()

    def _ingest(self, rows: pd.DataFrame) -> None:
        for rec in rows.to_dict("records"):  # in arrival order: the newest report per member wins
            self.latest[int(rec["member"])] = rec
        np.add.at(self.compute, rows["member"].to_numpy(dtype=int), np.nan_to_num(rows["compute_s"].to_numpy(float)))
        for m in METRICS:
            v = pd.to_numeric(rows[m], errors="coerce").to_numpy(float)
            v = v[np.isfinite(v)]
            if v.size:
                lo, hi = self.ranges.get(m, (math.inf, -math.inf))
                self.ranges[m] = (min(lo, float(v.min())), max(hi, float(v.max())))

    def latest_values(self, metric: str | None = None) -> np.ndarray:
        """(N,) the newest reported value of ``metric`` (default: the one shown) per member; NaN before any."""
        metric = metric or self.metric.value
        out = np.full(self.n, math.nan)
        for m, rec in self.latest.items():
            v = rec.get(metric)
            out[m] = math.nan if v is None else float(v)
        return out

    def stats_frame(self) -> pd.DataFrame:
        """Every weight-statistics row received (the bus's ``stats`` stream; ``rank`` is the member)."""
        if self._stats_cache is None:
            self._stats_cache = (pd.concat(self._stats_parts, ignore_index=True) if self._stats_parts
                                 else pd.DataFrame(columns=["rank", "layer", "step", *TRAJECTORY_STATS]))
        return self._stats_cache

    # == running ===================================================================================
    def tick(self) -> bool:
        """Run ``rounds_per_tick`` rounds, then redraw if ``min_interval_s`` has passed since the last
        redraw (else the new reports wait for the next one or :meth:`flush`). Returns False, doing
        nothing, while the swarm is paused."""
        ran = 0
        for _ in range(self.rounds_per_tick):
            if not self.swarm.step():
                break
            ran += 1
        self._tick_done = time.monotonic()
        if not ran:
            return False
        self.ticks += 1
        self._pending = True
        if time.monotonic() - self._last_redraw >= self.min_interval_s:
            self.redraw()
        return True

    def flush(self) -> None:
        """Draw everything that arrived, now."""
        self.redraw()

    def run(self, rounds: int) -> int:
        """Tick until ``rounds`` more rounds ran (or the swarm is paused), then :meth:`flush`; returns rounds run."""
        start = self.swarm.round
        for _ in range(max(0, -(-int(rounds) // self.rounds_per_tick))):
            if not self.tick():
                break
        self.flush()
        return self.swarm.round - start

    def _on_play(self, change: dict[str, Any]) -> None:
        if self._quiet or int(change["new"]) == 0:
            return
        # ticks the browser sent while the kernel was busy arrive back to back: drop them, so that
        # the Play never builds a backlog of rounds behind a slow swarm
        if time.monotonic() - self._tick_done < 0.5 * self.play.interval / 1000:
            self.dropped_ticks += 1
            return
        try:
            self.tick()
            if int(change["new"]) >= self.play.max:
                self.flush()
        except Exception as e:  # noqa: BLE001 - a failed round stops the Play and is shown, not re-raised per tick
            self.play.playing = False
            self._set_problem(f"round failed: {type(e).__name__}: {e}")
            with self.out:
                traceback.print_exc()

    def _on_step(self) -> None:
        if self.swarm.paused:
            self._set_problem("paused: resume to step")
            return
        try:
            self.swarm.step()
            self.ticks += 1
            self.flush()
        except Exception as e:  # noqa: BLE001 - shown in the status line and the output area
            self._set_problem(f"round failed: {type(e).__name__}: {e}")
            with self.out:
                traceback.print_exc()

    def _on_pause(self, paused: bool) -> None:
        self.swarm.paused = paused
        self.pause.icon = "play" if paused else "pause"
        self.pause.description = "Resume" if paused else "Pause"
        self._set_problem("")

    # == steering ==================================================================================
    def set_goals(self) -> Goals | None:
        """Give the swarm the goal sliders' weights; an invalid combination (all 0) is reported in
        the status line and the swarm keeps its goals. Returns the goals set, or None."""
        vals = {g: float(s.value) for g, s in self.goal.items()}
        try:
            goals = Goals(**vals)
        except ValueError as e:
            self._set_problem(f"goals not changed: {e}")
            return None
        self.swarm.goals = goals
        self._set_problem("")
        return goals

    def set_policy(self) -> Any:
        """Give the swarm the optimiser controls' allocation, temperature, perturbation mode, mutation
        and breed rates (``dataclasses.replace`` of its policy); an invalid value is reported in the
        status line. Returns the policy set, or None."""
        try:
            policy = dataclasses.replace(self.swarm.policy, allocation=self.allocation.value,
                                         temperature=float(self.temperature.value), perturb=self.perturb.value,
                                         mutation_rate=float(self.mutation.value), breed_rate=float(self.breed.value))
        except ValueError as e:
            self._set_problem(f"optimiser not changed: {e}")
            return None
        self.swarm.policy = policy
        self._set_problem("")
        return policy

    def _set_problem(self, text: str) -> None:
        self._problem = text
        self._draw_status()

    # == selection =================================================================================
    @property
    def selected(self) -> list[int]:
        """Members whose trajectories are drawn (what tapping nodes selects)."""
        return list(self._selected)

    @selected.setter
    def selected(self, members: Iterable[int]) -> None:
        self.select(members)

    def select(self, members: Iterable[int]) -> list[int]:
        """Select ``members`` (as tapping their nodes does) and draw their trajectories.

        Raises:
            ValueError: a member that is not in the swarm.
        """
        chosen = sorted({int(m) for m in members})
        bad = [m for m in chosen if not 0 <= m < self.n]
        if bad:
            raise ValueError(f"SwarmPanel.select: members {bad} not in 0..{self.n - 1}")
        if chosen == self._selected and list(self.node_source.selected.indices) == chosen:
            return self.selected
        self._selected = chosen
        if list(self.node_source.selected.indices) != chosen:
            self._quiet = True
            try:
                self.node_source.selected.indices = chosen
            finally:
                self._quiet = False
        self._rebuild_trajectories()
        return self.selected

    def _on_tap(self, attr: str, old: Any, new: Any) -> None:
        if not self._quiet:
            self.select(new)

    # == drawing ===================================================================================
    def redraw(self) -> None:
        """Take what arrived on the bus and draw it: one stream or patch per source."""
        t0 = time.perf_counter()
        self.collector.poll()
        rows, stats, alarms = self._take("swarm"), self._take("stats"), self._take("swarm_alarms")
        if rows is not None:
            self._ingest(rows)
            self._stream_heat(rows)
        if alarms is not None:
            self._take_alarms(alarms)
        if stats is not None:
            self._stats_parts.append(stats)
            self._stats_cache = None
            self._stream_trajectories(stats)
        table = self.swarm.table()
        self._update_range()
        self._draw_graph(table=table)
        self._draw_resources(table, rows)
        self._draw_status(table)
        self._last_redraw = time.monotonic()
        self._pending = False
        self.redraws += 1
        if rows is not None:
            self.ages.append(time.time() - float(rows["time"].max()))
        self.redraw_s.append(time.perf_counter() - t0)

    def _stream_heat(self, rows: pd.DataFrame) -> None:
        new = {"member": rows["member"].astype(int).tolist(), "round": rows["round"].astype(int).tolist(),
               **{m: _floats(rows[m]) for m in METRICS}, "status": rows["status"].astype(str).tolist(),
               "arch": rows["arch"].astype(str).tolist(), "time": rows["time"].astype(float).tolist()}
        self.heat_source.stream(new, rollover=self.max_points)

    def _take_alarms(self, alarms: pd.DataFrame) -> None:
        recs = alarms[["time", "round", "member", "detector", "kind", "scope", "evidence", "value"]].to_dict("records")
        self.alarm_rows.extend(recs)
        np.add.at(self.alarm_counts, alarms["member"].to_numpy(dtype=int), 1)
        self.heat_alarm_source.stream({"member": alarms["member"].astype(int).tolist(),
                                       "round": alarms["round"].astype(int).tolist(),
                                       "detector": alarms["detector"].astype(str).tolist(),
                                       "evidence": alarms["evidence"].astype(str).tolist()},
                                      rollover=self.max_points)
        latest = self.alarm_rows[::-1][:self.max_alarms]
        cells = "".join(f"<tr><td>{a['round']}</td><td>{a['member']}</td><td>{html.escape(str(a['detector']))}</td>"
                        f"<td>{html.escape(str(a['scope']))}</td><td>{html.escape(str(a['evidence']))}</td></tr>"
                        for a in latest)
        self.alarms_html.value = (
            f"<b>alarms</b>: {len(self.alarm_rows)} this run (latest first)"
            "<table style='font-size:90%'><tr><th>round</th><th>member</th><th>detector</th><th>scope</th>"
            f"<th>evidence</th></tr>{cells}</table>")

    def _update_range(self) -> None:
        lo, hi = self.ranges.get(self.metric.value, (0.0, 1.0))
        if hi <= lo:
            hi = lo + max(abs(lo) * 1e-6, 1e-12)
        if (self.mapper.low, self.mapper.high) != (lo, hi):
            self.mapper.update(low=lo, high=hi)

    def _node_colors(self, status: Sequence[str]) -> tuple[np.ndarray, list[str]]:
        """The shown metric's newest values and their colours; quarantined members grey."""
        v = self.latest_values()
        colors = palette_colors(v, self.mapper.low, self.mapper.high)
        return v, [NAN_COLOR if s == "quarantined" else c for s, c in zip(status, colors)]

    def _outline(self, status: Sequence[str]) -> tuple[list[str], list[float]]:
        quarantined = np.array([s == "quarantined" for s in status])
        flagged = quarantined | (self.alarm_counts > 0)
        return ([ALARM_COLOR if f else "#333333" for f in flagged],
                [3.0 if q else 2.0 if f else 1.0 for q, f in zip(quarantined, flagged)])

    def _draw_graph(self, *, table: pd.DataFrame | None = None, force_edges: bool = False) -> None:
        """Similarity of the current specs (rows of changed members only), the edges at the
        threshold (a new spring layout only when they changed), and the nodes' values and looks."""
        table = table if table is not None else self.swarm.table()
        specs = [m.spec for m in self.swarm.members]
        changed = (list(range(self.n)) if self._specs is None
                   else [i for i, (a, b) in enumerate(zip(specs, self._specs)) if a != b])
        sim = self.swarm.config.similarity
        if len(changed) > self.n // 2:
            self.similarity = sim.matrix(specs)
        else:
            for i in changed:
                for j in range(self.n):
                    if j != i:
                        self.similarity[i, j] = self.similarity[j, i] = sim(specs[i], specs[j])
        self._specs = specs
        iu, ju = np.triu_indices(self.n, 1)
        keep = self.similarity[iu, ju] >= float(self.threshold.value)
        edges = frozenset(zip(iu[keep].tolist(), ju[keep].tolist()))
        moved = edges != self.edges
        if moved:
            self.graph = nx.Graph()
            self.graph.add_nodes_from(range(self.n))
            self.graph.add_weighted_edges_from((a, b, float(self.similarity[a, b])) for a, b in edges)
            init = self.positions if len(self.positions) == self.n else None
            pos = nx.spring_layout(self.graph, pos=init, weight="weight", seed=self.seed) if self.n > 1 else {0: np.zeros(2)}
            self.positions = {int(k): np.asarray(v, float) for k, v in pos.items()}
            self.edges = edges
            self.layouts += 1
        if moved or changed or force_edges:
            order = sorted(self.edges)
            p = self.positions
            s = [float(self.similarity[a, b]) for a, b in order]
            self.edge_source.data = {"x0": [p[a][0] for a, _ in order], "y0": [p[a][1] for a, _ in order],
                                     "x1": [p[b][0] for _, b in order], "y1": [p[b][1] for _, b in order],
                                     "a": [a for a, _ in order], "b": [b for _, b in order], "similarity": s,
                                     "alpha": [0.15 + 0.6 * (x - self.threshold.value) / max(1e-9, 1 - self.threshold.value)
                                               for x in s]}
        self._patch_nodes(table, with_positions=moved)
        self.graph_fig.title.text = (f"{self.n} members, {len(self.edges)} edges at similarity ≥ "
                                     f"{self.threshold.value:.2f} · size and colour: {self.metric.value}")

    def _patch_nodes(self, table: pd.DataFrame, *, with_positions: bool) -> None:
        status = table["status"].tolist()
        v, colors = self._node_colors(status)
        lo, hi = self.mapper.low, self.mapper.high
        size = np.where(np.isfinite(v), 9 + 17 * np.clip((np.nan_to_num(v) - lo) / (hi - lo), 0, 1), 9.0)
        line_color, line_width = self._outline(status)
        hp = [f"lr={r.lr:.3g} mom={r.momentum:.2f} wd={r.weight_decay:.2g} batch={int(r.batch_size)}"
              for r in table.itertuples()]
        cols: dict[str, list] = {"value": v.tolist(), "size": size.tolist(), "color": colors,
                                 "line_color": line_color, "line_width": line_width, "arch": table["arch"].tolist(),
                                 "hparams": hp, "status": status, "origin": table["origin"].tolist(),
                                 "alarms": self.alarm_counts.tolist()}
        if with_positions:
            cols["x"] = [float(self.positions[i][0]) for i in range(self.n)]
            cols["y"] = [float(self.positions[i][1]) for i in range(self.n)]
        self.node_source.patch({k: [(slice(0, self.n), vals)] for k, vals in cols.items()})

    def _draw_resources(self, table: pd.DataFrame, rows: pd.DataFrame | None) -> None:
        acc = self.latest_values("val_acc")
        n_params = self.latest_values("n_params")
        root = np.sqrt(np.nan_to_num(n_params, nan=0.0))
        top = root.max() if root.size and root.max() > 0 else 1.0
        _, colors = self._node_colors(table["status"].tolist())
        line_color, line_width = self._outline(table["status"].tolist())
        with np.errstate(divide="ignore", invalid="ignore"):
            per_s = np.where(self.compute > 0, acc / self.compute, math.nan)
        cols = {"compute": self.compute.tolist(), "val_acc": acc.tolist(), "per_s": per_s.tolist(),
                "n_params": np.nan_to_num(n_params).astype(int).tolist(), "psize": (6 + 20 * root / top).tolist(),
                "arch": table["arch"].tolist(), "steps_next": table["steps_next"].astype(int).tolist(),
                "steps_last": np.nan_to_num(self.latest_values("steps")).astype(int).tolist(),
                "fitness": table["fitness"].astype(float).tolist(), "color": colors, "line_color": line_color,
                "line_width": line_width}
        self.res_source.patch({k: [(slice(0, self.n), vals)] for k, vals in cols.items()})
        if rows is not None:
            cpu, rss = float(rows["cpu_percent"].iloc[-1]), float(rows["rss_bytes"].iloc[-1])
            pol = self.swarm.policy
            rule = f"{pol.allocation}, T={pol.temperature:.3g}" if pol.allocation == "proportional" else "equal"
            self.steps_fig.title.text = f"steps allotted next round ({rule}) · process CPU {cpu:.0f} %, RSS {rss / 2**20:.0f} MiB"

    def recolour(self) -> None:
        """Show the chosen metric: heatmap colour field, colour bar range, node sizes and colours."""
        self.heat_renderer.glyph.fill_color = transform(self.metric.value, self.mapper)
        self._update_range()
        self._label_metric()
        table = self.swarm.table()
        self._patch_nodes(table, with_positions=False)
        self._draw_resources(table, None)
        self.graph_fig.title.text = (f"{self.n} members, {len(self.edges or ())} edges at similarity ≥ "
                                     f"{self.threshold.value:.2f} · size and colour: {self.metric.value}")

    def _label_metric(self) -> None:
        m = self.metric.value
        self.heat_fig.title.text = f"{m} per member and round (red outline: an alarm)"
        self.color_bar.title = m
        fmt = "{0,0}" if m in ("rss_bytes", "steps") else "{0.0000}"
        self.heat_hover.tooltips = [("member", "@member (@arch)"), ("round", "@round"), (m, f"@{{{m}}}{fmt}"),
                                    ("status", "@status")]
        self.node_hover.tooltips = [("member", "@member"), ("arch", "@arch"), ("hparams", "@hparams"),
                                    (m, f"@value{fmt}"), ("status", "@status"), ("origin", "@origin"),
                                    ("alarms", "@alarms")]

    # -- trajectories
    def _trajectory_rows(self, stats: pd.DataFrame) -> pd.DataFrame:
        if stats.empty or not self._selected:
            return stats.iloc[0:0]
        if "kind" in stats.columns:
            stats = stats[stats["kind"] == "weight"]
        return stats[stats["rank"].isin(self._selected)].sort_values(["rank", "layer", "step"], kind="stable")

    def _rebuild_trajectories(self) -> None:
        """Every received statistics row of the selected members (selection or statistic changed)."""
        rows = self._trajectory_rows(self.stats_frame())
        stat = self.stat.value
        self._series = {}
        for (m, layer), g in rows.groupby(["rank", "layer"], sort=True):
            self._series[int(m), str(layer)] = (g["step"].astype(float).tolist(), g[stat].astype(float).tolist())
        keys = list(self._series)
        self.traj_source.data = {"member": [m for m, _ in keys], "layer": [la for _, la in keys],
                                 "xs": [self._series[k][0] for k in keys], "ys": [self._series[k][1] for k in keys],
                                 "color": [Category10_10[m % 10] for m, _ in keys],
                                 "dash": [layer_dash(la) for _, la in keys]}
        self.traj_points.data = {"member": rows["rank"].astype(int).tolist(), "layer": rows["layer"].astype(str).tolist(),
                                 "step": rows["step"].astype(float).tolist(), "value": rows[stat].astype(float).tolist(),
                                 "color": [Category10_10[int(m) % 10] for m in rows["rank"]]}
        who = ", ".join(map(str, self._selected)) or "none: tap a node"
        self.traj_fig.title.text = f"weight {stat} per layer of members {who} (solid: out, dashed: h0, dotted: h1)"
        self.traj_fig.yaxis.axis_label = f"weight {stat}"

    def _stream_trajectories(self, stats: pd.DataFrame) -> None:
        rows = self._trajectory_rows(stats)
        if rows.empty:
            return
        stat = self.stat.value
        patches, added = [], {"member": [], "layer": [], "xs": [], "ys": [], "color": [], "dash": []}
        index = {k: i for i, k in enumerate(self._series)}
        for (m, layer), g in rows.groupby(["rank", "layer"], sort=True):
            key = (int(m), str(layer))
            xs, ys = self._series.setdefault(key, ([], []))
            xs.extend(g["step"].astype(float).tolist())
            ys.extend(g[stat].astype(float).tolist())
            if key in index:
                patches.append((index[key], key))
            else:
                for col, v in (("member", key[0]), ("layer", key[1]), ("xs", list(xs)), ("ys", list(ys)),
                               ("color", Category10_10[key[0] % 10]), ("dash", layer_dash(key[1]))):
                    added[col].append(v)
        if patches:
            self.traj_source.patch({"xs": [(i, list(self._series[k][0])) for i, k in patches],
                                    "ys": [(i, list(self._series[k][1])) for i, k in patches]})
        if added["member"]:
            self.traj_source.stream(added)
        self.traj_points.stream({"member": rows["rank"].astype(int).tolist(), "layer": rows["layer"].astype(str).tolist(),
                                 "step": rows["step"].astype(float).tolist(), "value": rows[stat].astype(float).tolist(),
                                 "color": [Category10_10[int(m) % 10] for m in rows["rank"]]},
                                rollover=self.max_points)

    # -- status
    def _draw_status(self, table: pd.DataFrame | None = None) -> None:
        table = table if table is not None else self.swarm.table()
        q = int((table["status"] == "quarantined").sum())
        acc = self.latest_values("val_acc")
        text = f"round <b>{self.swarm.round}</b> · {self.n - q} active, {q} quarantined"
        if np.isfinite(acc).any():
            best = int(np.nanargmax(acc))
            text += f" · best val acc <b>{acc[best]:.3f}</b> (member {best})"
        if self.swarm.paused:
            text += " · <b>paused</b>"
        if self.ages:
            text += f" · data age {self.ages[-1]:.2f} s"
        if self._problem:
            text += f"<br><span style='color:{ALARM_COLOR}'>{html.escape(self._problem)}</span>"
        self.status.value = text

