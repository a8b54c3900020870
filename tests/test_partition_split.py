"""Operator-level Linear splits against the unsplit module (torch as the oracle)."""
import pytest
import torch
from hypothesis import assume, given, settings
from hypothesis import strategies as st
from torch import nn

from adaptive_kit.partition.graph import model_graph, trace
from adaptive_kit.partition.models import GPT, uneven_mlp
from adaptive_kit.partition.split import dominant_linears, split_linear


class Net(nn.Module):
    """A Linear between two other operations, so the split sits inside a graph."""

    def __init__(self, fin: int, fout: int, bias: bool):
        super().__init__()
        self.lin = nn.Linear(fin, fout, bias=bias)

    def forward(self, x):
        return torch.tanh(self.lin(x * 2.0)) + 1


def n_params(m):
    return sum(p.numel() for p in m.parameters())


@settings(max_examples=40, deadline=None)
@given(fin=st.integers(1, 9), fout=st.integers(1, 9), bias=st.booleans(), dim=st.sampled_from(["out", "in"]),
       data=st.data())
def test_split_computes_the_same_function_and_gradients(fin, fout, bias, dim, data):
    features = fout if dim == "out" else fin
    assume(features >= 2)
    parts = data.draw(st.integers(2, features), label="parts")
    torch.manual_seed(0)
    gm = trace(Net(fin, fout, bias))
    split = split_linear(gm, "lin", parts, dim=dim)
    x = torch.randn(3, 2, fin, requires_grad=True)
    x2 = x.detach().clone().requires_grad_(True)
    w = torch.randn(3, 2, fout)
    y, y2 = gm(x), split(x2)
    torch.testing.assert_close(y2, y, rtol=1e-5, atol=1e-6)
    (y * w).sum().backward()
    (y2 * w).sum().backward()
    torch.testing.assert_close(x2.grad, x.grad, rtol=1e-5, atol=1e-6)

    lin = gm.lin
    shards = [getattr(split, f"lin_shard{i}") for i in range(parts)]
    assert not hasattr(split, "lin") and hasattr(gm, "lin")  # a copy: the original is untouched
    widths = [s.out_features if dim == "out" else s.in_features for s in shards]
    assert sum(widths) == features and max(widths) - min(widths) <= 1 and min(widths) >= 1
    assert n_params(split) == n_params(gm)
    cat = 0 if dim == "out" else 1
    # the shards' weight gradients are the blocks of the original's
    torch.testing.assert_close(torch.cat([s.weight.grad for s in shards], dim=cat), lin.weight.grad,
                               rtol=1e-5, atol=1e-6)
    with_bias = [s for s in shards if s.bias is not None]
    if not bias:
        assert with_bias == []
    elif dim == "out":
        assert len(with_bias) == parts
        torch.testing.assert_close(torch.cat([s.bias.grad for s in shards]), lin.bias.grad)
    else:  # the row split adds the bias once
        assert with_bias == [shards[0]]
        torch.testing.assert_close(shards[0].bias.grad, lin.bias.grad)


def test_column_split_shards_hold_the_weight_blocks():
    torch.manual_seed(0)
    gm = trace(Net(4, 5, True))
    split = split_linear(gm, "lin", 2)
    a, b = split.lin_shard0, split.lin_shard1
    assert (a.out_features, b.out_features) == (2, 3)  # linspace(0, 5, 3) rounds to 0, 2, 5
    torch.testing.assert_close(torch.cat([a.weight, b.weight]), gm.lin.weight)
    ops = [n.target for n in split.graph.nodes if n.op == "call_function"]
    assert torch.cat in ops


def test_row_split_narrows_the_input_and_sums():
    gm = trace(Net(6, 3, True))
    split = split_linear(gm, "lin", 3, dim="in")
    ops = [n.target for n in split.graph.nodes if n.op == "call_function"]
    assert ops.count(torch.narrow) == 3 and ops.count(torch.add) == 2
    assert [getattr(split, f"lin_shard{i}").in_features for i in range(3)] == [2, 2, 2]


