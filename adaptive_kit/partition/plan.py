"""Pipeline plans for model graphs: contiguous in a topological order, so always runnable."""
from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass

import networkx as nx
import numpy as np

from .chain import partition_chain


@dataclass(frozen=True)
class GraphPlan:
    """A stage per node, and what the slowest stage costs."""

    order: tuple[str, ...]  # the topological order the stages cut
    stage_of: dict[str, int]  # node -> stage in [0, k)
    stage_s: tuple[float, ...]
    bottleneck_s: float


def boundary_bytes(g: nx.DiGraph, order: Sequence[str], key: str = "bytes") -> np.ndarray:
    """(n,) bytes crossing a cut after position i of ``order``: each node's output crosses every
    boundary between it and its last consumer once."""
    pos = {v: i for i, v in enumerate(order)}
    diff = np.zeros(len(order) + 1)
    for u in order:
        out = [(pos[v], d.get(key, 0)) for v, d in g.succ[u].items()]
        if out:
            last = max(p for p, _ in out)
            size = max(b for _, b in out)
            diff[pos[u]] += size
            diff[last] -= size
    return np.maximum(np.cumsum(diff)[:-1], 0.0)  # float cancellation can leave -1e-16


def is_valid_pipeline(g: nx.DiGraph, stage_of: dict[str, int]) -> bool:
    """True when every edge goes to the same or a later stage (the stage graph is a chain DAG)."""
    return all(stage_of[u] <= stage_of[v] for u, v in g.edges)


def partition_graph(g: nx.DiGraph, k: int, speeds: Sequence[float] | None = None,
                    bandwidth: float = float("inf"), cost: str = "time_s") -> GraphPlan:
    """The minimum-bottleneck split of ``g`` into ``k`` stages contiguous in its topological order.

    For a chain this is the exact optimum; for a branchy graph it is the optimum over splits of
    one topological order (the graph's own, e.g. torch.fx's), and always a valid pipeline.

    Raises:
        ValueError: ``g`` is empty or has a cycle, a node lacks ``cost``, or the chain
            partitioner rejects ``k`` / ``speeds`` / ``bandwidth``.
    """
    if g.number_of_nodes() == 0:
        raise ValueError("partition_graph: the graph is empty (an empty trace?)")
    if not nx.is_directed_acyclic_graph(g):
        raise ValueError("partition_graph: the graph has a cycle; a pipeline needs a DAG")
    missing = [v for v, d in g.nodes(data=True) if cost not in d]
    if missing:
        raise ValueError(f"partition_graph: nodes {missing[:5]} have no {cost!r} attribute")
    pos = {v: i for i, v in enumerate(g.nodes)}
    order = tuple(nx.lexicographical_topological_sort(g, key=lambda v: pos[v]))
    c = np.array([g.nodes[v][cost] for v in order], dtype=float)
    plan = partition_chain(c, k, speeds, boundary_bytes(g, order), bandwidth)
    stage_of = {v: j for j, r in enumerate(plan.stages) for v in (order[i] for i in r)}
    return GraphPlan(order, stage_of, plan.stage_s, plan.bottleneck_s)
