"""The live swarm's other views, one class each: the members x rounds heatmap, the weight
trajectories of the selected members, and compute against accuracy with the steps allotted."""
from __future__ import annotations

import math

import numpy as np
import pandas as pd
from bokeh.models import ColorBar, ColumnDataSource, HoverTool, LinearColorMapper
from bokeh.palettes import Category10_10
from bokeh.plotting import figure
from bokeh.transform import transform

from .plots import house_style, set_title
from .swarm_plots import ALARM_COLOR, METRICS, NAN_COLOR, layer_dash


def member_ticks(n: int) -> list[int]:
    """Member numbers to write on an axis: every one up to 32, else about 16 of them."""
    return list(range(n)) if n <= 32 else list(range(0, n, max(1, n // 16)))


class Heatmap:
    """Members (y) x rounds (x), coloured by the metric shown (the colour bar on the right), alarm
    cells outlined red. ``source`` is named ``swarm_heat``: its ``time`` column (when each report was
    made, seconds since the epoch) lets a browser measure the age of what it shows."""

    def __init__(self, n: int, mapper: LinearColorMapper, metric: str, *, width: int = 600, height: int = 440) -> None:
        self.source = ColumnDataSource({"member": [], "round": [], **{m: [] for m in METRICS},
                                        "status": [], "arch": [], "time": []}, name="swarm_heat")
        self.alarm_source = ColumnDataSource({"member": [], "round": [], "detector": [], "evidence": []})
        fig = figure(title="", width=width, height=height, tools="xpan,xwheel_zoom,reset,save",
                     x_axis_label="round", y_axis_label="member", y_range=(n - 0.5, -0.5))
        self.renderer = fig.rect("round", "member", width=1, height=1, source=self.source,
                                 fill_color=transform(metric, mapper), line_color=None)
        fig.rect("round", "member", width=0.92, height=0.92, source=self.alarm_source, fill_alpha=0,
                 line_color=ALARM_COLOR, line_width=2)
        fig.grid.visible = False
        fig.yaxis.ticker = member_ticks(n)
        self.hover = HoverTool(renderers=[self.renderer])
        fig.add_tools(self.hover)
        self.color_bar = ColorBar(color_mapper=mapper, width=10, title=metric)
        fig.add_layout(self.color_bar, "right")
        self.figure = house_style(fig)

    def show_metric(self, metric: str, mapper: LinearColorMapper) -> None:
        self.renderer.glyph.fill_color = transform(metric, mapper)
        set_title(self.figure, f"{metric} per member and round (red outline: an alarm)")
        self.color_bar.title = metric
        fmt = "{0,0}" if metric in ("rss_bytes", "steps") else "{0.0000}"
        self.hover.tooltips = [("member", "@member (@arch)"), ("round", "@round"), (metric, f"@{{{metric}}}{fmt}"),
                               ("status", "@status")]


class Trajectories:
    """The chosen weight statistic per layer of the selected members against their step: one
    colour per member, one dash per layer (the key under the plot says which)."""

    def __init__(self, *, width: int = 460, height: int = 300) -> None:
        self.source = ColumnDataSource({"member": [], "layer": [], "xs": [], "ys": [], "color": [], "dash": []})
        self.points = ColumnDataSource({"member": [], "layer": [], "step": [], "value": [], "color": []})
        fig = figure(title="weights of the selected members: tap a node", width=width, height=height,
                     x_axis_label="member's step", tools="pan,wheel_zoom,box_zoom,reset,save")
        fig.multi_line("xs", "ys", source=self.source, line_color="color", line_dash="dash", line_width=2)
        points = fig.scatter("step", "value", source=self.points, color="color", size=4)
        fig.add_tools(HoverTool(renderers=[points], tooltips=[("", "member @member, layer @layer"),
                                                              ("step", "@step"), ("value", "@value")]))
        for layer in ("out", "h0", "h1"):  # the dash key: an invisible line per layer kind (NaN draws nothing)
            fig.line([math.nan], [math.nan], line_dash=layer_dash(layer), color="#555555", line_width=2,
                     legend_label=layer)
        self.figure = house_style(fig, legend="below")
        self.series: dict[tuple[int, str], tuple[list[float], list[float]]] = {}

    @staticmethod
    def _points(rows: pd.DataFrame, stat: str) -> dict[str, list]:
        return {"member": rows["rank"].astype(int).tolist(), "layer": rows["layer"].astype(str).tolist(),
                "step": rows["step"].astype(float).tolist(), "value": rows[stat].astype(float).tolist(),
                "color": [Category10_10[int(m) % 10] for m in rows["rank"]]}

    def rebuild(self, rows: pd.DataFrame, stat: str, selected: list[int]) -> None:
        """Every received row of the selected members (``rows``), the statistic ``stat``."""
        self.series = {}
        for (m, layer), g in rows.groupby(["rank", "layer"], sort=True):
            self.series[int(m), str(layer)] = (g["step"].astype(float).tolist(), g[stat].astype(float).tolist())
        keys = list(self.series)
        self.source.data = {"member": [m for m, _ in keys], "layer": [la for _, la in keys],
                            "xs": [self.series[k][0] for k in keys], "ys": [self.series[k][1] for k in keys],
                            "color": [Category10_10[m % 10] for m, _ in keys],
                            "dash": [layer_dash(la) for _, la in keys]}
        self.points.data = self._points(rows, stat)
        who = ", ".join(map(str, selected)) or "none: tap a node"
        set_title(self.figure, f"weight {stat} per layer of member{'s' if len(selected) > 1 else ''} {who}")
        self.figure.yaxis.axis_label = f"weight {stat}"

    def stream(self, rows: pd.DataFrame, stat: str, rollover: int) -> None:
        """New rows of the selected members: patch the lines they extend, stream new lines and points."""
        if rows.empty:
            return
        patches, added = [], {"member": [], "layer": [], "xs": [], "ys": [], "color": [], "dash": []}
        index = {k: i for i, k in enumerate(self.series)}
        for (m, layer), g in rows.groupby(["rank", "layer"], sort=True):
            key = (int(m), str(layer))
            xs, ys = self.series.setdefault(key, ([], []))
            xs.extend(g["step"].astype(float).tolist())
            ys.extend(g[stat].astype(float).tolist())
            if key in index:
                patches.append((index[key], key))
            else:
                for col, v in (("member", key[0]), ("layer", key[1]), ("xs", list(xs)), ("ys", list(ys)),
                               ("color", Category10_10[key[0] % 10]), ("dash", layer_dash(key[1]))):
                    added[col].append(v)
        if patches:
            self.source.patch({"xs": [(i, list(self.series[k][0])) for i, k in patches],
                               "ys": [(i, list(self.series[k][1])) for i, k in patches]})
        if added["member"]:
            self.source.stream(added)
        self.points.stream(self._points(rows, stat), rollover=rollover)


class Resources:
    """Cumulative compute against validation accuracy (size: parameters), and the steps allotted
    to each member next round (bars) with what it was granted last round (black dash)."""

    def __init__(self, n: int, *, width: int = 380, height: int = 300) -> None:
        self.n = n
        self.source = ColumnDataSource(self._empty())
        self.fig = figure(title="compute against accuracy (size: parameters)", width=width, height=height,
                          x_axis_label="compute (s, per member slot, cumulative)", y_axis_label="val acc",
                          tools="pan,wheel_zoom,box_zoom,reset,save")
        dots = self.fig.scatter("compute", "val_acc", size="psize", fill_color="color", line_color="line_color",
                                line_width="line_width", source=self.source, fill_alpha=0.8)
        self.fig.x_range.range_padding = self.fig.y_range.range_padding = 0.3  # big dots stay inside
        self.fig.add_tools(HoverTool(renderers=[dots], tooltips=[
            ("member", "@member (@arch)"), ("parameters", "@n_params"), ("compute", "@compute{0.00} s"),
            ("val acc", "@val_acc{0.000}"), ("val acc per compute-s", "@per_s{0.000}")]))
        house_style(self.fig)
        self.steps_fig = figure(title="steps allotted next round", width=width, height=height,
                                x_axis_label="member", y_axis_label="steps", tools="save")
        bars = self.steps_fig.vbar(x="member", top="steps_next", width=0.7, source=self.source,
                                   fill_color="color", line_color="line_color", legend_label="next round")
        self.steps_fig.scatter("member", "steps_last", source=self.source, marker="dash", size=14 if n <= 32 else 5,
                               line_width=2 if n <= 32 else 1, color="#000000", legend_label="granted last round")
        self.steps_fig.y_range.start = 0
        self.steps_fig.y_range.range_padding = 0.25  # the last-round dashes stay clear of the top
        self.steps_fig.add_tools(HoverTool(renderers=[bars], tooltips=[
            ("member", "@member"), ("next", "@steps_next"), ("last", "@steps_last"), ("fitness", "@fitness{0.000}")]))
        house_style(self.steps_fig, legend="below")

    def _empty(self) -> dict[str, list]:
        n = self.n
        return {"member": list(range(n)), "compute": [0.0] * n, "val_acc": [math.nan] * n, "per_s": [math.nan] * n,
                "n_params": [0] * n, "psize": [8.0] * n, "arch": [""] * n, "steps_next": [0] * n,
                "steps_last": [0] * n, "fitness": [math.nan] * n, "color": [NAN_COLOR] * n,
                "line_color": ["#333333"] * n, "line_width": [1.0] * n}

    def draw(self, table: pd.DataFrame, compute: np.ndarray, acc: np.ndarray, n_params: np.ndarray,
             steps_last: np.ndarray, colors: list[str], outline: tuple[list[str], list[float]]) -> None:
        root = np.sqrt(np.nan_to_num(n_params, nan=0.0))
        top = root.max() if root.size and root.max() > 0 else 1.0
        with np.errstate(divide="ignore", invalid="ignore"):
            per_s = np.where(compute > 0, acc / compute, math.nan)
        big = 20 if self.n <= 32 else 10
        cols = {"compute": compute.tolist(), "val_acc": acc.tolist(), "per_s": per_s.tolist(),
                "n_params": np.nan_to_num(n_params).astype(int).tolist(), "psize": (5 + big * root / top).tolist(),
                "arch": table["arch"].tolist(), "steps_next": table["steps_next"].astype(int).tolist(),
                "steps_last": np.nan_to_num(steps_last).astype(int).tolist(),
                "fitness": table["fitness"].astype(float).tolist(), "color": colors, "line_color": outline[0],
                "line_width": outline[1]}
        self.source.patch({k: [(slice(0, self.n), vals)] for k, vals in cols.items()})

    def title_steps(self, rule: str, cpu: float, rss_mib: float) -> None:
        set_title(self.steps_fig, f"steps next round ({rule}) · CPU {cpu:.0f}%, RSS {rss_mib:.0f} MiB")
