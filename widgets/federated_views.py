"""The federated panel's three views, one class each: the adaptive partition against k-means as the
granularity moves, each client's error under FedAvg and a meta-learner after a few adaptation
steps, and a drifting stream whose alarms rebuild the partition."""
from __future__ import annotations

import html
from dataclasses import replace

import ipywidgets as w
import numpy as np
import pandas as pd
import torch
from bokeh.core.property.vectorization import value
from bokeh.layouts import column, row
from bokeh.models import ColumnDataSource, FactorRange, HoverTool, LinearAxis, Range1d, Span
from bokeh.palettes import Category10_10
from bokeh.plotting import figure
from bokeh.transform import dodge
from jupyter_bokeh.widgets import BokehModel

from adaptive_kit import federated as fed
from adaptive_kit.federated import (
    DataPartition,
    adaptive_partition,
    data,
    drift,
    largest_over_mean,
    n_parts,
    profile,
)

from .common import LivePlot, control_row
from .federated_plots import (
    ALONE_COLOR,
    BASELINE,
    BASELINE_COLOR,
    CHOICES,
    DETECTORS,
    KMEANS_COLOR,
    META_COLOR,
    NAMES,
    OURS_COLOR,
    STEPS,
    part_colors,
)
from .plots import house_style, set_title


def _best_round(name: str, best: int) -> str:
    return (f"{name} kept its starting model (no round improved validation)" if best < 0
            else f"{name} best at round {best + 1}")


def _failed(what: str, e: Exception) -> str:
    return f"<b>{what} failed</b>: {html.escape(f'{type(e).__name__}: {e}')}"


