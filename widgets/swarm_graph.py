"""The swarm as a sparse similarity graph: each member joined to its few most similar members,
laid out so that clusters separate, labels on hover, alarms and the selected members marked."""
from __future__ import annotations

import math
from collections.abc import Sequence

import networkx as nx
import numpy as np
import pandas as pd
from bokeh.models import ColumnDataSource, HoverTool, Scatter, TapTool
from bokeh.plotting import figure

from .plots import colour_key, house_style, set_title
from .swarm_plots import ALARM_COLOR, EDGE_COLOR, NAN_COLOR

RELAYOUT_SHARE = 0.5  # lay out again once this share of the edges changed since the last layout


def sparse_edges(similarity: np.ndarray, threshold: float, neighbours: int) -> frozenset[tuple[int, int]]:
    """Pairs ``(a, b)``, ``a < b``, where ``b`` is one of ``a``'s ``neighbours`` most similar members
    (or ``a`` one of ``b``'s) and their similarity is at least ``threshold``; ties go to the lower
    index. A member with no such neighbour stays alone, so the graph has at most ``n x neighbours``
    edges whatever the swarm's size.

    Raises:
        ValueError: ``neighbours < 1`` or a similarity matrix that is not square.
    """
    s = np.asarray(similarity, dtype=float)
    if s.ndim != 2 or s.shape[0] != s.shape[1]:
        raise ValueError(f"sparse_edges: similarity of shape {s.shape} is not square")
    if isinstance(neighbours, bool) or not isinstance(neighbours, int) or neighbours < 1:
        raise ValueError(f"sparse_edges(neighbours={neighbours!r}): expected an int >= 1")
    n = s.shape[0]
    if n < 2:
        return frozenset()
    masked = s.copy()
    np.fill_diagonal(masked, -np.inf)
    k = min(neighbours, n - 1)
    # a stable sort on -similarity: the most similar first, the lower index first among equals
    order = np.argsort(-masked, axis=1, kind="stable")[:, :k]
    edges = set()
    for a in range(n):
        for b in order[a].tolist():
            if masked[a, b] >= threshold:
                edges.add((min(a, b), max(a, b)))
    return frozenset(edges)


def node_sizes(n: int) -> tuple[float, float]:
    """(smallest, largest) node size in px for a swarm of ``n``: smaller nodes for larger swarms."""
    shrink = min(1.0, math.sqrt(32 / max(n, 1)))
    return max(5.0, 9 * shrink), max(9.0, 22 * shrink)


