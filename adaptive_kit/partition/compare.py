"""Plans of one graph by every method side by side: ours, the three anchors and METIS (repaired),
with their stage loads, what failed, and optionally the MILP lower bound they are measured against."""
from __future__ import annotations

from collections.abc import Callable, Mapping
from dataclasses import dataclass, field

import networkx as nx
import numpy as np

from . import anchors
from .metis import metis_parts, repair
from .plan import Bound, GraphPlan, best_plan, milp_bound, stage_graph, stage_loads

OURS = "ours"
METIS = "METIS (repaired)"
ANCHORS = {"equal layers": anchors.equal_layers, "parameter balanced": anchors.parameter_balanced,
           "GPipe balance": anchors.gpipe_balance}  # display name -> fn(g, k, cost) -> {node: stage}
METHODS = (OURS, *ANCHORS, METIS)  # the order plans are made and shown in


@dataclass
class Comparison:
    """Stage plans of one graph by every method (keys of :data:`METHODS`), their stage loads
    (seconds at speed 1), and what failed: ``errors`` maps a method to its message."""

    k: int  # stages
    plans: dict[str, dict[str, int]] = field(default_factory=dict)  # method -> {node: stage}
    loads: dict[str, np.ndarray] = field(default_factory=dict)  # method -> (k,) seconds per stage
    errors: dict[str, str] = field(default_factory=dict)  # method -> "ErrorType: message"
    metis_raw: dict[str, int] | None = None  # METIS's parts before the repair
    metis_cyclic: bool | None = None  # whether those parts had a cycle among stages (repair fixed it)
    bound: Bound | None = None  # the MILP lower bound, when asked for
    best: GraphPlan | None = None  # ours as best_plan made it (None when the plan was given)

    def bottlenecks(self) -> dict[str, float]:
        """The slowest stage's seconds per method."""
        return {m: float(v.max()) for m, v in self.loads.items()}


def compare_plans(g: nx.DiGraph, k: int, *, cost: str = "cost_s", ours: Mapping[str, int] | None = None,
                  bound_time_s: float = 0.0, seed: int = 0) -> Comparison:
    """Ours (:func:`best_plan`, or the plan given), the three anchors and METIS (repaired) on ``g``.

    A method that raises (an anchor asked for more stages than layers, pymetis missing) is left
    out and its message kept in ``errors``. With ``bound_time_s`` > 0 the MILP lower bound is
    computed within that time; ``seed`` seeds METIS.
    """
    out = Comparison(k)

    def best() -> dict[str, int]:
        out.best = best_plan(g, k, cost=cost)
        return out.best.stage_of

    def metis() -> dict[str, int]:
        out.metis_raw = metis_parts(g, k, cost, seed=seed)
        out.metis_cyclic = not nx.is_directed_acyclic_graph(stage_graph(g, out.metis_raw))
        return repair(g, out.metis_raw)

    makers: dict[str, Callable[[], dict[str, int]]] = {OURS: (lambda: dict(ours)) if ours is not None else best}
    makers |= {name: (lambda fn=fn: fn(g, k, cost)) for name, fn in ANCHORS.items()}
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
