"""The predictive-partitioning panel: the model graph by stage, stage loads against the anchors,
the pipeline schedule, and the runtime controller reacting live to a device you slow down.

The static views and the plan comparison live in :mod:`widgets.partition_plots`; their names are
importable from here too."""
from __future__ import annotations

import html
import math
from collections.abc import Mapping

import ipywidgets as w
import networkx as nx
import numpy as np
import pandas as pd
import torch
from bokeh.models import ColumnDataSource, HoverTool
from bokeh.plotting import figure, from_networkx
from jupyter_bokeh.widgets import BokehModel

from adaptive_kit import partition as pt
from adaptive_kit.partition import (
    SCHEDULES,
    Comparison,
    EmulatedPipeline,
    ModelPlan,
    Simulation,
    compare_plans,
    plan_model,
    stage_loads,
)

from .common import LivePlot, Panel, ThrottledStream, control_row, panel_layout
from .partition_plots import (
    ANCHORS,
    KIND_COLORS,
    MAX_K,
    METHOD_COLORS,
    METHODS,
    METIS,
    OURS,
    STAGE_COLORS,
    _bar_data,
    _graph_renderer,
    _style_graph,
    forecast_figure,
    gantt_data,
    gantt_figure,
    graph_figure,
    interval_figure,
    layered_layout,
    load_bars,
    ratio_bars,
    schedule_of,
    stage_key,
    throughput_figure,
)
from .plots import house_style, key_entry, set_colour_key, set_title

__all__ = ["ANCHORS", "KIND_COLORS", "MAX_K", "METHODS", "METHOD_COLORS", "METIS", "OURS", "STAGE_COLORS",
           "LiveLoads", "PartitionPanel", "forecast_figure", "gantt_data", "gantt_figure", "graph_figure",
           "interval_figure", "layered_layout", "load_bars", "ratio_bars", "schedule_of", "throughput_figure"]