class SwarmGraph:
    """Members as nodes (size and colour: the metric shown, through the panel's colour ``mapper``),
    edges to each member's ``neighbours`` most similar members at similarity >= the threshold
    (:func:`sparse_edges`), a spring layout recomputed only when the edges change (from the last
    positions, so nodes do not jump). Hover shows a member; tap (shift-tap) selects. Members with an
    alarm get a red ring, quarantined ones are grey, the selected ones a black ring and their number.

    Attributes:
        figure, node_source, edge_source, node_renderer, node_hover; similarity (N, N), edges,
        graph (networkx), positions (member -> (2,) array), layouts (how many layouts were computed).
    """

    def __init__(self, swarm, *, neighbours: int = 3, seed: int = 0, width: int = 440, height: int = 440) -> None:
        if isinstance(neighbours, bool) or not isinstance(neighbours, int) or neighbours < 1:
            raise ValueError(f"SwarmGraph(neighbours={neighbours!r}): expected an int >= 1")
        self.swarm, self.neighbours, self.seed = swarm, neighbours, seed
        self.n = n = len(swarm.members)
        self.size_range = node_sizes(n)
        self.similarity = np.ones((n, n))
        self.edges: frozenset[tuple[int, int]] | None = None
        self.graph = nx.Graph()
        self.positions: dict[int, np.ndarray] = {}
        self.layouts = 0
        self._specs: list | None = None
        self._arch_cache: dict[tuple, float] = {}
        self._drift: set[tuple[int, int]] = set()  # edges changed since the last layout
        self._changed: set[int] = set()  # members whose spec changed at the last update
        self.node_source = ColumnDataSource(self._node_data())
        self.edge_source = ColumnDataSource({"x0": [], "y0": [], "x1": [], "y1": [], "a": [], "b": [],
                                             "similarity": [], "alpha": []})
        fig = figure(title="members (edges: similar specs)", width=width, height=height,
                     tools="pan,wheel_zoom,reset,save", x_range=(-1.15, 1.15), y_range=(-1.15, 1.15))
        fig.axis.visible = False
        fig.grid.visible = False
        fig.segment("x0", "y0", "x1", "y1", source=self.edge_source, line_color=EDGE_COLOR, line_alpha="alpha",
                    line_width=1.2)
        self.node_renderer = fig.scatter("x", "y", size="size", fill_color="color", line_color="line_color",
                                         line_width="line_width", source=self.node_source)
        self.node_renderer.selection_glyph = Scatter(size="size", fill_color="color", line_color="#000000",
                                                     line_width=3.5)
        self.node_renderer.nonselection_glyph = Scatter(size="size", fill_color="color", fill_alpha=0.35,
                                                        line_color="line_color", line_width="line_width",
                                                        line_alpha=0.5)
        # numbers only on the selected members: every other member is named on hover
        fig.text("x", "y", text="label", source=self.node_source, text_align="left", text_baseline="bottom",
                 x_offset=6, y_offset=-4, text_font_size="9pt", text_font_style="bold", text_color="#000000")
        self.node_hover = HoverTool(renderers=[self.node_renderer])
        fig.add_tools(self.node_hover, TapTool(renderers=[self.node_renderer]))
        colour_key(fig, {"alarm, last 3 rounds (red ring)": ALARM_COLOR, "quarantined": NAN_COLOR, "selected (black ring)": "#000000"},
                   side="below", marker="circle")
        self.figure = house_style(fig)

    def _node_data(self) -> dict[str, list]:
        n = self.n
        return {"member": list(range(n)), "label": [""] * n, "x": [0.0] * n, "y": [0.0] * n,
                "value": [math.nan] * n, "size": [self.size_range[0]] * n, "color": [NAN_COLOR] * n,
                "line_color": ["#333333"] * n, "line_width": [1.0] * n, "arch": [""] * n, "hparams": [""] * n,
                "status": [""] * n, "origin": [""] * n, "alarms": [0] * n}

    def update_similarity(self) -> list[int]:
        """Recompute the similarity matrix when a member's spec changed; returns the changed members."""
        specs = [m.spec for m in self.swarm.members]
        changed = (list(range(self.n)) if self._specs is None
                   else [i for i, (a, b) in enumerate(zip(specs, self._specs)) if a != b])
        if changed:
            self.similarity = self.swarm.config.similarity.matrix(specs, self._arch_cache)
        self._specs = specs
        self._changed = set(changed)
        return changed

    def layout(self, threshold: float) -> bool:
        """The sparse edges at ``threshold``; returns whether they changed. A new layout when at least
        :data:`RELAYOUT_SHARE` of the edges changed since the last one (:attr:`layouts` counts them)."""
        edges = sparse_edges(self.similarity, threshold, self.neighbours)
        if edges == self.edges:
            return False
        if self.edges is not None and len(self.positions) == self.n:
            # a few new edges (members replaced in a round) keep the layout; the next big change
            # (or the changes adding up) lays the graph out again: a live 256-member swarm then
            # spends its redraws drawing, not laying out
            self._drift |= edges ^ self.edges
            if len(self._drift) < RELAYOUT_SHARE * max(len(edges), 1):
                self.edges = edges
                self.graph = self._graph(edges)
                # a replaced member joins its new neighbours (their mean position, a little apart)
                for i in self._changed:
                    near = [j for j in self.graph.neighbors(i) if j not in self._changed]
                    if near:
                        jitter = np.random.default_rng(self.seed + i).normal(0, 0.03, 2)
                        self.positions[i] = np.mean([self.positions[j] for j in near], axis=0) + jitter
                return True
        self._drift = set()
        g = self._graph(edges)
        self.graph = g
        if self.n > 1:
            init = self.positions if len(self.positions) == self.n else None
            # k: the spacing between nodes; a little above 1/sqrt(n) keeps separate clusters apart
            pos = nx.spring_layout(g, pos=init, weight="weight", seed=self.seed, k=1.5 / math.sqrt(self.n),
                                   iterations=50 if init is None else 15)
            xy = np.array([pos[i] for i in range(self.n)], dtype=float)
            xy -= np.median(xy, axis=0)
            # scale so that most members fill the figure; a far, lonely member (no similar neighbour)
            # waits at the edge instead of squeezing every cluster into a corner
            xy /= np.maximum(np.quantile(np.abs(xy), 0.9, axis=0), 1e-9)
            xy = np.clip(xy, -1.08, 1.08)  # the figure's range is [-1.15, 1.15]
            self.positions = {i: xy[i] for i in range(self.n)}
        else:
            self.positions = {0: np.zeros(2)}
        self.edges = edges
        self.layouts += 1
        return True

    def _graph(self, edges) -> nx.Graph:
        g = nx.Graph()
        g.add_nodes_from(range(self.n))
        g.add_weighted_edges_from((a, b, float(self.similarity[a, b])) for a, b in edges)
        return g

    def draw_edges(self, threshold: float) -> None:
        order = sorted(self.edges or ())
        p = self.positions
        s = [float(self.similarity[a, b]) for a, b in order]
        span = max(1e-9, 1 - threshold)
        self.edge_source.data = {"x0": [p[a][0] for a, _ in order], "y0": [p[a][1] for a, _ in order],
                                 "x1": [p[b][0] for _, b in order], "y1": [p[b][1] for _, b in order],
                                 "a": [a for a, _ in order], "b": [b for _, b in order], "similarity": s,
                                 "alpha": [0.15 + 0.5 * (x - threshold) / span for x in s]}

    def patch_nodes(self, table: pd.DataFrame, values: np.ndarray, colors: Sequence[str], outline, low: float,
                    high: float, selected: Sequence[int], alarms: Sequence[int], *, with_positions: bool) -> None:
        """Values, looks and (when the layout changed) positions of every node, in one patch."""
        small, large = self.size_range
        v = np.asarray(values, dtype=float)
        size = np.where(np.isfinite(v), small + (large - small) * np.clip((np.nan_to_num(v) - low) / (high - low),
                                                                          0, 1), small)
        line_color, line_width = outline
        hp = [f"lr={r.lr:.3g} mom={r.momentum:.2f} wd={r.weight_decay:.2g} batch={int(r.batch_size)}"
              for r in table.itertuples()]
        chosen = set(selected)
        cols: dict[str, list] = {"value": v.tolist(), "size": size.tolist(), "color": list(colors),
                                 "line_color": line_color, "line_width": line_width, "arch": table["arch"].tolist(),
                                 "hparams": hp, "status": table["status"].tolist(), "origin": table["origin"].tolist(),
                                 "alarms": list(alarms), "label": [str(i) if i in chosen else "" for i in range(self.n)]}
        if with_positions:
            cols["x"] = [float(self.positions[i][0]) for i in range(self.n)]
            cols["y"] = [float(self.positions[i][1]) for i in range(self.n)]
        self.node_source.patch({k: [(slice(0, self.n), vals)] for k, vals in cols.items()})

    def label_selected(self, selected: Sequence[int]) -> None:
        chosen = set(selected)
        self.node_source.patch({"label": [(slice(0, self.n), [str(i) if i in chosen else "" for i in range(self.n)])]})

    def set_title(self, threshold: float, metric: str) -> None:
        set_title(self.figure, f"{self.n} members, {len(self.edges or ())} edges (each member's "
                               f"{self.neighbours} most similar at ≥ {threshold:.2f}) · size and colour: {metric}")
