"""adaptive_kit.stats against numpy float64 oracles."""
from __future__ import annotations

import math

import hypothesis.extra.numpy as hnp
import numpy as np
import pandas as pd
import pytest
import torch
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from torch import nn

from adaptive_kit.stats import (
    CHUNK,
    EMA,
    SAMPLE,
    SMALL,
    STAT_INDEX,
    STAT_NAMES,
    HostCopy,
    batched_stats,
    fast_stats,
    layer_stats,
    module_tensors,
    small_stats,
    tensor_stats,
)

SETTINGS = settings(
    max_examples=60,
    deadline=None,
    suppress_health_check=[HealthCheck.too_slow, HealthCheck.data_too_large],
)
DTYPES = [torch.float16, torch.bfloat16, torch.float32, torch.float64, torch.int64, torch.bool]
SPECIALS = [math.nan, math.inf, -math.inf, 0.0, -0.0]
# Relative tolerance (to the layer's largest finite magnitude) of the accumulation dtype. The
# oracle sees the values *after* the cast to the input dtype, so input rounding is not an error.
TOL = {torch.float32: 2e-6, torch.float64: 1e-13}


# ------------------------------------------------------------------------------------ oracle
def oracle(group: list[torch.Tensor]) -> np.ndarray:
    """The 8 statistics of one layer, in float64 numpy."""
    flat = [t.detach().to(torch.float64).reshape(-1).numpy() for t in group]
    vals = np.concatenate(flat) if flat else np.empty(0)
    fin = vals[np.isfinite(vals)]
    n, k = vals.size, fin.size
    out = np.full(len(STAT_NAMES), np.nan)
    out[STAT_INDEX["count"]] = n
    out[STAT_INDEX["nonfinite"]] = n - k
    out[STAT_INDEX["norm"]] = math.sqrt(float(np.sum(fin * fin)))  # 0 when k == 0
    if k:
        out[STAT_INDEX["mean"]] = fin.mean()
        out[STAT_INDEX["std"]] = fin.std()  # ddof=0
        out[STAT_INDEX["min"]] = fin.min()
        out[STAT_INDEX["max"]] = fin.max()
    if n:
        out[STAT_INDEX["zero_frac"]] = np.count_nonzero(vals == 0) / n
    return out


def as_group(layer: torch.Tensor | list[torch.Tensor]) -> list[torch.Tensor]:
    return [layer] if isinstance(layer, torch.Tensor) else list(layer)


def acc_dtype(layers) -> torch.dtype:
    any64 = any(t.dtype == torch.float64 for layer in layers for t in as_group(layer))
    return torch.float64 if any64 else torch.float32


def assert_matches_oracle(got: torch.Tensor, layers, acc: torch.dtype) -> None:
    got = got.numpy()
    tol = TOL[acc]
    for i, layer in enumerate(layers):
        exp = oracle(as_group(layer))
        row = got[i]
        where = f"layer {i}: got {dict(zip(STAT_NAMES, row))}, expected {dict(zip(STAT_NAMES, exp))}"
        # exact: counts, zero fraction (integer ratio) and min/max (the cast to acc is exact)
        for name in ("count", "nonfinite", "zero_frac", "min", "max"):
            j = STAT_INDEX[name]
            np.testing.assert_array_equal(row[j], exp[j], err_msg=f"{name}: {where}")
        fin_abs = [abs(exp[STAT_INDEX["min"]]), abs(exp[STAT_INDEX["max"]])]
        scale = max(fin_abs) if not np.isnan(fin_abs).any() else 0.0
        for name in ("mean", "std"):
            j = STAT_INDEX[name]
            np.testing.assert_allclose(
                row[j], exp[j], rtol=0, atol=tol * scale + 1e-300, equal_nan=True,
                err_msg=f"{name}: {where}",
            )
        j = STAT_INDEX["norm"]
        np.testing.assert_allclose(row[j], exp[j], rtol=tol, atol=0, err_msg=f"norm: {where}")


# -------------------------------------------------------------------------------- strategies
# Magnitudes in [1e-6, 1e3] or exactly zero: float32 sums of squares neither under- nor overflow.
finite_floats = st.floats(min_value=-1e3, max_value=1e3, allow_nan=False).map(
    lambda v: 0.0 if abs(v) < 1e-6 else v
)


