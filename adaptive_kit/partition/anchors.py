"""Baseline partitioners users reach for: equal layer counts, DeepSpeed's parameter balance,
torchgpipe's balance by time.

Each is ``fn(g, k, cost="cost_s") -> {node: stage}``: stages contiguous in the graph's own node
order (torch.fx's, which is topological, so every plan is a valid pipeline). They cut between
*layers*: a layer is a node carrying parameters (``param_bytes`` > 0) together with the
parameter-free nodes after it up to the next layer (those before the first layer join it),
which is how these tools see a model: a ``nn.Sequential`` of modules with weights. They are the
anchors :func:`~adaptive_kit.partition.best_plan` is measured against in ``benchmarks/partition.py``.
"""
from __future__ import annotations

from collections.abc import Sequence

import networkx as nx
import numpy as np

__all__ = ["block_partition", "equal_layers", "gpipe_balance", "layer_groups", "linear_partition",
           "parameter_balanced", "uniform_bounds"]


def layer_groups(g: nx.DiGraph) -> list[list[str]]:
    """The graph's nodes, in its own order, cut into layers (each starts at a node with
    ``param_bytes`` > 0; the parameter-free nodes before the first layer join the first).

    Raises:
        ValueError: no node carries parameters.
    """
    groups: list[list[str]] = []
    lead: list[str] = []  # parameter-free nodes before the first layer
    for v, d in g.nodes(data=True):
        if d.get("param_bytes", 0) > 0:
            groups.append([*lead, v] if not groups else [v])
            lead = []
        elif groups:
            groups[-1].append(v)
        else:
            lead.append(v)
    if not groups:
        raise ValueError("the graph has no node with param_bytes > 0: no layer to partition")
    return groups


def _groups(g: nx.DiGraph, k: int) -> list[list[str]]:
    if isinstance(k, bool) or not isinstance(k, (int, np.integer)) or k < 1:
        raise ValueError(f"k must be an int >= 1, got {k!r}")
    groups = layer_groups(g)
    if k > len(groups):
        raise ValueError(f"k={k} stages for {len(groups)} layers: every stage needs a layer")
    return groups


def _assign(groups: list[list[str]], bounds: Sequence[int]) -> dict[str, int]:
    """Stage j gets layers ``bounds[j]:bounds[j+1]``."""
    return {v: j for j, (a, b) in enumerate(zip(bounds[:-1], bounds[1:])) for grp in groups[a:b] for v in grp}


def uniform_bounds(n: int, k: int) -> list[int]:
    """(k + 1,) boundaries giving each of ``k`` parts ``n // k`` items, one more to each of the
    first ``n % k`` parts (DeepSpeed's ``partition_uniform``)."""
    size, extra = divmod(n, k)
    return [j * size + min(j, extra) for j in range(k + 1)]


def linear_partition(weights: Sequence[float], k: int) -> list[int]:
    """(k + 1,) boundaries of ``k`` non-empty contiguous parts of ``weights``, chosen as DeepSpeed's
    ``runtime.utils.partition_balanced`` chooses them.

    That function (the one ``PipelineModule(partition_method="parameters")`` calls on the
    per-layer parameter counts) is a dynamic programme over (first i items, j parts): among the
    ways to end part j at item i, it keeps the one whose parts have the smallest spread, largest
    part sum minus smallest, carrying that max and min forward; on ties the later start of the
    last part wins. Spread is not additive, so this is a heuristic rather than the exact
    min-max split. O(n^2 k). With ``n <= k`` it falls back to :func:`uniform_bounds`.
    """
    w = np.asarray(weights, dtype=float)
    n = len(w)
    if n <= k:
        return uniform_bounds(n, k)
    prefix = np.concatenate([[0.0], np.cumsum(w)])
    big = np.inf
    hi = np.full((n + 1, k + 1), big)  # largest part sum of the kept split of i items into j parts
    lo = np.full((n + 1, k + 1), big)  # its smallest part sum
    spread = np.full((n + 1, k + 1), big)
    start = np.zeros((n + 1, k + 1), dtype=int)  # where its last part starts
    hi[0, 0] = spread[0, 0] = 0.0
    for i in range(1, n + 1):
        for j in range(1, min(i, k) + 1):
            last = prefix[i] - prefix[:i]  # (i,) sum of the last part if it starts at s
            with np.errstate(invalid="ignore"):  # inf - inf where no split of s items exists
                top = np.maximum(hi[:i, j - 1], last)
                bottom = np.minimum(lo[:i, j - 1], last)
                cand = top - bottom
            for s in range(i):  # in order, ">=": the last of equal spreads is kept
                if spread[i, j] >= cand[s]:
                    spread[i, j], hi[i, j], lo[i, j], start[i, j] = cand[s], top[s], bottom[s], s
    bounds = [n]
    for j in range(k, 0, -1):
        bounds.append(int(start[bounds[-1], j]))
    return bounds[::-1]


