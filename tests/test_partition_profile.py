"""Batch profiles against hand counts, and the cost model on graphs with known coefficients."""
import networkx as nx
import numpy as np
import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

from adaptive_kit.partition.graph import model_graph
from adaptive_kit.partition.models import uneven_mlp
from adaptive_kit.partition.profile import BatchProfile, CostModel, profile_batch


def test_token_ids_with_padding():
    ids = torch.tensor([[5, 6, 7, 0, 0],
                        [8, 0, 9, 0, 0],  # padding before the last real token counts
                        [1, 2, 3, 4, 0],
                        [0, 0, 0, 0, 0]])  # nothing real
    p = profile_batch(ids, pad_id=0)
    assert (p.rows, p.seq_len, p.tokens) == (4, 4, 10)  # lengths 3, 3, 4, 0
    assert (p.elements, p.bytes, p.dtype) == (20, 160, "int64")
    assert p.sparsity == pytest.approx(11 / 20) and p.work == 10.0
    full = profile_batch(ids)  # without pad_id every position is a token
    assert (full.seq_len, full.tokens) == (5, 20)
    assert profile_batch(ids, pad_id=99).tokens == 20  # a pad id that never occurs
    assert profile_batch([ids.int(), torch.randn(3)], pad_id=0).bytes == 80  # the first tensor


@settings(max_examples=50, deadline=None)
@given(st.integers(1, 6), st.integers(1, 8), st.integers(0, 2 ** 32 - 1))
def test_token_counts_match_a_row_by_row_count(rows, seq, seed):
    g = torch.Generator().manual_seed(seed)
    ids = torch.randint(0, 3, (rows, seq), generator=g)  # pad id 0 everywhere, often at the end
    p = profile_batch(ids, pad_id=0)
    lengths = [max((i + 1 for i, t in enumerate(row) if t != 0), default=0) for row in ids.tolist()]
    assert p.tokens == sum(lengths) and p.seq_len == max(lengths) and p.rows == rows
    assert p.sparsity == pytest.approx((ids == 0).float().mean().item())


def test_other_inputs_count_rows():
    x = torch.zeros(8, 3)
    x[:2] = 1.0
    p = profile_batch(x)
    assert (p.rows, p.seq_len, p.tokens, p.work) == (8, 1, 8, 8.0)
    assert (p.elements, p.bytes, p.dtype) == (24, 96, "float32")
    assert p.sparsity == pytest.approx(18 / 24)
    img = torch.ones(2, 3, 4, 4, dtype=torch.uint8)  # integer but not (rows, seq)
    q = profile_batch(img, pad_id=0)
    assert (q.rows, q.seq_len, q.tokens, q.bytes, q.dtype, q.sparsity) == (2, 1, 2, 96, "uint8", 0.0)
    h = profile_batch(torch.randn(5, 7, dtype=torch.float16))  # floats (rows, features): no sequence
    assert (h.tokens, h.seq_len, h.bytes) == (5, 1, 70)


@pytest.mark.parametrize("batch", [torch.empty(0, 5, dtype=torch.long), torch.empty(0), torch.tensor(3.0)])
def test_empty_or_scalar_batch_raises(batch):
    with pytest.raises(ValueError, match="leading dimension > 0"):
        profile_batch(batch)


def test_an_empty_sequence_of_tensors_raises_value_error():
    try:
        profile_batch([])
    except ValueError:
        return
    except IndexError as e:
        raise AssertionError("profile_batch([]) raised IndexError instead of the documented "
                             "ValueError for an empty batch") from e
    raise AssertionError("profile_batch([]) did not raise")


def synthetic(a=2e-4, b=3e-9, c=5e-8, d=0.0, n=30, seed=0):
    """A graph whose node times are exactly a + b * flops + c * act_bytes + d * param_bytes."""
    rng = np.random.default_rng(seed)
    g = nx.DiGraph()
    for i in range(n):
        f, act, par = rng.uniform(0, 1e6), rng.uniform(0, 1e4), rng.uniform(0, 1e5)
        g.add_node(i, flops=f, act_bytes=act, param_bytes=par, time_s=a + b * f + c * act + d * par)
        if i:
            g.add_edge(i - 1, i)
    return g