@st.composite
def tensors(draw) -> torch.Tensor:
    dtype = draw(st.sampled_from(DTYPES))
    shape = draw(hnp.array_shapes(min_dims=0, max_dims=3, min_side=0, max_side=7))
    n = math.prod(shape)
    if dtype == torch.bool:
        arr = np.array(draw(st.lists(st.booleans(), min_size=n, max_size=n)), dtype=bool)
    elif dtype == torch.int64:
        ints = st.integers(-(10**6), 10**6)  # exact in float32
        arr = np.array(draw(st.lists(ints, min_size=n, max_size=n)), dtype=np.int64)
    else:
        elems = st.one_of(st.sampled_from(SPECIALS), finite_floats)
        arr = np.array(draw(st.lists(elems, min_size=n, max_size=n)), dtype=np.float64)
    return torch.from_numpy(arr.reshape(shape)).to(dtype)


layers_strategy = st.one_of(tensors(), st.lists(tensors(), min_size=0, max_size=3))


# ----------------------------------------------------------------------------- batched_stats
@SETTINGS
@given(layers=st.lists(layers_strategy, min_size=1, max_size=6), as_mapping=st.booleans())
def test_batched_stats_matches_numpy_oracle(layers, as_mapping):
    arg = {f"layer{i}": layer for i, layer in enumerate(layers)} if as_mapping else layers
    got = batched_stats(arg)
    assert got.dtype == torch.float64
    assert got.shape == (len(layers), len(STAT_NAMES))
    assert got.device.type == "cpu"
    assert_matches_oracle(got, layers, acc_dtype(layers))


def test_special_values_by_hand():
    nan, inf = math.nan, math.inf
    got = batched_stats(
        [
            torch.tensor([nan, inf, -inf]),  # no finite entry
            torch.empty(0),  # empty
            torch.tensor([0.0, -0.0, 3.0, -4.0, nan]),
            [torch.tensor([True, False]), torch.tensor([2, 0])],  # group of bool + int64
        ]
    ).numpy()
    nn_ = np.nan
    expected = np.array(
        [
            [3, nn_, nn_, nn_, nn_, 0.0, 3, 0.0],
            [0, nn_, nn_, nn_, nn_, 0.0, 0, nn_],
            [5, -0.25, math.sqrt(6.1875), -4.0, 3.0, 5.0, 1, 0.4],
            [4, 0.75, math.sqrt(0.6875), 0.0, 2.0, math.sqrt(5.0), 0, 0.5],
        ]
    )
    np.testing.assert_allclose(got, expected, rtol=1e-6, equal_nan=True)


@pytest.mark.parametrize(
    ("dtype", "offset", "noise", "rtol"),
    [(torch.float32, 1e4, 1e-2, 1e-2), (torch.float64, 1e8, 1.0, 1e-7)],
)
def test_std_accurate_under_large_offset(dtype, offset, noise, rtol):
    gen = torch.Generator().manual_seed(0)
    x = (offset + noise * torch.randn(10_000, generator=gen, dtype=torch.float64)).to(dtype)
    exp = x.double().numpy().std()
    got = batched_stats([x])[0]
    assert got[STAT_INDEX["std"]].item() == pytest.approx(exp, rel=rtol)
    # the one-pass formula E[x^2] - E[x]^2 in the same dtype loses the noise entirely
    naive = (x.pow(2).mean() - x.mean() ** 2).clamp(min=0).sqrt().item()
    assert abs(naive - exp) > 10 * rtol * exp


@pytest.mark.parametrize("n", [CHUNK, CHUNK + 1, 3 * CHUNK + 5, 4 * CHUNK])
def test_layers_longer_than_a_chunk(n):
    gen = torch.Generator().manual_seed(n)
    long = 5.0 + torch.randn(n, generator=gen)
    long[::7] = 0.0
    long[CHUNK - 1] = math.nan  # last entry of the first row
    if n > 2 * CHUNK:
        long[CHUNK : 2 * CHUNK] = math.nan  # a whole row without a finite entry inside a layer
    layers = [torch.randn(3, generator=gen), long, torch.randn(CHUNK - 1, generator=gen), long[:1]]
    got = batched_stats(layers)
    assert_matches_oracle(got, layers, torch.float32)
    assert got[1, STAT_INDEX["count"]].item() == n


def test_mapping_and_sequence_agree():
    a, b = torch.randn(4, 3), [torch.randn(5), torch.tensor([1, 0])]
    by_name = batched_stats({"a": a, "b": b})
    by_pos = batched_stats([a, b])
    torch.testing.assert_close(by_name, by_pos, rtol=0, atol=0)


