"""Operator-level splitting: one dominant ``nn.Linear`` becomes parallel shards across stages.

A column split (``dim="out"``) gives each shard a block of output features, joined by
``torch.cat``; a row split (``dim="in"``) gives each shard a block of input features and sums the
partial products, the bias added once. Either way the GraphModule computes the same function
with the same weights (copied into the shards), and the partitioner may put the shards on
different stages.
"""
from __future__ import annotations

import copy
import math

import networkx as nx
import numpy as np
import torch
from torch import fx, nn


def _chunks(n: int, parts: int) -> list[tuple[int, int]]:
    edges = np.linspace(0, n, parts + 1).round().astype(int)
    return [(int(a), int(b)) for a, b in zip(edges[:-1], edges[1:])]


def split_linear(gm: fx.GraphModule, node: str, parts: int, dim: str = "out") -> fx.GraphModule:
    """A copy of ``gm`` in which the Linear called by fx node ``node`` runs as ``parts`` shards.

    Raises:
        ValueError: no such node, it does not call an ``nn.Linear``, ``parts`` < 2 or more than
            the features split, or ``dim`` is not "out" / "in".
    """
    if dim not in ("out", "in"):
        raise ValueError(f"dim must be 'out' (column split) or 'in' (row split), got {dim!r}")
    gm = copy.deepcopy(gm)
    found = [n for n in gm.graph.nodes if n.name == node]
    if not found:
        raise ValueError(f"split_linear: no node {node!r} in the graph")
    target = found[0]
    lin = gm.get_submodule(target.target) if target.op == "call_module" else None
    if not isinstance(lin, nn.Linear):
        raise ValueError(f"split_linear: node {node!r} does not call an nn.Linear")
    features = lin.out_features if dim == "out" else lin.in_features
    if isinstance(parts, bool) or not isinstance(parts, int) or not 2 <= parts <= features:
        raise ValueError(f"parts must be an int in [2, {features}] for {node!r}, got {parts!r}")
    base = node
    x = target.args[0]
    outs = []
    with gm.graph.inserting_before(target):
        for i, (a, b) in enumerate(_chunks(features, parts)):
            if dim == "out":
                shard = nn.Linear(lin.in_features, b - a, bias=lin.bias is not None)
                shard.weight.data.copy_(lin.weight.data[a:b])
                if lin.bias is not None:
                    shard.bias.data.copy_(lin.bias.data[a:b])
                arg = x
            else:
                shard = nn.Linear(b - a, lin.out_features, bias=lin.bias is not None and i == 0)
                shard.weight.data.copy_(lin.weight.data[:, a:b])
                if shard.bias is not None:
                    shard.bias.data.copy_(lin.bias.data)
                arg = gm.graph.call_function(torch.narrow, (x, -1, a, b - a))
            shard.to(lin.weight.device, lin.weight.dtype)
            name = f"{base}_shard{i}"
            gm.add_submodule(name, shard)
            outs.append(gm.graph.call_module(name, (arg,)))
        if dim == "out":
            joined = gm.graph.call_function(torch.cat, (outs, -1))
        else:
            joined = outs[0]
            for o in outs[1:]:
                joined = gm.graph.call_function(torch.add, (joined, o))
    target.replace_all_uses_with(joined)
    gm.graph.erase_node(target)
    if not any(n.op == "call_module" and n.target == target.target for n in gm.graph.nodes):
        gm.delete_submodule(str(target.target))  # unless another call still uses it
    gm.graph.lint()
    gm.recompile()
    return gm


def dominant_linears(gm: fx.GraphModule, g: nx.DiGraph, k: int, cost: str = "time_s",
                     share: float = 1.0) -> dict[str, int]:
    """Linear nodes costing more than ``share`` x the fair share (total / k), with the number of
    shards that brings each to at most half the fair share."""
    total = sum(d[cost] for _, d in g.nodes(data=True))
    fair = total / k
    out = {}
    for n in gm.graph.nodes:
        if n.op != "call_module" or n.name not in g:
            continue
        c = g.nodes[n.name][cost]
        lin = gm.get_submodule(n.target)
        if c > share * fair and isinstance(lin, nn.Linear) and lin.out_features >= 2:
            out[n.name] = min(max(2, math.ceil(2 * c / fair)), lin.out_features)
    return out
