"""Graph plans against an exhaustive search, the MILP bound, METIS + repair, and plan_model."""
import itertools
import math

import networkx as nx
import numpy as np
import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st
from torch import nn

from adaptive_kit.partition import best_plan, plan_model, stage_loads
from adaptive_kit.partition import graph as graph_module
from adaptive_kit.partition.chain import partition_chain
from adaptive_kit.partition.compare import METHODS, METIS, OURS, compare_plans
from adaptive_kit.partition.graph import TraceError, model_graph, trace
from adaptive_kit.partition.metis import metis_parts, repair
from adaptive_kit.partition.models import GPT, uneven_mlp
from adaptive_kit.partition.plan import (
    is_valid_pipeline,
    milp_bound,
    partition_graph,
    refine,
    stage_graph,
)


def dag(costs, edges):
    g = nx.DiGraph()
    for v, c in costs.items():
        g.add_node(v, cost_s=float(c))
    g.add_edges_from(edges)
    return g


def loads_of(g, stage_of, k, speeds=None):
    s = np.ones(k) if speeds is None else np.asarray(speeds, dtype=float)
    out = np.zeros(k)
    for v, j in stage_of.items():
        out[j] += g.nodes[v]["cost_s"]
    return out / s


def brute_force(g, k, speeds=None):
    """The smallest bottleneck over every monotone assignment of nodes to k non-empty stages."""
    nodes = list(g.nodes)
    idx = {v: i for i, v in enumerate(nodes)}
    a = np.array(list(itertools.product(range(k), repeat=len(nodes))), dtype=np.int8)  # (k^n, n)
    ok = np.ones(len(a), dtype=bool)
    for u, v in g.edges:
        ok &= a[:, idx[u]] <= a[:, idx[v]]
    for j in range(k):
        ok &= (a == j).any(axis=1)
    a = a[ok]
    cost = np.array([g.nodes[v]["cost_s"] for v in nodes])
    s = np.ones(k) if speeds is None else np.asarray(speeds, dtype=float)
    loads = np.stack([((a == j) * cost).sum(axis=1) / s[j] for j in range(k)], axis=1)
    return float(loads.max(axis=1).min())


@st.composite
def small_dags(draw, max_nodes=9):
    n = draw(st.integers(4, max_nodes))
    g = nx.DiGraph()
    for i in range(n):
        g.add_node(f"v{i}", cost_s=draw(st.floats(0.1, 10, allow_nan=False)))
    for v in range(1, n):
        for u in draw(st.sets(st.integers(0, v - 1), max_size=3)):
            g.add_edge(f"v{u}", f"v{v}")
    k = draw(st.integers(1, min(4, n)))
    speeds = draw(st.one_of(st.none(), st.lists(st.floats(0.5, 2), min_size=k, max_size=k)))
    return g, k, speeds


@settings(max_examples=40, deadline=None)
@given(small_dags(max_nodes=7))
def test_refined_plan_is_valid_and_between_bound_and_partition(case):
    g, k, speeds = case
    plan = partition_graph(g, k, speeds, cost="cost_s")
    better = refine(g, plan, speeds, cost="cost_s")
    assert is_valid_pipeline(g, plan.stage_of) and is_valid_pipeline(g, better.stage_of)
    assert sorted(set(better.stage_of.values())) == list(range(k))  # no stage emptied
    assert better.bottleneck_s <= plan.bottleneck_s * (1 + 1e-12)
    # the reported loads are the plan's own
    np.testing.assert_allclose(better.stage_s, loads_of(g, better.stage_of, k, speeds), rtol=1e-9)
    bound = milp_bound(g, k, speeds, cost="cost_s")
    opt = brute_force(g, k, speeds)
    assert bound.optimal
    assert bound.lower_s <= opt * (1 + 1e-7)
    assert bound.best_s == pytest.approx(opt, rel=1e-6)
    assert better.bottleneck_s >= opt * (1 - 1e-9) and better.bottleneck_s >= bound.lower_s * (1 - 1e-9)


@settings(max_examples=25, deadline=None)
@given(small_dags(max_nodes=9))
def test_larger_dags_stay_above_the_bound(case):
    g, k, speeds = case
    plan = best_plan(g, k, speeds, cost="cost_s")
    bound = milp_bound(g, k, speeds, cost="cost_s")
    assert is_valid_pipeline(g, plan.stage_of)
    assert bound.lower_s <= bound.best_s * (1 + 1e-9)
    assert plan.bottleneck_s >= bound.lower_s * (1 - 1e-9)
    total = sum(d["cost_s"] for _, d in g.nodes(data=True))
    s = np.ones(k) if speeds is None else np.asarray(speeds)
    assert bound.lower_s >= total / s.sum() * (1 - 1e-9)  # the trivial bound holds