class PartitionTab:
    """Our partition beside k-means with as many parts, at the granularity and minimum size the
    controls ask for (the data profile is computed once), with the rows per part of each."""

    def __init__(self, dataset: data.OrdinalData, shown: torch.Tensor, granularity: float, min_size: int,
                 max_parts: int, seed: int, status: w.HTML) -> None:
        self.data, self.shown, self.max_parts, self.seed, self.status = dataset, shown, max_parts, seed, status
        n, d = self.data.x.shape
        slider = dict(continuous_update=False, style={"description_width": "initial"})
        features = [(f, i) for i, f in enumerate(self.data.features)]
        self.x_feature = w.Dropdown(options=features, value=0, description="x", layout=w.Layout(width="180px"))
        self.y_feature = w.Dropdown(options=features, value=min(1, d - 1), description="y",
                                    layout=w.Layout(width="180px"))
        self.granularity = w.FloatSlider(value=granularity, min=0.0, max=1.0, step=0.05, description="granularity",
                                         readout_format=".2f", **slider)
        self.min_size = w.BoundedIntText(value=min_size, min=1, max=n, description="min size",
                                         style={"description_width": "initial"}, layout=w.Layout(width="160px"))
        self.balance = w.HTML("")
        self.points_source = ColumnDataSource({"x": [], "y": [], "label": [], "part": [], "color": [],
                                               "kmeans": [], "kmeans_color": []})
        tools = "pan,wheel_zoom,box_zoom,reset,save"
        self.ours_fig = figure(title="adaptive partition", width=370, height=360, tools=tools)
        self.kmeans_fig = figure(title="k-means", width=370, height=360, tools=tools,
                                 x_range=self.ours_fig.x_range, y_range=self.ours_fig.y_range)
        for fig, color, part in ((self.ours_fig, "color", "part"), (self.kmeans_fig, "kmeans_color", "kmeans")):
            fig.scatter("x", "y", color=color, source=self.points_source, size=4, alpha=0.6)
            fig.add_tools(HoverTool(tooltips=[("part", f"@{part}"), ("class", "@label")]))
        self.sizes_source = ColumnDataSource({"rank": [], "ours": [], "kmeans": []})
        self.sizes_fig = figure(x_range=FactorRange(), title="rows per part", width=400, height=360,
                                x_axis_label="part, largest first", y_axis_label="rows", tools="save")
        self.sizes_fig.vbar(x=dodge("rank", -0.18, range=self.sizes_fig.x_range), top="ours", width=0.34,
                            color=OURS_COLOR, source=self.sizes_source, legend_label="ours")
        self.sizes_fig.vbar(x=dodge("rank", 0.18, range=self.sizes_fig.x_range), top="kmeans", width=0.34,
                            color=KMEANS_COLOR, source=self.sizes_source, legend_label="k-means")
        self.mean_span = Span(location=0, dimension="width", line_dash="dashed", line_color="black")
        self.sizes_fig.add_layout(self.mean_span)
        house_style(self.ours_fig), house_style(self.kmeans_fig), house_style(self.sizes_fig, legend="below")
        self.sizes_fig.xgrid.grid_line_color = None
        # one bokeh document: the scatters share their ranges and source
        self.partition_widget = BokehModel(row(self.ours_fig, self.kmeans_fig, self.sizes_fig))
        self.view = w.VBox([
            control_row(self.granularity, self.min_size, self.x_feature, self.y_feature),
            self.balance, self.partition_widget])
        # the profile (density, importance, clusters) does not depend on the controls: once
        self.profile = profile.profile_data(self.data.x, self.data.y, clusters=min(4, n), k=min(10, n - 1),
                                            seed=self.seed)
        self._parts_cache: dict[tuple[int, int], DataPartition] = {}
        self._kmeans_cache: dict[int, tuple[torch.Tensor, torch.Tensor]] = {}
        self.partition: DataPartition | None = None
        self.kmeans_labels: torch.Tensor | None = None
        self.kmeans_centres: torch.Tensor | None = None
        self.granularity.observe(lambda _: self.repartition(), names="value")
        self.min_size.observe(lambda _: self.repartition(), names="value")
        self.x_feature.observe(lambda _: self.redraw_points(), names="value")
        self.y_feature.observe(lambda _: self.redraw_points(), names="value")

    @property
    def parts(self) -> int:
        """Parts the granularity and minimum size ask for."""
        return n_parts(len(self.data.x), float(self.granularity.value), int(self.min_size.value), self.max_parts)

    def repartition(self) -> DataPartition:
        """Partition at the controls' granularity and minimum size (cached), k-means with as many
        parts; redraw colours and sizes. Returns :attr:`partition`."""
        g, m, parts = float(self.granularity.value), int(self.min_size.value), self.parts
        try:
            if (parts, m) not in self._parts_cache:  # the same parts and min size: the same cuts
                self._parts_cache[parts, m] = adaptive_partition(self.data.x, self.data.y, g, m,
                                                                 max_parts=self.max_parts, profile=self.profile,
                                                                 seed=self.seed)
            if parts not in self._kmeans_cache:
                self._kmeans_cache[parts] = profile.kmeans(self.data.x, parts, seed=self.seed)
        except Exception as e:
            self.status.value = _failed("partition", e)
            raise
        self.partition = self._parts_cache[parts, m]
        self.kmeans_centres, self.kmeans_labels = self._kmeans_cache[parts]
        self.redraw_points()
        self._draw_sizes()
        return self.partition

    def redraw_points(self) -> None:
        """Every shown row at the chosen features, coloured by ours and by k-means (one update)."""
        i, j = int(self.x_feature.value), int(self.y_feature.value)
        rows = self.shown
        x = self.data.x[rows]
        ours, km = self.partition.labels[rows], self.kmeans_labels[rows]
        parts = self.partition.parts
        self.points_source.data = {"x": x[:, i].tolist(), "y": x[:, j].tolist(),
                                   "label": [self.data.levels[c] for c in self.data.y[rows].tolist()],
                                   "part": ours.tolist(), "color": part_colors(ours, parts),
                                   "kmeans": km.tolist(), "kmeans_color": part_colors(km, parts)}
        for fig in (self.ours_fig, self.kmeans_fig):
            fig.xaxis.axis_label, fig.yaxis.axis_label = self.data.features[i], self.data.features[j]

    def _draw_sizes(self) -> None:
        parts = self.partition.parts
        ours = self.partition.sizes().sort(descending=True).values
        km = torch.bincount(self.kmeans_labels, minlength=parts).sort(descending=True).values
        ranks = [str(r) for r in range(1, parts + 1)]
        self.sizes_source.data = {"rank": ranks, "ours": ours.tolist(), "kmeans": km.tolist()}
        self.sizes_fig.x_range.factors = ranks
        self.mean_span.location = len(self.data.x) / parts
        lo, lk = largest_over_mean(self.partition.labels, parts), largest_over_mean(self.kmeans_labels, parts)
        set_title(self.sizes_fig, f"rows in each of the {parts} parts, largest first (dashed: mean); largest ÷ mean: "
                                  f"ours {lo:.2f}, k-means {lk:.2f}")
        set_title(self.ours_fig, f"adaptive partition: {parts} parts (colour: part)")
        set_title(self.kmeans_fig, f"k-means: {parts} clusters (colour: cluster)")
        self.balance.value = (f"granularity {self.granularity.value:.2f}, min size {self.min_size.value}: "
                              f"<b>{parts}</b> parts of {len(self.data.x):,} rows · largest ÷ mean "
                              f"<b>{lo:.2f}</b> (k-means {lk:.2f})")


