"""METIS's k-way parts of a model graph (pymetis, optional) and their repair into a valid
pipeline: METIS balances cost and cuts few bytes, but ignores edge direction, so its stage graph
may have cycles; :func:`repair` orders the parts and moves nodes later until every edge goes
forward."""
from __future__ import annotations

import networkx as nx
import numpy as np

from .plan import stage_graph


def repair(g: nx.DiGraph, parts: dict[str, int]) -> dict[str, int]:
    """A valid pipeline from any assignment of nodes to parts (e.g. METIS's, whose stage graph
    may have cycles): parts are ranked in a topological order of the stage graph with its cycles
    collapsed (parts of one cycle by the mean topological position of their nodes), and each node
    goes to the later of its part's rank and its producers' stages. A valid plan is kept as is."""
    pos = {v: i for i, v in enumerate(nx.topological_sort(g))}
    groups: dict[int, list[int]] = {}
    for v, p in parts.items():
        groups.setdefault(p, []).append(pos[v])
    mean = {p: float(np.mean(ps)) for p, ps in groups.items()}
    q = nx.condensation(stage_graph(g, parts))  # cycles of parts collapse to one node
    members = q.graph["mapping"]  # part -> component
    comps = {c: sorted((p for p, cc in members.items() if cc == c), key=mean.__getitem__) for c in q.nodes}
    ranked = [p for c in nx.lexicographical_topological_sort(q, key=lambda c: mean[comps[c][0]]) for p in comps[c]]
    rank = {p: r for r, p in enumerate(ranked)}
    out: dict[str, int] = {}
    for v in sorted(parts, key=pos.__getitem__):
        out[v] = max([rank[parts[v]], *(out[u] for u in g.pred[v])])
    return out


def metis_parts(g: nx.DiGraph, k: int, cost: str = "time_s", seed: int = 0) -> dict[str, int]:
    """METIS (pymetis, optional) k-way partition balancing ``cost`` and cutting edge ``bytes``.

    Raises:
        ImportError: pymetis is not installed (``pip install pymetis``).
    """
    import pymetis

    nodes = list(g.nodes)
    idx = {v: i for i, v in enumerate(nodes)}
    u = g.to_undirected()
    xadj, adjncy, eweights = [0], [], []
    for v in nodes:
        for w, d in u.adj[v].items():
            adjncy.append(idx[w])
            eweights.append(max(1, int(d.get("bytes", 0) // 1024)))
        xadj.append(len(adjncy))
    c = np.array([g.nodes[v][cost] for v in nodes], dtype=float)
    vweights = np.maximum(1, np.round(c / max(c.max(), 1e-300) * 10000)).astype(int).tolist()
    _, membership = pymetis.part_graph(k, adjacency=pymetis.CSRAdjacency(xadj, adjncy), vweights=vweights,
                                       eweights=eweights, options=pymetis.Options(seed=seed))
    return {v: int(membership[i]) for i, v in enumerate(nodes)}
