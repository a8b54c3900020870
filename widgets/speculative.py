"""The speculative-training panel: controls, a live region-state heatmap, ours against DDP and local SGD."""
from __future__ import annotations

import html
import math
from collections.abc import Mapping, Sequence
from dataclasses import replace

import ipywidgets as w
import numpy as np
import pandas as pd
from bokeh.models import (
    ColorBar,
    ColumnDataSource,
    FactorRange,
    HoverTool,
    LinearColorMapper,
    Range1d,
)
from bokeh.palettes import Category10_10, Viridis256
from bokeh.plotting import figure
from bokeh.transform import dodge
from jupyter_bokeh.widgets import BokehModel

from adaptive_kit import speculative as sp
from adaptive_kit.training import TrainConfig

from .common import LivePlot, Panel, ThrottledStream, control_row, panel_layout
from .plots import house_style, key_entry, set_title

METHODS = ("ours", "DDP", "local SGD")  # the panel's three runs, in the order they train
COLORS = dict(zip(METHODS, Category10_10))  # the same colour for a method in every plot
TARGET_RATIO = 1.05  # time to target: the first evaluation at <= 1.05 x DDP's final test loss
TASKS = {"digits": sp.tasks.digits_task, "sequence": sp.tasks.sequence_task, "regression": sp.tasks.regression_task}


def _heatmap_figure(source: ColumnDataSource, regions: Sequence[str], *, title: str, width: int,
                    height: int):
    """A region x step figure of ``rect`` cells coloured by the source's ``p`` column in [0, 1]."""
    fig = figure(title=title, width=width, height=height, y_range=FactorRange(*regions),
                 x_axis_label="step", y_axis_label="region", tools="pan,xwheel_zoom,reset,save")
    mapper = LinearColorMapper(palette=Viridis256, low=0.0, high=1.0)
    fig.rect(x="step", y="region", width=1, height=1, source=source, line_color=None,
             fill_color={"field": "p", "transform": mapper})
    fig.add_layout(ColorBar(color_mapper=mapper, width=10, title="p (0 Global, 1 Full)"), "right")
    fig.add_tools(HoverTool(tooltips=[("step", "@step"), ("region", "@region"), ("p", "@p{0.00}"),
                                      ("state", "@state")]))
    fig.xgrid.visible = fig.ygrid.visible = False
    return house_style(fig)


def _state(p: float) -> str:
    return sp.GLOBAL if p <= 0 else sp.FULL if p >= 1 else sp.HYBRID


class LiveHeatmap(ThrottledStream):
    """Region states (region x step, coloured by the speculative fraction p) streamed in batches.

    ``push`` only buffers host values (the engine's ``p`` is a numpy array, so no device sync);
    a redraw streams the buffer at most every ``min_interval_s``. Call :meth:`flush` at the
    end of a run.

    Attributes:
        source: the ``ColumnDataSource`` (``step``, ``region``, ``p``, ``state``; one row per cell).
        figure, widget, redraws: see :class:`~widgets.common.ThrottledStream`.
    """

    def __init__(self, regions: Sequence[str] = ("",), *, title: str = "region states",
                 min_interval_s: float = 0.5, width: int = 640, height: int = 220) -> None:
        self.source = ColumnDataSource(self._empty_cells())
        fig = _heatmap_figure(self.source, [str(r) for r in regions], title=title, width=width, height=height)
        super().__init__(fig, min_interval_s=min_interval_s)

    @staticmethod
    def _empty_cells() -> dict[str, list]:
        return {"step": [], "region": [], "p": [], "state": []}

    def _empty(self) -> dict[ColumnDataSource, dict[str, list]]:
        return {self.source: self._empty_cells()}

    @property
    def regions(self) -> list[str]:
        return list(self.figure.y_range.factors)

    @regions.setter
    def regions(self, names: Sequence[str]) -> None:
        self.figure.y_range.factors = [str(n) for n in names]

    def push(self, step: int, p: np.ndarray, states: Sequence[str] | None = None) -> None:
        """Add one column of cells: ``p`` (R,) in region order; ``states`` (R,) optional.

        Raises:
            ValueError: ``p`` does not have one value per region.
        """
        p = np.asarray(p, dtype=float).reshape(-1)
        if len(p) != len(self.regions):
            raise ValueError(f"LiveHeatmap.push: {len(p)} values for {len(self.regions)} regions")
        self._add((int(step), p.copy(), list(states) if states is not None else [_state(v) for v in p]))

    def _columns(self, pending: list) -> dict[ColumnDataSource, dict[str, list]]:
        regions, new = self.regions, self._empty_cells()
        for step, p, states in pending:
            new["step"] += [step] * len(regions)
            new["region"] += regions
            new["p"] += p.tolist()
            new["state"] += states
        return {self.source: new}