@pytest.mark.parametrize(("a", "b", "c", "d"), [(2e-4, 3e-9, 5e-8, 0.0), (1e-5, 1e-9, 0.0, 2e-8),
                                                (0.0, 4e-9, 1e-7, 1e-8)])
def test_fit_recovers_known_coefficients(a, b, c, d):
    g = synthetic(a, b, c, d)
    cm = CostModel.fit(g, reference=16.0)
    assert cm.r2 == pytest.approx(1.0, abs=1e-9)
    got = (cm.overhead_s, cm.s_per_flop, cm.s_per_act_byte, cm.s_per_param_byte)
    np.testing.assert_allclose(got, (a, b, c, d), rtol=1e-6, atol=1e-12)
    assert cm.reference == 16.0
    pred = cm.predict(g)
    np.testing.assert_allclose([pred[v] for v in g], [g.nodes[v]["time_s"] for v in g], rtol=1e-8)


def test_fit_never_gives_negative_rates():
    g = synthetic(d=0.0)
    for v in g:  # times that fall with activation size: least squares would give c < 0
        g.nodes[v]["time_s"] = max(1e-3 - 1e-7 * g.nodes[v]["act_bytes"], 1e-6) + 1e-9 * g.nodes[v]["flops"]
    cm = CostModel.fit(g)
    assert min(cm.overhead_s, cm.s_per_flop, cm.s_per_act_byte, cm.s_per_param_byte) >= 0
    assert cm.r2 < 1


def test_predict_scales_compute_with_the_batch_work():
    a, b, c, d = 1e-4, 2e-9, 3e-8, 4e-9
    g = synthetic(a, b, c, d)
    ids = torch.ones(4, 8, dtype=torch.long)
    cm = CostModel.fit(g, reference=profile_batch(ids))
    assert cm.reference == 32.0
    double = cm.predict(g, profile_batch(torch.ones(8, 8, dtype=torch.long)))
    half = cm.predict(g, 16.0)
    for v, n in g.nodes(data=True):
        work = b * n["flops"] + c * n["act_bytes"]
        fixed = a + d * n["param_bytes"]  # overhead and parameter traffic do not scale
        assert double[v] == pytest.approx(fixed + 2 * work, rel=1e-6)
        assert half[v] == pytest.approx(fixed + 0.5 * work, rel=1e-6)
    assert cm.annotate(g, 64.0, key="big") is g
    assert [g.nodes[v]["big"] for v in g] == pytest.approx([double[v] for v in g])


def test_fit_without_measured_times_raises():
    g = model_graph(uneven_mlp([4, 8, 2]), torch.randn(2, 4), reps=0)
    with pytest.raises(ValueError, match="no node has a measured 'time_s' > 0"):
        CostModel.fit(g)
    with pytest.raises(ValueError, match="'other'"):
        CostModel.fit(synthetic(), measured="other")


def test_stage_seconds_sums_each_stage():
    g = synthetic(n=6)
    cm = CostModel.fit(g)
    stage_of = {0: 0, 1: 0, 2: 1, 3: 2, 4: 2, 5: 2}
    t = [g.nodes[v]["time_s"] for v in range(6)]
    out = cm.stage_seconds(g, stage_of, 3)
    np.testing.assert_allclose(out, [t[0] + t[1], t[2], t[3] + t[4] + t[5]], rtol=1e-8)
    assert out.sum() == pytest.approx(sum(cm.predict(g).values()))
    np.testing.assert_allclose(cm.stage_seconds(g, stage_of, 4), [*out, 0.0], rtol=1e-8)


def test_work_is_tokens():
    assert BatchProfile(2, 5, 7, 10, 80, "int64", 0.0).work == 7.0