def test_a_nested_linear_in_a_gpt():
    torch.manual_seed(0)
    model = GPT(vocab=64, d=16, layers=1, heads=2, seq_len=8).eval()
    gm = trace(model)
    node = next(n.name for n in gm.graph.nodes if n.op == "call_module" and n.target == "blocks.0.qkv")
    ids = torch.randint(0, 64, (2, 8))
    for dim in ("out", "in"):
        split = split_linear(gm, node, 3, dim=dim)
        assert hasattr(split, "blocks_0_qkv_shard2")
        with torch.no_grad():
            torch.testing.assert_close(split(ids), model(ids), rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize(("node", "parts", "dim", "match"), [
    ("nope", 2, "out", "no node 'nope'"),
    ("tanh", 2, "out", "node 'tanh' does not call an nn.Linear"),
    ("mul", 2, "out", "node 'mul' does not call an nn.Linear"),
    ("lin", 1, "out", r"parts must be an int in \[2, 6\] for 'lin', got 1"),
    ("lin", 7, "out", r"parts must be an int in \[2, 6\] for 'lin', got 7"),
    ("lin", 5, "in", r"parts must be an int in \[2, 4\] for 'lin', got 5"),
    ("lin", 2.0, "out", "got 2.0"),
    ("lin", True, "out", "got True"),
    ("lin", 2, "x", "dim must be 'out' .* or 'in' .*, got 'x'"),
])
def test_bad_input_names_the_value(node, parts, dim, match):
    gm = trace(Net(4, 6, True))
    with pytest.raises(ValueError, match=match):
        split_linear(gm, node, parts, dim=dim)


def test_non_linear_module_is_rejected():
    gm = trace(nn.Sequential(nn.Linear(4, 4), nn.LayerNorm(4)))
    with pytest.raises(ValueError, match="node '_1' does not call an nn.Linear"):
        split_linear(gm, "_1", 2)


class Shared(nn.Module):
    """One Linear called twice: fx makes two nodes (``lin``, ``lin_1``) with the same target."""

    def __init__(self):
        super().__init__()
        self.lin = nn.Linear(4, 4)

    def forward(self, x):
        return self.lin(torch.relu(self.lin(x)))


def test_splitting_one_call_of_a_shared_linear_keeps_the_other():
    torch.manual_seed(0)
    gm = trace(Shared())
    x = torch.randn(3, 4)
    try:
        split = split_linear(gm, "lin", 2)
    except RuntimeError as e:
        raise AssertionError("split_linear deleted the submodule 'lin' that node 'lin_1' still "
                             f"calls: {e}") from e
    torch.testing.assert_close(split(x), gm(x))


def test_dominant_linears_finds_the_gpt_head():
    torch.manual_seed(0)
    model = GPT(vocab=2048, d=32, layers=2, heads=2, seq_len=16)
    gm = trace(model)
    g = model_graph(gm, torch.randint(0, 2048, (2, 16)), reps=0)
    total = sum(d["flops"] for _, d in g.nodes(data=True))
    head = g.nodes["head"]["flops"]
    assert head > total / 2
    found = dominant_linears(gm, g, 4, cost="flops")
    # enough shards that each is at most half a fair share: ceil(2 * head / (total / 4))
    assert list(found) == ["head"]
    parts = found["head"]
    assert head / parts <= 0.5 * total / 4 < head / (parts - 1)
    # a looser share finds nothing; one stage has no fair share to exceed
    assert dominant_linears(gm, g, 4, cost="flops", share=4.0) == {}
    assert dominant_linears(gm, g, 1, cost="flops") == {}


@pytest.mark.parametrize("k", [2, 4])
def test_dominant_linears_on_a_balanced_mlp_finds_nothing(k):
    mlp = uneven_mlp([32] * 5)  # four equal Linears
    gm = trace(mlp)
    g = model_graph(gm, torch.randn(8, 32), reps=0)
    assert dominant_linears(gm, g, k, cost="flops") == {}


def test_dominant_linears_on_a_bulging_mlp():
    # Linears of 1, 4, 4, 1 units of work: the fair share at k=4 is 2.5 units
    gm = trace(uneven_mlp([32, 32, 128, 32, 32]))
    g = model_graph(gm, torch.randn(8, 32), reps=0)
    assert dominant_linears(gm, g, 4, cost="flops") == {"_2": 4, "_4": 4}  # ceil(2 * 4 / 2.5)


def test_dominant_linears_suggests_only_splits_the_linear_allows():
    # one Linear with 3 output features is all the FLOPs: 8 shards would bring it to half a fair
    # share at k=4, but split_linear accepts at most 3
    gm = trace(nn.Sequential(nn.ReLU(), nn.Tanh(), nn.Sigmoid(), nn.Linear(1024, 3)))
    g = model_graph(gm, torch.randn(8, 1024), reps=0)
    found = dominant_linears(gm, g, 4, cost="flops")
    assert list(found) == ["_3"]
    assert 2 <= found["_3"] <= 3, (f"dominant_linears asked for {found['_3']} shards of a Linear "
                                   "with 3 output features; split_linear rejects that")
    split_linear(gm, "_3", found["_3"])