def region_heatmap(p: np.ndarray, regions: Sequence[str], *, title: str = "speculative fraction p per region",
                   width: int = 640, height: int = 220):
    """A static heatmap of a run's ``p`` (steps, R): 0 Global, 1 Full, between Hybrid."""
    p = np.asarray(p, dtype=float)
    steps, r = p.shape
    names = [str(n) for n in regions]
    if r != len(names):
        raise ValueError(f"region_heatmap: p has {r} regions, names {len(names)}")
    src = ColumnDataSource({"step": np.repeat(np.arange(steps), r), "region": names * steps,
                            "p": p.reshape(-1), "state": [_state(v) for v in p.reshape(-1)]})
    return _heatmap_figure(src, names, title=title, width=width, height=height)


def loss_vs_bytes(results: Mapping[str, sp.RunResult], *, title: str = "test loss against bytes sent",
                  width: int = 640, height: int = 300):
    """Test loss of the averaged model against cumulative bytes per worker, one line per run."""
    fig = figure(title=title, width=width, height=height, x_axis_type="log", tools="pan,wheel_zoom,reset,save",
                 x_axis_label="bytes sent per worker (B, log)", y_axis_label="test loss")
    for i, (name, r) in enumerate(results.items()):
        x = np.maximum(r.bytes_at_evals(), 1)
        color = Category10_10[i % 10]
        fig.line(x, r.evals["test_loss"], legend_label=name, color=color, line_width=2)
        fig.scatter(x[-1:], r.evals["test_loss"].iloc[-1:], color=color, size=8, legend_label=name)
    return house_style(fig)


def final_loss_vs_bytes(sweeps: Mapping[str, Sequence[sp.RunResult]], *,
                        title: str = "final test loss against bytes sent (one point per setting)",
                        width: int = 640, height: int = 320):
    """Each method's sweep of settings as a curve of final test loss against bytes per worker."""
    fig = figure(title=title, width=width, height=height, x_axis_type="log", tools="pan,wheel_zoom,reset,save",
                 x_axis_label="bytes sent per worker (B, log)", y_axis_label="final test loss")
    for i, (name, runs) in enumerate(sweeps.items()):
        pts = sorted((r.bytes_per_worker()["total"], r.final_test_loss) for r in runs)
        color = Category10_10[i % 10]
        if len(pts) > 1:
            fig.line([x for x, _ in pts], [y for _, y in pts], color=color, line_width=2, legend_label=name)
        fig.scatter([x for x, _ in pts], [y for _, y in pts], color=color, size=10, legend_label=name,
                    marker="star" if name == "ours" else "circle")
    return house_style(fig)


def time_to_target_bars(results: Mapping[str, sp.RunResult], target: float,
                        profiles: Sequence[str] = tuple(sp.PROFILES), *, width: int = 640, height: int = 300):
    """Grouped bars: simulated seconds to reach test loss ``target``, per network profile and run.

    Runs that never reach it get no bar (their name is listed in the title)."""
    rows, missed = [], set()
    for prof in profiles:
        for name, r in results.items():
            t = r.time_to(target, prof)
            if math.isfinite(t):
                rows.append(((prof, name), t))
            else:
                missed.add(name)
    factors = [(prof, name) for prof in profiles for name in results]
    colors = {name: Category10_10[i % 10] for i, name in enumerate(results)}
    src = ColumnDataSource({"x": [x for x, _ in rows], "t": [t for _, t in rows],
                            "color": [colors[x[1]] for x, _ in rows]})
    title = f"simulated time to test loss {target:.3f}"
    if missed:
        title += f" (never reached: {', '.join(sorted(missed))})"
    fig = figure(x_range=FactorRange(*factors), title=title, width=width, height=height, y_axis_type="log",
                 y_axis_label="simulated time (s, log)", tools="save",
                 y_range=Range1d(min(src.data["t"], default=1.0) / 3, max(src.data["t"], default=1.0) * 3))
    fig.vbar(x="x", top="t", width=0.8, bottom=1e-3, color="color", source=src)
    fig.xaxis.major_label_orientation = 1.0
    fig.add_tools(HoverTool(tooltips=[("", "@x"), ("seconds", "@t{0,0.000}")]))
    return house_style(fig)


