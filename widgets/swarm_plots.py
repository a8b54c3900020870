"""Live swarm, shared pieces: what the dashboard can show, its colours, and the static figures a
notebook draws after a run (the optimiser's lineage, best accuracy against member-epochs)."""
from __future__ import annotations

import math
from collections.abc import Sequence

import numpy as np
import pandas as pd
from bokeh.models import ColumnDataSource, HoverTool
from bokeh.palettes import Category10_10, Viridis256
from bokeh.plotting import figure

from .plots import house_style

METRICS = ("val_acc", "val_loss", "loss_mean", "fitness", "lr", "compute_s", "cpu_percent", "rss_bytes", "steps")
TRAJECTORY_STATS = ("norm", "mean", "std")  # columns of the bus's ``stats`` stream a trajectory can show
GOALS = ("accuracy", "loss", "efficiency", "generalisation")
PALETTE = Viridis256
NAN_COLOR = "#cfcfcf"  # quarantined or not yet measured
ALARM_COLOR = "#d62728"
ALARM_ROUNDS = 3  # rounds a member's alarm ring stays on the graph (the heatmap keeps every alarm)
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
    fig.add_tools(HoverTool(renderers=[dots], tooltips=[("", "@kind of member @member in round @round"),
                                                         ("parents", "@parents"), ("before", "@before"),
                                                         ("after", "@after"), ("", "@detail")]))
    return house_style(fig)