def test_output_on_the_input_device():
    # the meta device stands in for an accelerator: nothing may be moved to the CPU
    got = batched_stats({"x": torch.empty(300, device="meta"), "y": [torch.empty(2, 2, device="meta")]})
    assert got.device.type == "meta"
    assert got.dtype == torch.float64 and got.shape == (2, 8)


@pytest.mark.parametrize("empty", [[], {}])
def test_no_layers_raises(empty):
    with pytest.raises(ValueError, match="at least one layer"):
        batched_stats(empty)


@pytest.mark.parametrize("bad", [3, None, "x", np.zeros(2)])
def test_non_tensor_raises_naming_the_key(bad):
    with pytest.raises(TypeError, match="'conv1'"):
        batched_stats({"ok": torch.zeros(2), "conv1": bad})
    with pytest.raises(TypeError, match="'conv1'"):
        batched_stats({"ok": torch.zeros(2), "conv1": [torch.zeros(2), bad]})


def test_non_tensor_in_a_sequence_names_the_index():
    with pytest.raises(TypeError, match=r"tensors\[1\].*float"):
        batched_stats([torch.zeros(2), [1.0, 2.0]])


def test_complex_raises():
    with pytest.raises(TypeError, match=r"'z'.*complex"):
        batched_stats({"z": torch.zeros(3, dtype=torch.complex64)})


def test_mixed_devices_raise():
    with pytest.raises(ValueError, match="several devices"):
        batched_stats([torch.zeros(2), torch.zeros(2, device="meta")])


def test_inputs_are_not_modified_and_grad_is_not_tracked():
    x = torch.tensor([1.0, math.nan, 3.0], requires_grad=True)
    before = x.detach().clone()
    out = batched_stats([x])
    assert not out.requires_grad
    torch.testing.assert_close(x.detach(), before, equal_nan=True)


# ---------------------------------------------------------------------------------- HostCopy
def test_host_copy_on_cpu_is_an_independent_snapshot():
    src = torch.arange(6, dtype=torch.float64).reshape(2, 3)
    copy = HostCopy(src)
    assert copy.ready()
    src += 100.0
    src[0, 0] = -1.0
    host = copy.wait()
    torch.testing.assert_close(host, torch.arange(6, dtype=torch.float64).reshape(2, 3))
    assert host.data_ptr() != src.data_ptr()
    assert copy.ready()


