"""The federated panel's names, colours and static figures: mean MAE per method, every client's MAE
per method after 0, 1 and 5 steps, and a stream's loss with each detector's alarms."""
from __future__ import annotations

from collections.abc import Mapping, Sequence

import torch
from bokeh.layouts import row
from bokeh.models import ColumnDataSource, FactorRange, HoverTool, Span
from bokeh.palettes import Category10_10, Category20_20, Turbo256, linear_palette
from bokeh.plotting import figure

from adaptive_kit.federated import METHODS, drift

from .plots import house_style

STEPS = (0, 1, 5)  # adaptation steps after which each client is evaluated
BASELINE = "fedavg"
CHOICES = tuple(m for m in METHODS if m != BASELINE)  # what the method dropdown offers
NAMES = {"fedavg": "FedAvg", "fedprox": "FedProx", "oneshot": "one-shot", "reptile": "Reptile",
         "fomaml": "Per-FedAvg", "metasgd": "Meta-SGD", "metacurv": "Meta-Curvature"}
DETECTORS = {"page_hinkley": (Category10_10[3], "triangle"), "adwin": (Category10_10[1], "square"),
             "ks": (Category10_10[2], "diamond")}  # colour and marker of each detector's alarms
OURS_COLOR, KMEANS_COLOR, BASELINE_COLOR, META_COLOR, ALONE_COLOR = (
    Category10_10[0], Category10_10[7], Category10_10[7], Category10_10[0], Category10_10[3])


def part_colors(labels: Sequence[int] | torch.Tensor, parts: int) -> list[str]:
    """One colour per row from its part: Category10 up to 10 parts, Category20 up to 20, Turbo beyond."""
    palette = (Category10_10 if parts <= 10 else Category20_20 if parts <= 20
               else linear_palette(Turbo256, parts))
    labels = labels.tolist() if isinstance(labels, torch.Tensor) else list(labels)
    return [palette[int(p) % len(palette)] for p in labels]


def method_mae_figure(summaries: Mapping[str, Mapping[str, float]], alone: float | None = None, *,
                      steps: Sequence[int] = STEPS, title: str = "mean client MAE after adaptation steps",
                      width: int = 760, height: int = 300):
    """Grouped bars of mean MAE per method (keys of ``summaries``, each a
    :func:`~adaptive_kit.federated.summary`) after each number of ``steps``; a dashed line at
    ``alone`` (clients trained alone)."""
    methods = list(summaries)
    x = [(NAMES.get(m, m), f"{s} steps") for m in methods for s in steps]
    colors = [Category10_10[i % 10] for _ in methods for i in range(len(steps))]
    src = ColumnDataSource({"x": x, "mae": [summaries[m][f"mae_{s}"] for m in methods for s in steps],
                            "color": colors})
    fig = figure(x_range=FactorRange(*x), title=title, width=width, height=height, y_axis_label="MAE (classes)",
                 tools="save")
    fig.vbar(x="x", top="mae", width=0.8, color="color", source=src)
    fig.xaxis.major_label_orientation = 0.9
    fig.xgrid.grid_line_color = None
    if alone is not None:
        fig.add_layout(Span(location=alone, dimension="width", line_dash="dashed", line_color=ALONE_COLOR,
                            line_width=2))
        fig.title.text += f" (dashed: each client alone, {alone:.3f})"
    fig.add_tools(HoverTool(tooltips=[("", "@x"), ("MAE", "@mae{0.000}")]))
    return house_style(fig)


def per_client_mae_figure(evals: Mapping[str, Mapping[int, Mapping[str, torch.Tensor]]], alone: torch.Tensor, *,
                          ours: str, steps: Sequence[int] = STEPS, width: int = 330, height: int = 280):
    """One small figure per number of ``steps``: every client's test MAE under each method of
    ``evals`` (as :func:`~adaptive_kit.federated.evaluate` returns), ``ours`` drawn as a red line
    over the others' dots, and each client alone (``alone``, per-client MAE) as black dashes."""
    figs = []
    clients = list(range(len(alone)))
    for i, s in enumerate(steps):
        last = i == len(steps) - 1
        fig = figure(title=f"after {s} step{'s' * (s != 1)}", width=width + (170 if last else 0), height=height,
                     x_axis_label="client", y_axis_label="test MAE (classes)" if i == 0 else "",
                     tools="save,reset,box_zoom")
        for j, (name, ev) in enumerate(m for m in evals.items() if m[0] != ours):
            fig.scatter(clients, ev[s]["mae"].tolist(), size=7, alpha=0.7, color=Category10_10[j % 10],
                        legend_label=NAMES.get(name, name))
        fig.line(clients, evals[ours][s]["mae"].tolist(), color="red", line_width=3, legend_label=ours)
        fig.scatter(clients, evals[ours][s]["mae"].tolist(), color="red", size=9)
        fig.scatter(clients, alone.tolist(), marker="dash", size=16, line_width=3, color="black", legend_label="alone")
        figs.append(house_style(fig, legend="right" if last else "none"))
    return row(*figs)


def alarms_figure(run: drift.StreamRun, changes: Sequence[int], *, title: str = "loss per batch and alarms",
                  width: int = 760, height: int = 300):
    """The mean loss per batch of ``run`` (:func:`~adaptive_kit.federated.drift.follow_stream`), a
    row of markers above it per detector at the batches it fired on, and the true ``changes`` as
    red dashed lines."""
    fig = figure(title=title, width=width, height=height, x_axis_label="batch", y_axis_label="mean log loss (nats)",
                 tools="save,reset,box_zoom")
    fig.line(run.log["batch"].tolist(), run.log["loss"].tolist(), line_width=2, color=Category10_10[0],
             legend_label="loss")
    top, spread = float(run.log["loss"].max()), float(run.log["loss"].max() - run.log["loss"].min())
    for k, (name, batches) in enumerate(run.alarms.items()):
        fig.scatter(batches, [top + spread * (0.1 + 0.1 * k)] * len(batches), size=12, marker="triangle",
                    color=Category10_10[(k + 1) % 10], legend_label=f"{name} ({len(batches)})")
    for c in changes:
        fig.add_layout(Span(location=c, dimension="height", line_dash="dashed", line_color="red", line_width=2))
    return house_style(fig)