def test_refine_finds_the_order_the_three_topological_orders_miss():
    # v0 and v1 both feed v2: every order tried puts v0 first, so {v0, v1} is stage 0 (cost 8);
    # refine moves v0 to the next stage: {v1} 6, {v0, v2} 7, {v3} 3
    g = dag({"v0": 2, "v1": 6, "v2": 5, "v3": 3}, [("v0", "v2"), ("v1", "v2"), ("v2", "v3")])
    plan = partition_graph(g, 3, cost="cost_s")
    assert plan.bottleneck_s == 8.0
    better = refine(g, plan, cost="cost_s")
    assert better.stage_of == {"v0": 1, "v1": 0, "v2": 1, "v3": 2}
    assert better.stage_s == (6.0, 7.0, 3.0) and better.bottleneck_s == 7.0
    assert better.order == ("v1", "v0", "v2", "v3")  # sorted by stage: contiguous again
    assert brute_force(g, 3) == 7.0 and milp_bound(g, 3, cost="cost_s").best_s == pytest.approx(7.0)
    assert best_plan(g, 3, cost="cost_s").stage_of == better.stage_of
    # communication is not re-priced by refine, so with a finite bandwidth best_plan only cuts
    # orders exactly (its own random ones too): never worse than partition_graph, and valid
    priced = best_plan(g, 3, bandwidth=1e9, cost="cost_s")
    assert priced.bottleneck_s <= plan.bottleneck_s and is_valid_pipeline(g, priced.stage_of)


@pytest.mark.parametrize("speeds", [None, [1.0, 2.0, 0.5]])
def test_on_a_chain_the_stages_are_the_chain_partition(speeds):
    cost = np.random.default_rng(3).integers(1, 20, 12).astype(float)
    g = nx.path_graph(12, create_using=nx.DiGraph)
    nx.set_node_attributes(g, dict(enumerate(cost)), "cost_s")
    plan = partition_graph(g, 3, speeds, cost="cost_s")
    chain = partition_chain(cost, 3, speeds)
    assert plan.stage_of == {i: j for j, r in enumerate(chain.stages) for i in r}
    assert plan.bottleneck_s == pytest.approx(chain.bottleneck_s)
    assert is_valid_pipeline(g, plan.stage_of)


def test_milp_bound_with_heterogeneous_speeds():
    # two equal independent halves on devices of speed 3 and 1: the fast one takes 3 of 4 nodes
    g = dag({f"v{i}": 1.0 for i in range(4)}, [])
    bound = milp_bound(g, 2, speeds=[3.0, 1.0], cost="cost_s")
    assert bound.optimal and bound.best_s == pytest.approx(1.0) and bound.lower_s == pytest.approx(1.0)
    # same speeds swapped: the bound is symmetric in which device is fast
    assert milp_bound(g, 2, speeds=[1.0, 3.0], cost="cost_s").best_s == pytest.approx(1.0)
    assert milp_bound(g, 2, cost="cost_s").best_s == pytest.approx(2.0)


def test_milp_bound_rejects_more_stages_than_nodes():
    g = dag({"a": 1, "b": 1}, [("a", "b")])
    with pytest.raises(ValueError, match=r"k=3 must be in \[1, 2\]"):
        milp_bound(g, 3, cost="cost_s")
    with pytest.raises(ValueError, match="k=0"):
        milp_bound(g, 0, cost="cost_s")


def test_repair_breaks_a_cycle_in_the_stage_graph():
    g = dag({"a": 1, "b": 1, "c": 1, "d": 1}, [("a", "b"), ("b", "c"), ("c", "d")])
    parts = {"a": 0, "b": 1, "c": 0, "d": 1}  # 0 -> 1 -> 0: not a pipeline
    assert not nx.is_directed_acyclic_graph(stage_graph(g, parts))
    assert not is_valid_pipeline(g, parts)
    fixed = repair(g, parts)
    assert is_valid_pipeline(g, fixed) and nx.is_directed_acyclic_graph(stage_graph(g, fixed))
    assert fixed == {"a": 0, "b": 1, "c": 1, "d": 1}
    assert set(stage_graph(g, fixed).edges) == {(0, 1)}