def reconciliation_bars(result: sp.RunResult, *, width: int = 360, height: int = 260):
    """Tagged outputs of a run (one per worker and tagged step): kept against recomputed."""
    kept, recomputed = result.tagged_outputs()
    src = ColumnDataSource({"x": ["kept", "recomputed"], "y": [kept, recomputed],
                            "color": [Category10_10[2], Category10_10[3]]})
    fig = figure(x_range=["kept", "recomputed"], title=f"{result.method}: tagged outputs", width=width,
                 height=height, y_axis_label="worker-steps", tools="save")
    fig.vbar(x="x", top="y", width=0.7, color="color", source=src)
    fig.add_tools(HoverTool(tooltips=[("", "@x"), ("worker-steps", "@y")]))
    return house_style(fig)


class SpeculativePanel(Panel):
    """Train ours live, then DDP and local SGD on the same task, and compare bytes and time.

    Controls: workers K, the reconcile, divergence and variance thresholds, the sync period
    (ours' starting period and local SGD's period), the non-IID skew (Dirichlet alpha), steps,
    and the network profile. Run trains ours with a live region-state heatmap and a live loss
    curve, then DDP and local SGD; changing the network profile afterwards re-prices the runs
    without training again. Drive it headless: set the widgets' ``value`` and call
    ``panel.run_button.click()``; the runs are in :attr:`results`.
    """

    def __init__(self, task: str = "digits", *, workers: int = 8, steps: int = 300, alpha: float = 0.1,
                 period: int = 8, network: str = "wan", lr: float = 0.05, momentum: float = 0.9,
                 batch_size: int = 32, seed: int = 0, min_interval_s: float = 0.5) -> None:
        if task not in TASKS:
            raise ValueError(f"SpeculativePanel(task={task!r}): expected one of {sorted(TASKS)}")
        self.task_name, self.seed = task, seed
        self.train_config = TrainConfig(lr=lr, momentum=momentum, batch_size=batch_size, steps=steps, seed=seed)
        defaults = sp.baselines.speculative()
        slider = dict(continuous_update=False, style={"description_width": "initial"})
        self.workers = w.IntSlider(value=workers, min=2, max=max(32, workers), description="workers K", **slider)
        self.alpha = w.FloatLogSlider(value=alpha, base=10, min=-2, max=2, step=0.1,
                                      description="skew (Dirichlet α)", **slider)
        self.reconcile = w.FloatSlider(value=defaults.reconcile_threshold, min=0.0, max=5.0, step=0.1,
                                       description="reconcile (× usual spread)", **slider)
        self.hurt = w.FloatSlider(value=defaults.manager.hurt, min=1.0, max=10.0, step=0.1,
                                  description="drift that hurts", **slider)
        self.loosen = w.FloatSlider(value=defaults.manager.loosen, min=0.01, max=0.99, step=0.01,
                                    description="drift to loosen", **slider)
        self.period = w.IntSlider(value=period, min=1, max=max(128, period), description="sync period",
                                  **slider)
        self.steps = w.IntSlider(value=steps, min=10, max=max(2000, steps), step=10, description="steps",
                                 **slider)
        self.network = w.Dropdown(options=list(sp.PROFILES), value=network, description="network")
        self.run_button = w.Button(description="Run", button_style="primary", icon="play")
        self.status = w.HTML("<i>no run yet</i>")
        self.table = w.HTML("")
        self.out = w.Output()

        self.heatmap = LiveHeatmap(title="region states of ours (live)", min_interval_s=min_interval_s,
                                   width=620, height=220)
        self.loss_plot = LivePlot(list(METHODS), title="training loss (mean over workers)", y_label="loss",
                                  y_log=True, rollover=100_000, min_interval_s=min_interval_s,
                                  width=620, height=260)
        self.rollback_source = ColumnDataSource({"step": [], "loss": [], "rollbacks": []})
        marks = self.loss_plot.figure.scatter("step", "loss", source=self.rollback_source, marker="x",
                                              size=9, color="red")
        key_entry(self.loss_plot.figure, "rollback", marker="x", size=9, color="red")
        house_style(self.loss_plot.figure)  # the new entry joins the legend outside the data
        self.loss_plot.figure.add_tools(HoverTool(renderers=[marks], tooltips=[
            ("step", "@step"), ("workers rolled back", "@rollbacks")]))
        self.test_plot = LivePlot(list(METHODS), title="test loss of the averaged model", y_label="test loss",
                                  rollover=100_000, min_interval_s=0, width=620, height=260)
        self.bytes_source = ColumnDataSource({"method": [], "payload": [], "control": [], "payload_shown": [],
                                              "control_shown": []})
        # payload and control side by side on a log axis: control bytes are thousands of times fewer
        self.bytes_fig = figure(x_range=list(METHODS), title="bytes sent per worker", width=330, height=260,
                                y_axis_label="MB (log)", y_axis_type="log", y_range=Range1d(1e-3, 1.0),
                                tools="save")
        for kind, shift, color in (("payload", -0.18, Category10_10[5]), ("control", 0.18, Category10_10[6])):
            self.bytes_fig.vbar(x=dodge("method", shift, range=self.bytes_fig.x_range), top=f"{kind}_shown",
                                bottom=1e-9, width=0.34, color=color, source=self.bytes_source, legend_label=kind)
        self.bytes_fig.add_tools(HoverTool(tooltips=[("", "@method"), ("payload MB", "@payload{0,0.000}"),
                                                     ("control MB", "@control{0,0.000000}")]))
        house_style(self.bytes_fig, legend="below")
        self.time_source = ColumnDataSource({"method": [], "seconds": [], "to_target": [], "color": []})
        self.time_fig = figure(x_range=list(METHODS), title="simulated time", width=300, height=260,
                               y_axis_label="simulated time (s)", tools="save")
        house_style(self.time_fig)
        self.time_fig.vbar(x="method", top="seconds", width=0.7, color="color", source=self.time_source)
        self.time_fig.add_tools(HoverTool(tooltips=[("", "@method"), ("whole run (s)", "@seconds{0,0.00}"),
                                                    ("to target (s)", "@to_target{0,0.00}")]))
        self.bytes_widget, self.time_widget = BokehModel(self.bytes_fig), BokehModel(self.time_fig)

        self.task: sp.Task | None = None
        self.results: dict[str, sp.RunResult] = {}
        self.runs = 0
        self.network.observe(lambda _: self.replan(), names="value")
        self.run_button.on_click(lambda _: self.run())
        self.widget = panel_layout(
            "Speculative training",
            [self.workers, self.alpha, self.steps, self.period],
            [control_row(self.reconcile, self.hurt, self.loosen),
             control_row(self.network, self.run_button, self.status),
             control_row(self.heatmap.widget, self.loss_plot.widget),
             control_row(self.test_plot.widget, self.bytes_widget, self.time_widget),
             self.table],
            self.out)

    # -- what the controls describe ------------------------------------------------------------
    def make_task(self) -> sp.Task:
        """The task the controls describe: K non-IID shards with Dirichlet(alpha) labels."""
        make = TASKS[self.task_name]
        return make(workers=int(self.workers.value), alpha=float(self.alpha.value), seed=self.seed)

    def configs(self) -> dict[str, sp.SpeculativeConfig]:
        """Ours with the panel's thresholds, period and network plan, and the two anchors at the same period."""
        manager = sp.ManagerConfig(hurt=float(self.hurt.value), loosen=float(self.loosen.value))
        ours = sp.baselines.speculative(manager=manager, reconcile_threshold=float(self.reconcile.value),
                              period=int(self.period.value), network=self.network.value)
        return {"ours": ours, "DDP": sp.baselines.ddp(), "local SGD": sp.baselines.local_sgd(int(self.period.value))}

    def eval_every(self) -> int:
        """Steps between test evaluations: about 30 per run, at least 5 steps apart."""
        return max(5, int(self.steps.value) // 30)

    # -- running --------------------------------------------------------------------------------
    def run(self) -> dict[str, sp.RunResult]:
        """Train ours live, then DDP and local SGD; draw the comparison. Returns :attr:`results`."""
        configs = self.configs()
        self.task = self.make_task()
        train = replace(self.train_config, steps=int(self.steps.value))
        for plot in (self.heatmap, self.loss_plot, self.test_plot):
            plot.clear()
        self.rollback_source.data = {"step": [], "loss": [], "rollbacks": []}
        self.results = {}
        self.run_button.disabled = True
        results: dict[str, sp.RunResult] = {}
        try:
            with self.out:  # the progress bars show in the panel, not in the log
                for name, config in configs.items():
                    self.status.value = (f"training <b>{html.escape(name)}</b> "
                                         f"({html.escape(self.task.name)}, K={self.task.workers})…")
                    live = name == "ours"
                    results[name] = sp.train(self.task, config, train, eval_every=self.eval_every(),
                                             method=name, on_step=self._on_step if live else None,
                                             progress=True)
                    if live:
                        self.heatmap.flush()
                        self.loss_plot.flush()
        except Exception as e:
            self.status.value = f"<b>{html.escape(name)} failed</b>: {html.escape(str(e))}"
            raise
        finally:
            self.run_button.disabled = False
        self.results = results  # all three or none: the comparison needs every run
        self.runs += 1
        self._draw_runs()
        self.redraw_time()
        ours = self.results["ours"]
        self.status.value = (f"done: ours sent <b>{self.bytes_ratio():.1%}</b> of DDP's bytes; "
                             f"rollback rate {ours.rollback_rate():.1%}")
        with self.out:
            print(f"run {self.runs}: {self.task.name} K={self.task.workers} steps={train.steps} "
                  f"period={self.period.value} reconcile={self.reconcile.value:.2f} | final test loss "
                  + ", ".join(f"{k} {r.final_test_loss:.3f}" for k, r in self.results.items()))
        return self.results

    def replan(self) -> None:
        """The network changed: ours plans for it (Global layers only where a per-step all-reduce
        hides behind compute), so ours trains again on the same task with a live heatmap; the
        anchors do not depend on the network and are only re-priced."""
        if not self.results or self.task is None:
            return
        train = replace(self.train_config, steps=int(self.steps.value))
        self.heatmap.clear()
        self.status.value = f"re-planning <b>ours</b> for <b>{html.escape(self.network.value)}</b>…"
        with self.out:
            ours = sp.train(self.task, self.configs()["ours"], train, eval_every=self.eval_every(),
                            method="ours", on_step=self._on_step, progress=True)
        self.heatmap.flush()
        self.results = {"ours": ours} | {k: r for k, r in self.results.items() if k != "ours"}
        self.runs += 1
        self._draw_runs()
        self.redraw_time()
        self.status.value = (f"ours planned for {html.escape(self.network.value)}: "
                             f"{self.bytes_ratio():.1%} of DDP's bytes, states " + ", ".join(
                                 f"{k} {v:.0%}" for k, v in ours.state_shares().items()))

    def _on_step(self, step: int, eng: sp.Engine) -> None:
        """Stream one step of ours: its p per region (host numpy) and its mean training loss."""
        if step == 0:
            self.heatmap.regions = eng.manager.names
        self.heatmap.push(step, eng.p, eng.manager.state)
        # a device tensor: LivePlot copies its buffer to the host once per redraw
        self.loss_plot.push(step, ours=eng.last["loss"].mean())

    def _draw_runs(self) -> None:
        """Every step's training loss, the test losses, rollback markers and bytes of the runs."""
        self.loss_plot.clear()
        steps = self.results["ours"].history["step"].to_numpy()
        losses = {k: r.history["loss"].to_numpy() for k, r in self.results.items()}
        for i, step in enumerate(steps):
            self.loss_plot.push(int(step), **{k: float(v[i]) if i < len(v) else math.nan
                                              for k, v in losses.items()})
        self.loss_plot.flush()
        self.test_plot.clear()
        evals = {k: r.evals.set_index("step")["test_loss"] for k, r in self.results.items()}
        for step in evals["ours"].index:
            self.test_plot.push(int(step), **{k: float(e.get(step, math.nan)) for k, e in evals.items()})
        self.test_plot.flush()
        h = self.results["ours"].history
        rolled = h[h["rollbacks"] > 0]
        self.rollback_source.data = {"step": rolled["step"].tolist(), "loss": rolled["loss"].tolist(),
                                     "rollbacks": rolled["rollbacks"].tolist()}
        sent = {k: r.bytes_per_worker() for k, r in self.results.items()}
        payload = [s["payload"] / 1e6 for s in sent.values()]
        control = [s["control"] / 1e6 for s in sent.values()]
        shown = [v for v in payload + control if v > 0]
        # a log axis has no 0: a method that sent nothing of a kind gets no bar
        self.bytes_source.data = {"method": list(sent), "payload": payload, "control": control,
                                  "payload_shown": [v if v > 0 else math.nan for v in payload],
                                  "control_shown": [v if v > 0 else math.nan for v in control]}
        if shown:
            self.bytes_fig.y_range.update(start=min(shown) / 4, end=max(shown) * 4)

    # -- network profile ---------------------------------------------------------------------
    def target(self) -> float:
        """The test loss to reach: 1.05 x DDP's final test loss."""
        return TARGET_RATIO * self.results["DDP"].final_test_loss

    def summary(self, network: str | None = None) -> pd.DataFrame:
        """One row per run: final test loss, bytes per worker, simulated time on ``network``
        (default: the dropdown's), time to :meth:`target` and rollback rate.

        Raises:
            RuntimeError: nothing has run yet.
        """
        if not self.results:
            raise RuntimeError("SpeculativePanel.summary: press Run first")
        net = network or self.network.value
        target = self.target()
        rows = {}
        for name, r in sp.with_shared_compute(self.results).items():
            sent = r.bytes_per_worker()
            rows[name] = {"final test loss": r.final_test_loss,
                          "test accuracy": float(r.evals["test_accuracy"].iloc[-1]),  # NaN: regression
                          "payload bytes": sent["payload"], "control bytes": sent["control"],
                          "bytes vs DDP": sent["total"] / self.results["DDP"].bytes_per_worker()["total"],
                          f"simulated s ({net})": float(r.simulated_time(net)[-1]),
                          "s to target": r.time_to(target, net), "rollback rate": r.rollback_rate()}
        return pd.DataFrame(rows).T.rename_axis("method")

    def bytes_ratio(self) -> float:
        """Ours' bytes per worker over DDP's."""
        return self.results["ours"].bytes_per_worker()["total"] / self.results["DDP"].bytes_per_worker()["total"]

    def redraw_time(self) -> None:
        """Re-price the last runs on the chosen network profile (no training)."""
        if not self.results:
            return
        net = self.network.value
        table = self.summary(net)
        to_target = table["s to target"].replace(math.inf, math.nan)
        self.time_source.data = {"method": list(table.index), "seconds": table[f"simulated s ({net})"].tolist(),
                                 "to_target": to_target.tolist(), "color": [COLORS[m] for m in table.index]}
        set_title(self.time_fig, f"simulated time on {net}")
        fmt = {"final test loss": "{:.3f}", "test accuracy": "{:.1%}", "payload bytes": "{:,.0f}",
               "control bytes": "{:,.0f}", "bytes vs DDP": "{:.3f}", f"simulated s ({net})": "{:,.2f}",
               "s to target": "{:,.2f}", "rollback rate": "{:.1%}"}
        shown = table.copy().astype(object)
        for col, f in fmt.items():
            shown[col] = [f.format(v) if math.isfinite(v) else "—" if math.isnan(v) else "never"
                          for v in table[col]]
        self.table.value = (f"<b>target</b>: test loss ≤ {self.target():.3f} ({TARGET_RATIO}× DDP's final); "
                            f"one compute time per step for every run<br>" + shown.to_html(border=0))