class PersonalisationTab:
    """**Train**: one client per part of the partition shown, FedAvg and the chosen method (their
    validation loss drawn live per round), then each client's test MAE after 0, 1 or 5 adaptation
    steps, with each client trained alone as the reference."""

    def __init__(self, dataset: data.OrdinalData, partitions: PartitionTab, config: fed.FederatedConfig, seed: int,
                 out: w.Output, method: str, rounds: int, min_interval_s: float) -> None:
        self.data, self.partitions, self.config, self.seed, self.out = dataset, partitions, config, seed, out
        slider = dict(continuous_update=False, style={"description_width": "initial"})
        self.method = w.Dropdown(options=[(NAMES[m], m) for m in CHOICES], value=method, description="method")
        self.rounds = w.IntSlider(value=rounds, min=1, max=max(200, rounds), description="rounds", **slider)
        self.steps = w.ToggleButtons(options=[(f"{s} step{'s' * (s != 1)}", s) for s in STEPS], value=1,
                                     tooltips=["the global model as it is", "after one local step",
                                               "after five local steps"], style={"button_width": "70px"})
        self.train_button = w.Button(description="Train", button_style="primary", icon="play",
                                     tooltip="FedAvg and the chosen method on the partition shown")
        self.progress = w.IntProgress(value=0, min=0, max=2 * rounds, description="progress",
                                      layout=w.Layout(width="260px"))
        self.train_status = w.HTML("<i>press Train</i>")
        self.summary_table = w.HTML("")
        self.val_plot = LivePlot([BASELINE, "meta"], x_name="round",
                                 title="validation loss after one adaptation step", y_label="loss",
                                 rollover=100_000, min_interval_s=min_interval_s, width=520, height=300)
        legend = self.val_plot.figure.legend.items
        legend[0].label, legend[1].label = value(NAMES[BASELINE]), value(NAMES[method])
        self.mae_source = ColumnDataSource(self._empty_mae())
        self.mae_fig = figure(x_range=FactorRange(), title="test MAE per client", width=620, height=300,
                              x_axis_label="client (part)", y_axis_label="MAE (classes)", tools="save")
        for name, offset, color in ((BASELINE, -0.2, BASELINE_COLOR), ("meta", 0.2, META_COLOR)):
            self.mae_fig.vbar(x=dodge("client", offset, range=self.mae_fig.x_range), top=name, width=0.38,
                              color=color, source=self.mae_source, legend_label=NAMES.get(name, name))
        self.mae_fig.scatter("client", "alone", source=self.mae_source, marker="dash", size=24, line_width=3,
                             color=ALONE_COLOR, legend_label="alone")
        self.alone_span = Span(location=0, dimension="width", line_dash="dashed", line_color=ALONE_COLOR,
                               visible=False)
        self.mae_fig.add_layout(self.alone_span)
        house_style(self.mae_fig)
        self.mae_fig.xgrid.grid_line_color = None
        self.mae_fig.add_tools(HoverTool(tooltips=[("client", "@client"), ("train rows", "@rows"),
                                                   ("FedAvg", "@fedavg{0.000}"), ("meta", "@meta{0.000}"),
                                                   ("alone", "@alone{0.000}")]))
        self.mae_widget = BokehModel(self.mae_fig)
        self.view = w.VBox([
            control_row(self.method, self.rounds, self.train_button, self.progress, self.train_status),
            control_row(self.steps),
            control_row(self.mae_widget, self.val_plot.widget),
            self.summary_table])
        self.clients: fed.Clients | None = None
        self.results: dict[str, fed.FederatedResult] = {}
        self.evals: dict[str, dict[int, dict[str, torch.Tensor]]] = {}
        self.alone: dict[int, dict[str, torch.Tensor]] | None = None
        self.train_button.on_click(lambda _: self.train())
        self.steps.observe(lambda _: self.show_steps(), names="value")
        self.rounds.observe(lambda c: setattr(self.progress, "max", 2 * int(c["new"])), names="value")

    @staticmethod
    def _empty_mae() -> dict[str, list]:
        return {"client": [], "rows": [], BASELINE: [], "meta": [], "alone": [],
                **{f"{m}_{s}": [] for m in (BASELINE, "meta") for s in STEPS}}

    def train(self) -> dict[str, fed.FederatedResult]:
        """One client per part of the partition shown; FedAvg, then the chosen method, each for
        ``rounds``; evaluate every client after 0, 1 and 5 steps, and alone. Returns :attr:`results`."""
        method, rounds = self.method.value, int(self.rounds.value)
        self.val_plot.clear()
        self.val_plot.figure.legend.items[1].label = value(NAMES[method])
        set_title(self.val_plot.figure, f"validation loss after one adaptation step: FedAvg vs {NAMES[method]}")
        self.progress.value, self.progress.max = 0, 2 * rounds
        self.train_button.disabled = True
        results: dict[str, fed.FederatedResult] = {}
        name = BASELINE
        try:
            self.clients = fed.make_clients(self.data.x, self.data.y, self.partitions.partition.labels, seed=self.seed,
                                             classes=self.data.classes)
            for name in (BASELINE, method):
                self.train_status.value = f"training <b>{NAMES[name]}</b> on {self.clients.n} clients…"
                series = BASELINE if name == BASELINE else "meta"

                def on_round(r, _model, row, series=series):
                    self.val_plot.push(r, **{series: row["val_loss"]})
                    self.progress.value += 1

                results[name] = fed.train(self.clients, replace(self.config, method=name, rounds=rounds),
                                           on_step=on_round)
            self.val_plot.flush()
            cfg = self.config
            evals = {m: fed.evaluate(r.model, self.clients, STEPS, lr=cfg.local_lr, l2=cfg.l2)
                     for m, r in results.items()}
            alone = fed.evaluate(fed.local_only(self.clients, l2=cfg.l2), self.clients, (0,), l2=cfg.l2)
        except Exception as e:
            self.train_status.value = _failed(NAMES[name], e)
            raise
        finally:
            self.train_button.disabled = False
        self.results, self.evals, self.alone = results, evals, alone  # all or nothing
        self._draw_mae()
        s = self.summary()
        self.train_status.value = (f"done: {self.clients.n} clients; MAE after {self.steps.value} step(s) "
                                   f"FedAvg <b>{s.loc['FedAvg', f'mae_{self.steps.value}']:.3f}</b>, "
                                   f"{NAMES[method]} <b>{s.loc[NAMES[method], f'mae_{self.steps.value}']:.3f}</b>, "
                                   f"alone {s.loc['alone', 'mae_0']:.3f}")
        with self.out:
            print(f"trained FedAvg and {NAMES[method]} for {rounds} rounds on {self.clients.n} clients "
                  f"({'; '.join(_best_round(NAMES[m], results[m].best_round) for m in (BASELINE, method))})")
        return self.results

    def _draw_mae(self) -> None:
        method = self.method_trained
        cols = {"client": [str(int(i)) for i in self.clients.ids], "rows": self.clients.sizes.int().tolist(),
                "alone": self.alone[0]["mae"].tolist()}
        for key, m in ((BASELINE, BASELINE), ("meta", method)):
            cols |= {f"{key}_{s}": self.evals[m][s]["mae"].tolist() for s in STEPS}
        s = int(self.steps.value)
        cols |= {BASELINE: cols[f"{BASELINE}_{s}"], "meta": cols[f"meta_{s}"]}
        self.mae_source.data = cols
        self.mae_fig.x_range.factors = cols["client"]
        self.alone_span.location, self.alone_span.visible = float(np.mean(cols["alone"])), True
        self.mae_fig.legend.items[1].label = value(NAMES[method])
        self._title_mae()
        self.summary_table.value = self.summary().to_html(float_format="{:.3f}".format, border=0)

    def _title_mae(self) -> None:
        s = int(self.steps.value)
        set_title(self.mae_fig, f"test MAE per client after {s} adaptation step{'s' * (s != 1)} "
                                f"(dash, dashed line: trained alone)")

    @property
    def method_trained(self) -> str | None:
        """The meta method of the last :meth:`train` (None before)."""
        return next((m for m in self.results if m != BASELINE), None)

    def show_steps(self) -> None:
        """Show the MAE after the selected number of steps (no training)."""
        data = self.mae_source.data
        if data["client"]:
            s = int(self.steps.value)
            self.mae_source.data = dict(data, **{BASELINE: data[f"{BASELINE}_{s}"], "meta": data[f"meta_{s}"]})
        self._title_mae()

    def summary(self) -> pd.DataFrame:
        """Mean accuracy and MAE after 0, 1 and 5 steps per method of the last run, and alone.

        Raises:
            RuntimeError: nothing trained yet.
        """
        if not self.results:
            raise RuntimeError("FederatedPanel.summary: press Train first")
        rows = {NAMES[m]: fed.summary(ev) for m, ev in self.evals.items()}
        rows["alone"] = fed.summary(self.alone)
        return pd.DataFrame(rows).T.rename_axis("method")