@settings(max_examples=25, deadline=None)
@given(small_dags(max_nodes=9), st.integers(0, 3))
def test_metis_parts_then_repair_is_always_a_pipeline(case, seed):
    g, k, _ = case
    k = max(k, 2)
    parts = metis_parts(g, k, cost="cost_s", seed=seed)
    assert set(parts) == set(g.nodes) and set(parts.values()) <= set(range(k))
    fixed = repair(g, parts)
    assert is_valid_pipeline(g, fixed)
    assert nx.is_directed_acyclic_graph(stage_graph(g, fixed))
    assert len(set(fixed.values())) <= len(set(parts.values()))


def test_metis_on_a_model_graph_then_repair():
    g = model_graph(uneven_mlp([16, 64, 64, 64, 8]), torch.randn(4, 16), reps=0)
    parts = metis_parts(g, 3, cost="flops")
    fixed = repair(g, parts)
    assert is_valid_pipeline(g, fixed) and nx.is_directed_acyclic_graph(stage_graph(g, fixed))


@settings(max_examples=40, deadline=None)
@given(small_dags(max_nodes=9))
def test_repair_keeps_a_valid_assignment_valid(case):
    g, k, speeds = case
    plan = partition_graph(g, k, speeds, cost="cost_s")
    fixed = repair(g, plan.stage_of)
    assert is_valid_pipeline(g, fixed)
    assert len(set(fixed.values())) <= k


def test_repair_of_a_valid_pipeline_is_the_identity():
    # a valid 2-stage plan whose stage 0 holds a long side branch (x1..x3) that topological order
    # places after stage 1's only node b: ranking parts by mean position must not reorder them
    g = dag({v: 1 for v in ("a", "b", "x1", "x2", "x3")},
            [("a", "b"), ("a", "x1"), ("x1", "x2"), ("x2", "x3")])
    parts = {"a": 0, "x1": 0, "x2": 0, "x3": 0, "b": 1}
    assert is_valid_pipeline(g, parts)
    fixed = repair(g, parts)
    assert fixed == parts, (
        f"repair collapsed a valid 2-stage pipeline into {sorted(set(fixed.values()))} "
        f"(stage 0 left empty): {fixed}")


def flop_timed(monkeypatch):
    """Make model_graph's node times proportional to FLOPs plus a fixed overhead, so the
    calibration, the split and the plan are deterministic."""
    real = graph_module._measure

    def measure(fn, args, kwargs, reps, device):
        flops, _, out = real(fn, args, kwargs, 0, device)
        return flops, 1e-5 + 1e-10 * flops, out

    monkeypatch.setattr(graph_module, "_measure", measure)
    monkeypatch.setattr(graph_module, "_node_times", lambda g, runners, reps, device: {
        v: 1e-5 + 1e-10 * g.nodes[v]["flops"] for v in runners})


@pytest.fixture(scope="module")
def gpt_plan():
    torch.manual_seed(0)
    model = GPT(vocab=2048, d=32, layers=2, heads=2, seq_len=16).eval()
    ids = torch.randint(0, 2048, (2, 16), generator=torch.Generator().manual_seed(0))
    with pytest.MonkeyPatch.context() as mp:
        flop_timed(mp)
        return model, ids, plan_model(model, ids, k=4, reps=1)


def test_plan_model_computes_the_model(gpt_plan):
    model, ids, mp = gpt_plan
    with torch.no_grad():
        torch.testing.assert_close(mp.gm(ids), model(ids), rtol=1e-5, atol=1e-5)
    assert is_valid_pipeline(mp.graph, mp.plan.stage_of)
    assert sorted(set(mp.plan.stage_of.values())) == [0, 1, 2, 3]
    calls = {n.name for n in mp.gm.graph.nodes if n.op not in ("placeholder", "output")}
    assert set(mp.graph.nodes) == calls  # the plan describes the (possibly split) module
    assert all("cost_s" in d for _, d in mp.graph.nodes(data=True))
    assert mp.plan.bottleneck_s == pytest.approx(max(loads_of_key(mp.graph, mp.plan.stage_of, 4)))


def loads_of_key(g, stage_of, k, key="cost_s"):
    out = np.zeros(k)
    for v, j in stage_of.items():
        out[j] += g.nodes[v][key]
    return out