class LiveLoads(ThrottledStream):
    """Per-device load factor streamed as the controller sees it: measured (solid), the forecast
    made the window before with its interval (dashed, band), the assumed load (dotted).

    ``push`` takes the controller's history rows of one window; a redraw streams the buffer at
    most every ``min_interval_s``. Call :meth:`flush` at the end of a run.

    Attributes:
        source: columns ``window`` and ``load{j}``, ``forecast{j}``, ``lower{j}``, ``upper{j}``,
            ``assumed{j}`` for j < :data:`MAX_K`.
        figure, widget, redraws: see :class:`~widgets.common.ThrottledStream`.
    """

    FIELDS = ("load", "forecast", "lower", "upper", "assumed")

    def __init__(self, k: int, *, min_interval_s: float = 0.5, rollover: int = 2000, width: int = 560,
                 height: int = 260) -> None:
        self.source = ColumnDataSource(self._empty_columns())
        fig = figure(title="load per device: measured (solid), forecast ± interval (dashed, band), assumed (dotted)",
                     width=width, height=height, x_axis_label="window", y_axis_label="load (× planned)",
                     tools="pan,wheel_zoom,reset,save")
        self.glyphs: list[list] = []
        for j in range(MAX_K):
            color = STAGE_COLORS[j % 10]
            label = f"device {j}"
            self.glyphs.append([
                fig.varea("window", f"lower{j}", f"upper{j}", source=self.source, color=color,
                          alpha=0.15, legend_label=label),
                fig.line("window", f"load{j}", source=self.source, color=color, line_width=2, legend_label=label),
                fig.line("window", f"forecast{j}", source=self.source, color=color, line_dash="dashed",
                         legend_label=label),
                fig.line("window", f"assumed{j}", source=self.source, color=color, line_dash="dotted",
                         legend_label=label)])
        fig.add_tools(HoverTool(renderers=[g[1] for g in self.glyphs], tooltips=[
            ("window", "@window"), ("load", "$y{0.00}")]))
        house_style(fig)
        super().__init__(fig, min_interval_s=min_interval_s, rollover=rollover)
        self.k = k
        self._previous: dict[int, tuple[float, float, float]] = {}

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

    def _empty_columns(self) -> dict[str, list]:
        return {"window": [], **{f"{f}{j}": [] for j in range(MAX_K) for f in self.FIELDS}}

    def _empty(self) -> dict[ColumnDataSource, dict[str, list]]:
        return {self.source: self._empty_columns()}

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
        self._add(row)

    def _columns(self, pending: list) -> dict[ColumnDataSource, dict[str, list]]:
        return {self.source: {c: [r[c] for r in pending] for c in self.source.data}}

    def clear(self) -> None:
        """Drop every point, drawn or pending."""
        super().clear()
        self._previous.clear()


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
        self.models = dict(models) if models is not None else pt.models.zoo()
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
                                tools="pan,wheel_zoom,box_zoom,reset,save",
                                x_axis_label="topological generation (distance from the input)")
        self.graph_fig.yaxis.visible = False
        self.graph_fig.xgrid.visible = self.graph_fig.ygrid.visible = False
        self.graph_renderer = from_networkx(nx.DiGraph(), {})
        _style_graph(self.graph_renderer)
        self.graph_fig.renderers.append(self.graph_renderer)
        self.graph_fig.add_tools(HoverTool(renderers=[self.graph_renderer], tooltips=[
            ("node", "@index"), ("op", "@op @target"), ("stage", "@stage"), ("cost", "@cost_ms{0.000} ms")]))
        self.stage_legend = stage_key(self.graph_fig, k)
        house_style(self.graph_fig)
        self.bars_fig, self.bars_source, self.bound_span = load_bars({}, title="stage loads: ours vs the anchors")
        self.gantt_fig, self.gantt_source = gantt_figure(pd.DataFrame({"stage": [], "micro": [], "kind": [],
                                                                       "start_s": [], "end_s": []}))
        self.loads_plot = LiveLoads(k, min_interval_s=min_interval_s)
        self.throughput_plot = LivePlot(["throughput", "optimum"], x_name="window",
                                        title="throughput against the optimum (×: a re-partition)",
                                        y_label="steps / s", rollover=100_000, min_interval_s=min_interval_s,
                                        width=560, height=260)
        self.throughput_plot.figure.y_range.start = 0  # throughput is a rate: its axis starts at 0
        self.repartition_source = ColumnDataSource({"window": [], "throughput": [], "reason": []})
        self.throughput_plot.figure.scatter("window", "throughput", source=self.repartition_source, marker="x",
                                            size=14, line_width=3, color="red")
        key_entry(self.throughput_plot.figure, "re-partition", marker="x", size=14, line_width=3, color="red")
        house_style(self.throughput_plot.figure)
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
        set_title(self.graph_fig, f"{self.model.value}: {mp.graph.number_of_nodes()} nodes, coloured by "
                                  f"stage (k={self.k.value}; {split})")
        set_colour_key(self.stage_legend, {f"stage {j}": STAGE_COLORS[j % 10] for j in range(int(self.k.value))})

    def _draw_bars(self) -> None:
        comp = self.comparison
        self.bars_source.data = _bar_data(comp.loads)
        self.bars_fig.x_range.factors = list(self.bars_source.data["x"])
        self.bound_span.visible = comp.bound is not None
        self.bound_span.location = comp.bound.lower_s * 1e3 if comp.bound is not None else 0.0
        title = "stage loads: ours vs the anchors"
        if comp.bound is not None:
            title += " (dashed: MILP lower bound)"
        set_title(self.bars_fig, title)

    # -- the schedule --------------------------------------------------------------------------------
    def stage_seconds(self) -> np.ndarray:
        """(k,) seconds of each stage of the plan in force at the devices' current speeds."""
        plan = self.pipe.controller.plan if self.pipe is not None else self.model_plan.plan
        return stage_loads(self.model_plan.graph, plan.stage_of, int(self.k.value), speeds=self.speeds())

    def redraw_gantt(self) -> Simulation:
        """Simulate one step of the plan in force at the current speeds; draw it as a Gantt chart."""
        self.simulation = schedule_of(self.stage_seconds(), int(self.micro.value), self.schedule.value)
        self.gantt_source.data = gantt_data(self.simulation.events)
        k = int(self.k.value)
        self.gantt_fig.y_range.start, self.gantt_fig.y_range.end = k - 0.5, -0.5
        self.gantt_fig.yaxis.ticker = list(range(k))
        set_title(self.gantt_fig, f"{self.schedule.value}, {self.micro.value} micro-batches: "
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