def block_partition(sequence: Sequence[float], k: int, max_moves: int = 100_000) -> list[int]:
    """(k + 1,) boundaries of ``k`` contiguous blocks of ``sequence``, by the block-partition
    heuristic of Bárány and Grinberg ("Block partitions of sequences", arXiv:1308.2452) as
    torchgpipe's ``balance.blockpartition.solve`` runs it for ``balance_by_time``.

    The values are first rescaled to [0, 1] (minimum to 0, maximum to 1). Starting from blocks of
    ``n // k`` items (the last takes the rest), it repeats: take the heaviest block p (the last one
    on ties); while the lightest block q (the first one on ties) is lighter than p by more than 1
    (the largest item), move one item into q from its neighbour h on p's side (the last item of
    q - 1 when p < q, the first of q + 1 when q < p), going back to pick a new heaviest block once
    h is p. It stops when heaviest - lightest <= 1: balance to within one (normalised) largest
    item, not optimal.

    Raises:
        ValueError: ``k`` < 1 or more than the items, the heuristic ends with an empty block
            (torchgpipe would hand ``GPipe`` a balance with a 0, which it rejects), or it has not
            stopped after ``max_moves`` moves (torchgpipe has no such limit).
    """
    if isinstance(k, bool) or not isinstance(k, (int, np.integer)) or k < 1:
        raise ValueError(f"k must be an int >= 1, got {k!r}")
    x = [float(v) for v in sequence]
    n = len(x)
    if n < k:
        raise ValueError(f"k={k} blocks for a sequence of {n} items")
    low, span = min(x), max(x) - min(x)
    norm = [(v - low) / span for v in x] if span > 0 else [0.0] * n
    ends = [n // k * (j + 1) for j in range(k - 1)] + [n]  # end of each block

    def sizes() -> np.ndarray:  # summed left to right as torchgpipe does, for the same ties
        return np.array([sum(norm[a:b]) for a, b in zip([0, *ends[:-1]], ends)])

    moves = 0
    while True:
        s = sizes()
        p = int(np.flatnonzero(s == s.max())[-1])  # the last heaviest block (max over (size, index))
        while True:
            s = sizes()
            q = int(np.argmin(s))  # the first lightest block
            if s[p] <= s[q] + 1:
                bounds = [0, *ends]
                empty = [j for j in range(k) if bounds[j + 1] <= bounds[j]]
                if empty:  # or of negative length
                    raise ValueError(f"block partition: blocks {empty} ended empty")
                return bounds
            if moves == max_moves:
                raise ValueError(f"block partition: not balanced after {max_moves} moves")
            moves += 1
            # as in torchgpipe, a boundary may pass its neighbour on the way (a block of negative
            # length sums to 0); only the final blocks are checked
            if p < q:  # the last item of block q - 1 moves to q
                h = q - 1
                ends[h] -= 1
            else:  # the first item of block q + 1 moves to q
                h = q + 1
                ends[q] += 1
            if p == h:
                break


def equal_layers(g: nx.DiGraph, k: int, cost: str = "cost_s") -> dict[str, int]:
    """The same number of layers per stage, the remainder one each to the first stages (DeepSpeed's
    ``partition_method="uniform"``). ``cost`` is unused (kept for a common signature).

    Raises:
        ValueError: ``k`` < 1 or more than the layers, or the graph has no layer.
    """
    groups = _groups(g, k)
    return _assign(groups, uniform_bounds(len(groups), k))


def parameter_balanced(g: nx.DiGraph, k: int, cost: str = "cost_s") -> dict[str, int]:
    """Stages balancing parameter bytes, as DeepSpeed's ``PipelineModule(partition_method=
    "parameters")``: it counts each layer's trainable parameters (``_count_layer_params``) and
    cuts them with ``ds_utils.partition_balanced`` (:func:`linear_partition` here). ``cost`` is
    unused: the rule never looks at time.

    Raises:
        ValueError: ``k`` < 1 or more than the layers, or the graph has no layer.
    """
    groups = _groups(g, k)
    weights = [sum(g.nodes[v].get("param_bytes", 0) for v in grp) for grp in groups]
    return _assign(groups, linear_partition(weights, k))


def gpipe_balance(g: nx.DiGraph, k: int, cost: str = "cost_s") -> dict[str, int]:
    """Stages from torchgpipe's ``balance_by_time``: per-layer costs (``cost`` summed over each
    layer's nodes, where torchgpipe sums profiled microseconds) cut by :func:`block_partition`.

    Raises:
        ValueError: ``k`` < 1 or more than the layers, the graph has no layer, a node lacks
            ``cost``, or the heuristic would empty a block.
    """
    groups = _groups(g, k)
    missing = [v for grp in groups for v in grp if cost not in g.nodes[v]]
    if missing:
        raise ValueError(f"nodes {missing[:5]} have no {cost!r} attribute")
    times = [sum(float(g.nodes[v][cost]) for v in grp) for grp in groups]
    return _assign(groups, block_partition(times, k))