def test_plan_model_splits_the_dominant_head(gpt_plan):
    model, ids, mp = gpt_plan
    assert mp.cost_model.r2 > 0.999  # times are linear in FLOPs (get_attr nodes: 0 s)
    # the head is most of the cost: column shards bring each to at most half a fair share
    g = model_graph(trace(model), ids, reps=0)
    cost = mp.cost_model.predict(g)
    assert cost["head"] > 0.5 * sum(cost.values())
    parts = math.ceil(2 * cost["head"] / (sum(cost.values()) / 4))
    assert mp.splits == {"head": parts}
    assert "head" not in mp.graph and not hasattr(mp.gm, "head")
    shards = sorted(v for v in mp.graph if v.startswith("head_shard"))
    assert len(shards) == parts
    assert len({mp.plan.stage_of[v] for v in shards}) > 1  # the shards spread over stages
    # the split lowers the bottleneck below the unsplit head alone
    assert mp.plan.bottleneck_s < cost["head"]


class Branching(nn.Module):  # control flow on a tensor value: fx cannot trace it
    def __init__(self):
        super().__init__()
        self.a, self.b = nn.Linear(4, 8), nn.Linear(8, 4)

    def forward(self, x):
        if x.sum() > 0:
            return self.b(self.a(x))
        return self.a(x)


def test_plan_model_falls_back_to_module_level():
    x = torch.ones(8, 4)  # takes the branch a -> b
    with pytest.raises(TraceError):
        plan_model(Branching(), x, k=2, reps=1)
    with pytest.warns(UserWarning, match="data-dependent"):
        mp = plan_model(Branching(), x, k=2, reps=1, fallback=True)
    assert mp.graph.graph["granularity"] == "module"
    assert mp.plan.stage_of == {"a": 0, "b": 1} and mp.splits == {}
    assert isinstance(mp.gm, Branching)
    with pytest.raises(TraceError, match=r"forward called \['a'\]"):  # a only: not the chain a -> b
        plan_model(Branching(), -x, k=2, reps=1, fallback=True)


def test_plan_model_with_a_dominant_linear_of_few_outputs(monkeypatch):
    # the Linear is all the FLOPs, so dominant_linears asks for ceil(2 * c / (total / 4)) = 8
    # shards, but a column split of 3 output features allows at most 3
    flop_timed(monkeypatch)
    model = nn.Sequential(nn.ReLU(), nn.Tanh(), nn.Sigmoid(), nn.Linear(1024, 3))
    x = torch.randn(8, 1024)
    try:
        mp = plan_model(model, x, k=4, reps=1)
    except ValueError as e:
        raise AssertionError(f"plan_model failed on a valid model: dominant_linears asked for more "
                             f"shards than the Linear has output features: {e}") from e
    assert set(mp.splits) <= {"_3"} and all(2 <= p <= 3 for p in mp.splits.values())
    torch.testing.assert_close(mp.gm(x), model(x))
    assert is_valid_pipeline(mp.graph, mp.plan.stage_of)


def test_stage_loads_sums_costs_per_stage_and_divides_by_speed():
    g = dag({"a": 1, "b": 2, "c": 4}, [("a", "b"), ("b", "c")])
    plan = {"a": 0, "b": 0, "c": 1}
    np.testing.assert_allclose(stage_loads(g, plan, 2), [3.0, 4.0])
    np.testing.assert_allclose(stage_loads(g, plan, 2, speeds=[1.0, 2.0]), loads_of(g, plan, 2, [1.0, 2.0]))


def test_compare_plans_ours_anchors_and_metis_on_a_model_graph():
    g = model_graph(uneven_mlp([16, 64, 64, 64, 8]), torch.randn(4, 16), reps=0)
    nx.set_node_attributes(g, {v: float(d["flops"]) for v, d in g.nodes(data=True)}, "cost_s")
    comp = compare_plans(g, 3, bound_time_s=5.0)
    assert set(comp.plans) | set(comp.errors) == set(METHODS) and not comp.errors
    for method, plan in comp.plans.items():
        assert is_valid_pipeline(g, plan), method
        np.testing.assert_allclose(comp.loads[method], loads_of(g, plan, 3))
    assert comp.best.stage_of == comp.plans[OURS]
    assert comp.bottlenecks()[OURS] == pytest.approx(comp.best.bottleneck_s)
    assert comp.bound.lower_s <= min(comp.bottlenecks().values()) * (1 + 1e-9)
    assert comp.plans[METIS] == repair(g, comp.metis_raw)
    too_many = compare_plans(g, 5)  # more stages than layers (4): the anchors say so, the others plan
    assert "layers" in too_many.errors["equal layers"] and OURS in too_many.plans
