"""Model graphs from torch.fx and pipeline plans on them."""
import networkx as nx
import numpy as np
import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st
from torch import nn

from adaptive_kit.partition.chain import partition_chain
from adaptive_kit.partition.graph import TraceError, model_graph
from adaptive_kit.partition.plan import boundary_bytes, is_valid_pipeline, partition_graph


class Residual(nn.Module):
    def __init__(self):
        super().__init__()
        self.a, self.b, self.c = nn.Linear(4, 4), nn.Linear(4, 4), nn.Linear(4, 2)

    def forward(self, x):
        h = self.a(x)
        return self.c(torch.relu(self.b(h)) + h)


class Branching(nn.Module):  # control flow on a tensor value: fx cannot trace it
    def __init__(self):
        super().__init__()
        self.a, self.b = nn.Linear(4, 4), nn.Linear(4, 4)

    def forward(self, x):
        if x.sum() > 0:
            return self.b(self.a(x))
        return self.a(x)


def test_mlp_graph_costs_match_hand_counts():
    g = model_graph(nn.Sequential(nn.Linear(8, 16), nn.ReLU(), nn.Linear(16, 4)), torch.randn(32, 8), reps=1)
    assert list(g.nodes) == ["_0", "_1", "_2"] and list(g.edges) == [("_0", "_1"), ("_1", "_2")]
    # forward 2*B*in*out, backward twice that (input and weight gradients)
    assert g.nodes["_0"]["flops"] == 6 * 32 * 8 * 16 and g.nodes["_2"]["flops"] == 6 * 32 * 16 * 4
    assert g.nodes["_1"]["flops"] == 0
    assert g.nodes["_0"]["param_bytes"] == 4 * (8 * 16 + 16) == g.nodes["_0"]["grad_bytes"]
    assert g.nodes["_0"]["act_bytes"] == 4 * 32 * 16 == g.edges["_0", "_1"]["bytes"]
    assert all(d["time_s"] > 0 for _, d in g.nodes(data=True))


def test_residual_graph_and_boundary_bytes():
    g = model_graph(Residual(), torch.randn(3, 4), reps=0)
    assert set(g.edges) == {("a", "b"), ("a", "add"), ("b", "relu"), ("relu", "add"), ("add", "c")}
    order = ["a", "b", "relu", "add", "c"]
    # h crosses every boundary up to its last consumer (add) once, alongside b's branch
    assert boundary_bytes(g, order).tolist() == [48, 96, 96, 48, 0]


def test_untraceable_model_names_the_operation_and_falls_back():
    with pytest.raises(TraceError, match="forward") as info:
        model_graph(Branching(), torch.randn(2, 4))
    assert "control flow" in str(info.value) and "fallback=True" in str(info.value)
    # this input runs a -> b: planned as that chain, with a warning that other inputs may branch
    with pytest.warns(UserWarning, match=r"module level \(a -> b\).*data-dependent"):
        g = model_graph(Branching(), torch.ones(2, 4), fallback=True, reps=0)
    assert g.graph["granularity"] == "module" and list(g.edges) == [("a", "b")]
    # this input runs a only: the chain a -> b would be a wrong graph, so it is refused
    with pytest.raises(TraceError, match=r"refuses to plan Branching as the chain a -> b: forward "
                                         r"called \['a'\] of the children \['a', 'b'\]"):
        model_graph(Branching(), -torch.ones(2, 4), fallback=True, reps=0)


def test_on_a_chain_the_graph_plan_is_the_chain_optimum():
    rng = np.random.default_rng(1)
    cost = rng.random(30)
    g = nx.DiGraph()
    for i, c in enumerate(cost):
        g.add_node(i, time_s=c)
        if i:
            g.add_edge(i - 1, i, bytes=float(rng.integers(0, 100)))
    cut = [g.edges[i, i + 1]["bytes"] for i in range(29)] + [0.0]
    for k in (1, 2, 4, 8):
        plan = partition_graph(g, k, bandwidth=500.0)
        assert plan.bottleneck_s == pytest.approx(partition_chain(cost, k, None, cut, 500.0).bottleneck_s)


@st.composite
def dags(draw):
    n = draw(st.integers(1, 25))
    g = nx.DiGraph()
    for i in range(n):
        g.add_node(i, time_s=draw(st.floats(0, 5)))
    for v in range(1, n):
        for u in draw(st.sets(st.integers(0, v - 1), max_size=3)):
            g.add_edge(u, v, bytes=draw(st.floats(0, 100)))
    return g, draw(st.integers(1, n))


@settings(max_examples=150, deadline=None)
@given(dags())
def test_every_plan_is_a_valid_pipeline(case):
    g, k = case
    plan = partition_graph(g, k, bandwidth=50.0)
    assert is_valid_pipeline(g, plan.stage_of)
    assert sorted(set(plan.stage_of.values())) == list(range(k))  # every device used
    total = sum(d["time_s"] for _, d in g.nodes(data=True))
    assert plan.bottleneck_s >= total / k - 1e-9


def test_bad_graphs_raise_clear_errors():
    with pytest.raises(ValueError, match="empty"):
        partition_graph(nx.DiGraph(), 1)
    cyc = nx.DiGraph([(0, 1), (1, 0)])
    nx.set_node_attributes(cyc, 1.0, "time_s")
    with pytest.raises(ValueError, match="cycle"):
        partition_graph(cyc, 1)
    with pytest.raises(ValueError, match="no 'time_s'"):
        partition_graph(nx.DiGraph([(0, 1)]), 1)
    g = nx.DiGraph()
    g.add_node(0, time_s=1.0)
    with pytest.raises(ValueError, match="k=2 devices for a chain of 1 nodes"):
        partition_graph(g, 2)
    assert not is_valid_pipeline(nx.DiGraph([(0, 1)]), {0: 1, 1: 0})