class DriftTab:
    """**Run stream**: follow the stream at the Partition tab's granularity and minimum size; the
    loss per batch with each detector's alarms and the change points, parts and largest share per
    batch, and the newest window coloured by the partition in force at the batch the slider picks."""

    def __init__(self, dataset: data.OrdinalData, stream: data.Stream, partitions: PartitionTab, warmup: int,
                 refit_batches: int, seed: int, out: w.Output) -> None:
        self.data, self.stream, self.partitions, self.out = dataset, stream, partitions, out
        self.warmup, self.refit_batches, self.seed = warmup, refit_batches, seed
        b = len(self.stream.x)
        if not 1 <= self.warmup < b:
            raise ValueError(f"FederatedPanel(warmup={self.warmup!r}): expected 1 <= warmup < {b} (the batches)")
        self.run_stream_button = w.Button(description="Run stream", button_style="primary", icon="play",
                                          tooltip="follow the stream at the Partition tab's granularity and min size")
        self.batch = w.IntSlider(value=self.warmup, min=self.warmup, max=b - 1, description="batch",
                                 style={"description_width": "initial"}, layout=w.Layout(width="420px"))
        self.drift_status = w.HTML("<i>press Run stream</i>")
        tools = "pan,wheel_zoom,box_zoom,reset,save"
        self.loss_source = ColumnDataSource({"batch": [], "loss": [], "error": [], "parts": [], "largest_share": []})
        self.alarm_source = ColumnDataSource({"batch": [], "y": [], "detector": [], "color": [], "marker": []})
        self.rebuild_source = ColumnDataSource({"batch": [], "loss": []})
        self.loss_fig = figure(title="loss per batch", width=620, height=300, x_axis_label="batch",
                               y_axis_label="mean log loss (nats)", tools=tools)
        self.loss_fig.line("batch", "loss", source=self.loss_source, line_width=2, color=Category10_10[0],
                           legend_label="loss")
        self.loss_fig.scatter("batch", "y", source=self.alarm_source, color="color", marker="marker", size=11,
                              legend_field="detector")
        self.loss_fig.scatter("batch", "loss", source=self.rebuild_source, marker="x", size=12, line_width=2,
                              color="black", legend_label="re-partition")
        self.change_spans = [Span(location=c, dimension="height", line_dash="dashed", line_color="red",
                                  line_width=2) for c in self.stream.changes]
        self.cursor = Span(location=self.warmup, dimension="height", line_color="gray", line_alpha=0.6)
        for span in (*self.change_spans, self.cursor):
            self.loss_fig.add_layout(span)
        house_style(self.loss_fig)
        self.loss_fig.add_tools(HoverTool(tooltips=[("batch", "@batch"), ("loss", "@loss{0.000}")]))
        self.parts_fig = figure(title="parts and largest share", width=620, height=240, x_axis_label="batch",
                                y_axis_label="parts", tools=tools, x_range=self.loss_fig.x_range)
        self.parts_fig.step("batch", "parts", source=self.loss_source, mode="after", line_width=2,
                            color=Category10_10[4], legend_label="parts")
        self.parts_fig.extra_y_ranges = {"share": Range1d(0, 1)}
        self.parts_fig.add_layout(LinearAxis(y_range_name="share", axis_label="largest share"), "right")
        self.parts_fig.step("batch", "largest_share", source=self.loss_source, mode="after", line_width=2,
                            color=Category10_10[5], y_range_name="share", legend_label="largest share")
        for c in self.stream.changes:
            self.parts_fig.add_layout(Span(location=c, dimension="height", line_dash="dashed", line_color="red"))
        house_style(self.parts_fig)
        self.window_source = ColumnDataSource({"x": [], "y": [], "part": [], "color": []})
        self.window_fig = figure(title="newest window", width=420, height=360, tools=tools)
        house_style(self.window_fig)
        self.window_fig.scatter("x", "y", color="color", source=self.window_source, size=5, alpha=0.7)
        self.window_fig.add_tools(HoverTool(tooltips=[("part", "@part")]))
        self.stream_widget = BokehModel(column(self.loss_fig, self.parts_fig))  # shared x range and source
        self.window_widget = BokehModel(self.window_fig)
        self.view = w.VBox([
            control_row(self.run_stream_button, self.batch, self.drift_status),
            control_row(self.stream_widget, self.window_widget)])
        self.stream_run: drift.StreamRun | None = None
        self.run_stream_button.on_click(lambda _: self.run_stream())
        self.batch.observe(lambda _: self.show_batch(), names="value")

    def run_stream(self) -> drift.StreamRun:
        """Follow the stream at the Partition tab's granularity and minimum size; draw the losses,
        alarms, re-partitions and the newest window. Returns :attr:`stream_run`."""
        s = self.stream
        self.run_stream_button.disabled = True
        self.drift_status.value = f"following {len(s.x)} batches of {s.x.shape[1]} rows…"
        try:
            with self.out:
                run = drift.follow_stream(s.x, s.y, warmup=self.warmup, refit_batches=self.refit_batches,
                                          granularity=float(self.partitions.granularity.value),
                                          min_size=int(self.partitions.min_size.value), seed=self.seed, progress=True)
        except Exception as e:
            self.drift_status.value = _failed("stream", e)
            raise
        finally:
            self.run_stream_button.disabled = False
        self.stream_run = run
        log = run.log
        self.loss_source.data = {c: log[c].tolist() for c in ("batch", "loss", "error", "parts", "largest_share")}
        top = float(log["loss"].max())
        alarms = [(b, name) for name in DETECTORS for b in run.alarms.get(name, [])]
        rank = {name: i for i, name in enumerate(DETECTORS)}
        self.alarm_source.data = {"batch": [b for b, _ in alarms],
                                  "y": [top * (1.08 + 0.08 * rank[n]) for _, n in alarms],  # a row per detector
                                  "detector": [n for _, n in alarms],
                                  "color": [DETECTORS[n][0] for _, n in alarms],
                                  "marker": [DETECTORS[n][1] for _, n in alarms]}
        redo = log[log["repartitioned"]]
        self.rebuild_source.data = {"batch": redo["batch"].tolist(), "loss": redo["loss"].tolist()}
        title = "loss per batch"
        if s.changes:  # the first alarm of each detector at or after the first change
            first = {n: next((b for b in run.alarms.get(n, []) if b >= s.changes[0]), None) for n in DETECTORS}
            title += (f" (red dashed: change at {', '.join(map(str, s.changes))}; first alarm: "
                      + ", ".join(f"{n} {'none' if b is None else b}" for n, b in first.items()) + ")")
        set_title(self.loss_fig, title)
        self.drift_status.value = (f"{len(run.partitions)} partitions ({len(run.partitions) - 1} rebuilt), "
                                   f"alarms: " + ", ".join(f"{n} {len(v)}" for n, v in run.alarms.items()))
        if self.batch.value == len(s.x) - 1:
            self.show_batch()
        else:
            self.batch.value = len(s.x) - 1  # draws through the observer
        return run

    def in_force(self, batch: int) -> tuple[int, DataPartition]:
        """(batch it was made at, partition) that routed ``batch``: a partition made at batch b
        (after scoring it) routes b + 1 on; the first one routes the warmup's end on.

        Raises:
            RuntimeError: no stream run yet.
        """
        if self.stream_run is None:
            raise RuntimeError("FederatedPanel.in_force: press Run stream first")
        parts = self.stream_run.partitions
        return next(p for i, p in reversed(list(enumerate(parts))) if i == 0 or p[0] < batch)

    def show_batch(self) -> None:
        """Draw the newest window (``refit_batches`` batches up to the slider's) coloured by the
        partition in force at that batch."""
        b = int(self.batch.value)
        self.cursor.location = b
        if self.stream_run is None:
            return
        made, part = self.in_force(b)
        rows = self.stream.x[max(0, b + 1 - self.refit_batches): b + 1].reshape(-1, self.stream.x.shape[-1])
        labels = part.assign(rows)
        d = rows.shape[1]
        i, j = min(int(self.partitions.x_feature.value), d - 1), min(int(self.partitions.y_feature.value), d - 1)
        self.window_source.data = {"x": rows[:, i].tolist(), "y": rows[:, j].tolist(), "part": labels.tolist(),
                                   "color": part_colors(labels, part.parts)}
        names = self.data.features if len(self.data.features) == d else [f"x{k}" for k in range(d)]
        self.window_fig.xaxis.axis_label, self.window_fig.yaxis.axis_label = names[i], names[j]
        set_title(self.window_fig, f"batches {max(0, b + 1 - self.refit_batches)}–{b}: partition made at batch "
                                   f"{made} ({part.parts} parts; colour: part)")