# ---------------------------------------------------------------------------- module_tensors
class _Net(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.scale = nn.Parameter(torch.ones(1))  # a top-level parameter: key is its own name
        self.body = nn.Sequential(nn.Linear(3, 4), nn.ReLU(), nn.Linear(4, 2))
        self.frozen = nn.Linear(2, 2)
        self.frozen.requires_grad_(False)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.frozen(self.body(x) * self.scale)


@pytest.fixture
def net() -> _Net:
    torch.manual_seed(0)
    model = _Net()
    model(torch.randn(5, 3)).pow(2).sum().backward()
    return model


def test_module_tensors_groups_grads_per_module(net):
    out = module_tensors(net)
    assert list(out) == ["scale", "body.0", "body.2"]  # frozen: no grad, skipped
    assert out["scale"][0] is net.scale.grad
    assert out["body.0"][0] is net.body[0].weight.grad and out["body.0"][1] is net.body[0].bias.grad
    assert len(out["body.2"]) == 2


def test_module_tensors_per_parameter_and_weights(net):
    per_param = module_tensors(net, by="parameter")
    assert list(per_param) == ["scale", "body.0.weight", "body.0.bias", "body.2.weight", "body.2.bias"]
    assert all(len(v) == 1 for v in per_param.values())
    weights = module_tensors(net, kind="weight")
    assert list(weights) == ["scale", "body.0", "body.2", "frozen"]
    assert weights["frozen"][0] is net.frozen.weight


def test_module_tensors_before_backward_is_empty():
    assert module_tensors(nn.Linear(2, 2)) == {}


@pytest.mark.parametrize(("kwargs", "value"), [({"kind": "grads"}, "'grads'"), ({"by": "layer"}, "'layer'")])
def test_module_tensors_rejects_bad_options(net, kwargs, value):
    with pytest.raises(ValueError, match=value):
        module_tensors(net, **kwargs)


# ------------------------------------------------------------------------------- layer_stats
def test_layer_stats_frame(net):
    tensors = module_tensors(net)
    frame = layer_stats(tensors)
    assert isinstance(frame, pd.DataFrame)
    assert frame.index.name == "layer" and list(frame.index) == list(tensors)
    assert list(frame.columns) == list(STAT_NAMES)
    assert frame["count"].dtype == np.int64 and frame["nonfinite"].dtype == np.int64
    assert frame.loc["body.0", "count"] == 3 * 4 + 4
    np.testing.assert_allclose(frame.to_numpy(dtype=np.float64), batched_stats(tensors).numpy())
    grads = torch.cat([net.body[2].weight.grad.reshape(-1), net.body[2].bias.grad])
    assert frame.loc["body.2", "norm"] == pytest.approx(grads.norm().item(), rel=1e-6)


# --------------------------------------------------------------------------------------- EMA
@SETTINGS
@given(
    beta=st.floats(min_value=0.0, max_value=0.99),
    seq=st.lists(st.floats(-1e6, 1e6, allow_nan=False), min_size=1, max_size=30),
)
def test_ema_matches_pandas_ewm_mean_and_wests_variance(beta, seq):
    ema = EMA(beta)
    means = [ema.update(x) for x in seq]
    # oracle: pandas' recursive EWM (adjust=False) starts at the first value, as EMA does
    expected = pd.Series(seq).ewm(alpha=1 - beta, adjust=False).mean().to_numpy() if beta < 1 else None
    np.testing.assert_allclose(means, expected, rtol=1e-9, atol=1e-6)
    var, m = 0.0, seq[0]  # West's weighted variance, written out
    for x in seq[1:]:
        d = x - m
        m += (1 - beta) * d
        var = beta * (var + (1 - beta) * d * d)
    assert ema.var == pytest.approx(var, rel=1e-9, abs=1e-6) and ema.n == len(seq)


def test_ema_of_a_constant_is_the_constant_from_step_one():
    ema = EMA(0.9)
    assert [ema.update(7.0) for _ in range(3)] == [7.0, 7.0, 7.0] and ema.var == 0.0


@pytest.mark.parametrize("beta", [-0.1, 1.0, 1.5, math.nan, True])
def test_ema_rejects_bad_beta(beta):
    with pytest.raises(ValueError, match="EMA.beta"):
        EMA(beta)


# ------------------------------------------------------------- fast_stats, tensor_stats (CPU)
def sample_of(v: np.ndarray, cap: int = SAMPLE) -> np.ndarray:
    return v[:: math.ceil(v.size / cap)] if v.size > cap else v


def fast_oracle(t: torch.Tensor, moments: bool, extrema: bool, cap: int) -> np.ndarray:
    """What fast_stats documents: exact counts and norm; mean and std exact with ``moments``
    (else the sample's mean); extremes exact with ``extrema`` (else the sample's); zero_frac of
    the sample; every statistic exact where the tensor holds a NaN / Inf."""
    exp = oracle([t])
    if exp[STAT_INDEX["nonfinite"]] or t.numel() == 0:
        return exp
    v = t.detach().to(torch.float64).reshape(-1).numpy()
    smp = sample_of(v, cap)
    exp[STAT_INDEX["zero_frac"]] = np.mean(smp == 0)
    if not extrema:
        exp[STAT_INDEX["min"]], exp[STAT_INDEX["max"]] = smp.min(), smp.max()
    if not moments and smp.size < v.size:
        m, sq = smp.mean(), float(np.mean(v * v))
        exp[STAT_INDEX["mean"]] = m
        exp[STAT_INDEX["std"]] = math.sqrt(sq - m * m if sq - m * m >= sq / 16 else smp.var())
    return exp


def assert_close_row(got, exp, where: str) -> None:
    for name in ("count", "nonfinite"):
        assert got[STAT_INDEX[name]] == exp[STAT_INDEX[name]], f"{name}: {where}"
    mag = np.abs(exp[[STAT_INDEX["min"], STAT_INDEX["max"]]])
    scale = float(np.nanmax(mag)) if np.isfinite(mag).any() else 0.0
    np.testing.assert_allclose(got, exp, rtol=2e-5, atol=2e-5 * scale + 1e-30, equal_nan=True, err_msg=where)


big_arrays = st.tuples(
    st.sampled_from([torch.float16, torch.bfloat16, torch.float32, torch.float64, torch.int64]),
    st.sampled_from([(1,), (7,), (5, 3), (SMALL + 1,), (3, 2000), (64, 130), (2, 3, 40, 50)]),
    st.floats(-3.0, 3.0),  # offset (in units of the spread): near-constant tensors too
    st.sampled_from([0.0, 0.3, 1.0]),  # fraction of exact zeros
    st.lists(st.tuples(st.floats(0, 1, exclude_max=True), st.sampled_from(SPECIALS[:3])), max_size=3),
    st.integers(0, 2**16),
)


def make_tensor(case) -> torch.Tensor:
    dtype, shape, offset, zeros, specials, seed = case
    gen = torch.Generator().manual_seed(seed)
    x = torch.randn(shape, generator=gen, dtype=torch.float64) + 10 ** offset
    x = torch.where(torch.rand(shape, generator=gen, dtype=torch.float64) < zeros, 0.0, x)
    flat = x.reshape(-1)
    for pos, value in specials:  # anywhere, sampled or not
        flat[int(pos * flat.numel())] = value
    if dtype == torch.int64:
        return (x * 100).nan_to_num(0.0, 0.0, 0.0).to(torch.int64)
    return x.to(dtype)


@SETTINGS
@given(case=big_arrays, moments=st.booleans(), extrema=st.booleans(), cap=st.sampled_from([1, 64, SAMPLE]))
def test_fast_stats_matches_its_documented_oracle(case, moments, extrema, cap):
    t = make_tensor(case)
    got = np.array(fast_stats(t, extrema=extrema, sample=cap, moments=moments))
    exp = fast_oracle(t.to(torch.float64) if t.dtype != torch.float32 else t, moments, extrema, cap)
    assert_close_row(got, exp, f"{t.dtype} {tuple(t.shape)}")
    # a single NaN / Inf anywhere is counted exactly, whatever the sample
    assert got[STAT_INDEX["nonfinite"]] == (~torch.isfinite(t.double())).sum().item()


@SETTINGS
@given(cases=st.lists(big_arrays, min_size=1, max_size=5), extrema=st.booleans())
def test_tensor_stats_rows_are_fast_stats_rows_small_tensors_exact(cases, extrema):
    ts = [make_tensor(c) for c in cases]
    got = tensor_stats(ts, extrema=extrema)
    assert got.shape == (len(ts), len(STAT_NAMES)) and got.dtype == torch.float64
    for i, t in enumerate(ts):
        if t.numel() <= SMALL:  # exact, as batched_stats (float64 here: tighter than float32)
            assert_close_row(got[i].numpy(), oracle([t]), f"small {i}")
        else:
            exp = fast_oracle(t, True, extrema, SAMPLE)
            assert_close_row(got[i].numpy(), exp, f"large {i}")


def test_fast_stats_precise_std_of_a_near_constant_tensor():
    gen = torch.Generator().manual_seed(0)
    x = (1e4 + 1e-2 * torch.randn(100_000, generator=gen, dtype=torch.float64)).float()
    row = fast_stats(x)
    exp = x.double().numpy().std()
    assert row[STAT_INDEX["std"]] == pytest.approx(exp, rel=1e-2)  # float32 input rounding: 1e-3 of 1e4


def test_fast_stats_rejects_other_devices_and_bad_samples():
    with pytest.raises(ValueError, match="meta"):
        fast_stats(torch.empty(3, device="meta"))
    for bad in (0, -1, 2.0, True):
        with pytest.raises(ValueError, match=rf"sample\) must be an int >= 1, got {bad!r}"):
            fast_stats(torch.ones(3), sample=bad)
    with pytest.raises(ValueError, match="at least one tensor"):
        tensor_stats([])


def test_tensor_stats_off_the_cpu_is_batched_stats():
    got = tensor_stats([torch.empty(300, device="meta"), torch.empty(2, 2, device="meta")])
    assert got.device.type == "meta" and got.shape == (2, 8)


def test_small_stats_equals_the_numpy_oracle_with_specials():
    nan, inf = math.nan, math.inf
    ts = [torch.tensor([nan, inf, -inf]), torch.empty(0), torch.tensor([0.0, -0.0, 3.0, -4.0, nan]),
          torch.tensor([True, False]), 1e4 + torch.arange(5.0) * 1e-3]
    got = small_stats(ts)
    for i, t in enumerate(ts):
        np.testing.assert_allclose(got[i], oracle([t]), rtol=1e-9, atol=1e-12, equal_nan=True, err_msg=str(i))
