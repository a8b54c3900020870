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
import numpy as np
import pandas as pd
from bokeh.layouts import row
from bokeh.models import LinearColorMapper
from jupyter_bokeh.widgets import BokehModel

from adaptive_kit.swarm import ALLOCATIONS, PERTURB_MODES, Collector, Goals, Swarm

from .common import Panel, control_row, panel_layout
from .swarm_feed import SwarmFeed
from .swarm_graph import SwarmGraph, sparse_edges
from .swarm_plots import (
    ALARM_COLOR,
    ALARM_ROUNDS,
    DASHES,
    EDGE_COLOR,
    GOALS,
    KIND_STYLE,
    METRICS,
    NAN_COLOR,
    PALETTE,
    TRAJECTORY_STATS,
    _floats,
    best_so_far,
    layer_dash,
    lineage_figure,
    palette_colors,
)
from .swarm_views import Heatmap, Resources, Trajectories

__all__ = ["ALARM_COLOR", "DASHES", "EDGE_COLOR", "GOALS", "KIND_STYLE", "METRICS", "NAN_COLOR", "PALETTE",
           "TRAJECTORY_STATS", "SwarmPanel", "best_so_far", "layer_dash", "lineage_figure", "palette_colors",
           "sparse_edges"]


class SwarmPanel(Panel):
    """A live dashboard over a running :class:`~adaptive_kit.swarm.Swarm`, steering it between rounds.

    Views, one class each: :class:`~widgets.swarm_graph.SwarmGraph` (each member joined to its
    ``neighbours`` most similar members at similarity >= ``threshold``; size and colour: the chosen
    metric; hover names a member, tap selects), :class:`~widgets.swarm_views.Heatmap` (members x
    rounds), :class:`~widgets.swarm_views.Trajectories` (the selected members' weights) and
    :class:`~widgets.swarm_views.Resources` (compute, accuracy, steps allotted); the latest alarms.

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
                 collector: Collector | None = None, seed: int = 0, neighbours: int = 3) -> None:
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
        self.feed = SwarmFeed(self.collector, self.n)
        self.alarm_rows: list[dict[str, Any]] = []
        self.alarm_counts = np.zeros(self.n, dtype=int)
        self.alarm_round = np.full(self.n, -10**9)  # per member, the round of its latest alarm
        self._selected: list[int] = []

        # counters a test or a browser check reads
        self.redraws, self.ticks, self.dropped_ticks = 0, 0, 0
        self.ages: list[float] = []
        self.redraw_s: list[float] = []
        self._last_redraw = self._tick_done = -math.inf
        self._pending = self._quiet = False
        self._problem = ""

        self._build_controls(metric, threshold, stat, interval_ms, max_rounds)
        self._build_figures(metric, neighbours)
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
        goals, opt = self.swarm.goals, self.swarm.optimiser
        self.metric = w.Dropdown(options=list(METRICS), value=metric, description="metric",
                                 layout=w.Layout(width="200px"))
        self.threshold = w.FloatSlider(value=threshold, min=0.0, max=1.0, step=0.01, readout_format=".2f",
                                       description="edge: similarity ≥", **slider)
        self.stat = w.Dropdown(options=list(TRAJECTORY_STATS), value=stat, description="trajectory",
                               layout=w.Layout(width="200px"))
        self.goal = {g: w.FloatSlider(value=float(getattr(goals, g)), min=0.0, max=1.0, step=0.05,
                                      description=g, readout_format=".2f", layout=w.Layout(width="230px"), **slider)
                     for g in GOALS}
        self.allocation = w.ToggleButtons(options=list(ALLOCATIONS), value=opt.allocation,
                                          tooltips=["steps ∝ fitness^(1/temperature)", "the same steps for all"],
                                          style={"button_width": "90px"})
        self.temperature = w.FloatLogSlider(value=opt.temperature, base=10, min=-2, max=1, step=0.05,
                                            description="temperature", readout_format=".3g", **slider)
        self.perturb = w.ToggleButtons(options=list(PERTURB_MODES), value=opt.perturb,
                                       tooltips=["×0.8 / ×1.25 or a fresh draw", "one step on the grid"],
                                       style={"button_width": "70px"})
        self.mutation = w.FloatSlider(value=opt.mutation_rate, min=0.0, max=1.0, step=0.05,
                                      description="mutation rate", **slider)
        self.breed = w.FloatSlider(value=opt.breed_rate, min=0.0, max=1.0, step=0.05, description="breed rate",
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
            c.observe(lambda _: self.set_optimiser(), names="value")
        self.pause.observe(lambda c: self._on_pause(bool(c["new"])), names="value")
        self.play.observe(self._on_play, names="value")
        self.step_button.on_click(lambda _: self._on_step())

    def _build_figures(self, metric: str, neighbours: int) -> None:
        self.mapper = LinearColorMapper(palette=PALETTE, low=0.0, high=1.0, nan_color=NAN_COLOR)
        self.graph_view = SwarmGraph(self.swarm, neighbours=neighbours, seed=self.seed)
        self.heatmap = Heatmap(self.n, self.mapper, metric)
        self.trajectories = Trajectories()
        self.resources = Resources(self.n)
        # the names tests, notebooks and the browser checks read
        self.graph_fig, self.node_source, self.edge_source = (self.graph_view.figure, self.graph_view.node_source,
                                                              self.graph_view.edge_source)
        self.node_hover = self.graph_view.node_hover
        self.node_source.selected.on_change("indices", self._on_tap)
        self.heat_fig, self.heat_source, self.heat_alarm_source = (self.heatmap.figure, self.heatmap.source,
                                                                   self.heatmap.alarm_source)
        self.heat_renderer, self.color_bar = self.heatmap.renderer, self.heatmap.color_bar
        self.traj_fig, self.traj_source, self.traj_points = (self.trajectories.figure, self.trajectories.source,
                                                             self.trajectories.points)
        self.res_fig, self.steps_fig, self.res_source = (self.resources.fig, self.resources.steps_fig,
                                                         self.resources.source)
        # one document per row: the graph and the heatmap share the colour mapper
        self.top_widget = BokehModel(row(self.graph_fig, self.heat_fig))
        self.bottom_widget = BokehModel(row(self.traj_fig, self.res_fig, self.steps_fig))
        self._label_metric()

    # graph state lives in its view
    similarity = property(lambda self: self.graph_view.similarity)
    edges = property(lambda self: self.graph_view.edges)
    graph = property(lambda self: self.graph_view.graph)
    positions = property(lambda self: self.graph_view.positions)
    layouts = property(lambda self: self.graph_view.layouts)

    # == reading the bus: the feed keeps what arrived ====================================================
    def latest_values(self, metric: str | None = None) -> np.ndarray:
        """(N,) the newest reported value of ``metric`` (default: the one shown) per member; NaN before any."""
        return self.feed.latest_values(metric or self.metric.value)

    def stats_frame(self) -> pd.DataFrame:
        """Every weight-statistics row received (the bus's ``stats`` stream; ``rank`` is the member)."""
        return self.feed.stats_frame()

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

    def set_optimiser(self) -> Any:
        """Give the swarm the optimiser controls' allocation, temperature, perturbation mode, mutation
        and breed rates (``dataclasses.replace`` of its optimiser config); an invalid value is reported in the
        status line. Returns the config set, or None."""
        try:
            optimiser = dataclasses.replace(self.swarm.optimiser, allocation=self.allocation.value,
                                            temperature=float(self.temperature.value), perturb=self.perturb.value,
                                            mutation_rate=float(self.mutation.value), breed_rate=float(self.breed.value))
        except ValueError as e:
            self._set_problem(f"optimiser not changed: {e}")
            return None
        self.swarm.optimiser = optimiser
        self._set_problem("")
        return optimiser

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
        self.graph_view.label_selected(chosen)
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
        rows, stats, alarms = self.feed.take("swarm"), self.feed.take("stats"), self.feed.take("swarm_alarms")
        if rows is not None:
            self.feed.ingest(rows)
            self._stream_heat(rows)
        if alarms is not None:
            self._take_alarms(alarms)
        if stats is not None:
            self.feed.add_stats(stats)
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
        np.maximum.at(self.alarm_round, alarms["member"].to_numpy(dtype=int), alarms["round"].to_numpy(dtype=int))
        self.heat_alarm_source.stream({"member": alarms["member"].astype(int).tolist(),
                                       "round": alarms["round"].astype(int).tolist(),
                                       "detector": alarms["detector"].astype(str).tolist(),
                                       "evidence": alarms["evidence"].astype(str).tolist()},
                                      rollover=self.max_points)
        latest = self.alarm_rows[::-1][:self.max_alarms]
        cells = "".join(f"<tr><td>{a['round']}</td><td>{a['member']}</td><td>{html.escape(str(a['detector']))}</td>"
                        f"<td>{html.escape(str(a['scope']))}</td><td style='text-align:left'>"
                        f"{html.escape(str(a['evidence']))}</td></tr>" for a in latest)
        self.alarms_html.value = (
            f"<b>alarms</b>: {len(self.alarm_rows)} this run (latest first)"
            "<table style='font-size:90%;max-width:1100px'><tr><th>round</th><th>member</th><th>detector</th><th>scope</th>"
            f"<th>evidence</th></tr>{cells}</table>")

    def _update_range(self) -> None:
        lo, hi = self.feed.ranges.get(self.metric.value, (0.0, 1.0))
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
        # a ring for an alarm in the last rounds only (every alarm ever rings every member in the end)
        flagged = quarantined | (self.alarm_round >= self.swarm.round - ALARM_ROUNDS)
        return ([ALARM_COLOR if f else "#333333" for f in flagged],
                [3.0 if q else 2.0 if f else 1.0 for q, f in zip(quarantined, flagged)])

    def _draw_graph(self, *, table: pd.DataFrame | None = None, force_edges: bool = False) -> None:
        """Similarity of the current specs (rows of changed members only), the sparse edges at the
        threshold (a new layout only when they changed), and the nodes' values and looks."""
        table = table if table is not None else self.swarm.table()
        g = self.graph_view
        changed = g.update_similarity()
        threshold = float(self.threshold.value)
        moved = g.layout(threshold)
        if moved or changed or force_edges:
            g.draw_edges(threshold)
        self._patch_nodes(table, with_positions=moved)
        g.set_title(threshold, self.metric.value)

    def _patch_nodes(self, table: pd.DataFrame, *, with_positions: bool) -> None:
        status = table["status"].tolist()
        v, colors = self._node_colors(status)
        self.graph_view.patch_nodes(table, v, colors, self._outline(status), self.mapper.low, self.mapper.high,
                                    self._selected, self.alarm_counts.tolist(), with_positions=with_positions)

    def _draw_resources(self, table: pd.DataFrame, rows: pd.DataFrame | None) -> None:
        status = table["status"].tolist()
        _, colors = self._node_colors(status)
        self.resources.draw(table, self.feed.compute, self.latest_values("val_acc"), self.latest_values("n_params"),
                            self.latest_values("steps"), colors, self._outline(status))
        if rows is not None:
            cpu, rss = float(rows["cpu_percent"].iloc[-1]), float(rows["rss_bytes"].iloc[-1])
            pol = self.swarm.optimiser
            rule = f"{pol.allocation}, T={pol.temperature:.3g}" if pol.allocation == "proportional" else "equal"
            self.resources.title_steps(rule, cpu, rss / 2**20)

    def recolour(self) -> None:
        """Show the chosen metric: heatmap colour field, colour bar range, node sizes and colours."""
        self._update_range()
        self._label_metric()
        table = self.swarm.table()
        self._patch_nodes(table, with_positions=False)
        self._draw_resources(table, None)
        self.graph_view.set_title(float(self.threshold.value), self.metric.value)

    def _label_metric(self) -> None:
        m = self.metric.value
        self.heatmap.show_metric(m, self.mapper)
        fmt = "{0,0}" if m in ("rss_bytes", "steps") else "{0.0000}"
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
        self.trajectories.rebuild(self._trajectory_rows(self.stats_frame()), self.stat.value, self._selected)

    def _stream_trajectories(self, stats: pd.DataFrame) -> None:
        self.trajectories.stream(self._trajectory_rows(stats), self.stat.value, self.max_points)

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

