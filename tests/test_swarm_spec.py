"""Swarm member specs: validation, the search space (sample / perturb / crossover), the
builder and parameter count, and the similarity measure."""
import math

import numpy as np
import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st
from torch import nn

from adaptive_kit.swarm import (
    HPARAMS,
    Layer,
    MemberSpec,
    SearchSpace,
    Similarity,
    SpecError,
    build_model,
    n_parameters,
)

CONV_SPACE = SearchSpace(depth=(0, 4), widths=(4, 8, 16), kinds=("conv", "linear"),
                         activations=("relu", "tanh", "gelu"), batch_size=(16, 32, 64))


def in_space(spec: MemberSpec, space: SearchSpace) -> None:
    """Every field of ``spec`` lies in ``space``."""
    assert space.depth[0] <= len(spec.layers) <= space.depth[1]
    for layer in spec.layers:
        assert layer.width in space.widths and layer.kind in space.kinds and layer.activation in space.activations
    kinds = [layer.kind for layer in spec.layers]
    assert kinds == sorted(kinds, key=lambda k: k != "conv")  # conv first
    assert space.lr[0] <= spec.lr <= space.lr[1]
    assert space.momentum[0] <= spec.momentum <= space.momentum[1] and spec.momentum < 1
    assert space.weight_decay[0] <= spec.weight_decay <= space.weight_decay[1]
    assert spec.batch_size in space.batch_size


# --- validation ----------------------------------------------------------------------------------

@pytest.mark.parametrize("make, field, value", [
    (lambda: Layer("linear", 0), "Layer.width", "0"),
    (lambda: Layer("linear", -3), "Layer.width", "-3"),
    (lambda: Layer("linear", 2.5), "Layer.width", "2.5"),
    (lambda: Layer("rnn", 8), "Layer.kind", "'rnn'"),
    (lambda: Layer("linear", 8, "sigmoid"), "Layer.activation", "'sigmoid'"),
    (lambda: MemberSpec((Layer("linear", 8), Layer("conv", 4))), "MemberSpec.layers", "linear8/relu-conv4/relu"),
    (lambda: MemberSpec((Layer("conv", 4), Layer("linear", 8), Layer("conv", 4))), "MemberSpec.layers", "conv4"),
    (lambda: MemberSpec(lr=0.0), "MemberSpec.lr", "0.0"),
    (lambda: MemberSpec(lr=-0.1), "MemberSpec.lr", "-0.1"),
    (lambda: MemberSpec(lr=float("nan")), "MemberSpec.lr", "nan"),
    (lambda: MemberSpec(momentum=1), "MemberSpec.momentum", "1"),
    (lambda: MemberSpec(momentum=-0.1), "MemberSpec.momentum", "-0.1"),
    (lambda: MemberSpec(weight_decay=-1e-3), "MemberSpec.weight_decay", "-0.001"),
    (lambda: MemberSpec(batch_size=0), "MemberSpec.batch_size", "0"),
    (lambda: MemberSpec(batch_size=True), "MemberSpec.batch_size", "True"),
    (lambda: MemberSpec(layers=("linear",)), "MemberSpec.layers[0]", "'linear'"),
])
def test_invalid_specs_raise_naming_field_and_value(make, field, value):
    with pytest.raises(SpecError) as e:
        make()
    assert field in str(e.value) and value in str(e.value)


@pytest.mark.parametrize("kwargs, field", [
    ({"widths": ()}, "SearchSpace.widths"),
    ({"kinds": ()}, "SearchSpace.kinds"),
    ({"activations": ()}, "SearchSpace.activations"),
    ({"batch_size": ()}, "SearchSpace.batch_size"),
    ({"lr": (1.0, 0.1)}, "SearchSpace.lr=(1.0, 0.1)"),
    ({"lr": (0.0, 0.1)}, "SearchSpace.lr=(0.0, 0.1)"),
    ({"weight_decay": (1e-2, 1e-6)}, "SearchSpace.weight_decay"),
    ({"depth": (3, 1)}, "SearchSpace.depth=(3, 1)"),
    ({"depth": (-1, 1)}, "SearchSpace.depth[0]"),
    ({"momentum": (0.5, 1.0)}, "SearchSpace.momentum=(0.5, 1.0)"),
    ({"widths": (8, 0)}, "SearchSpace.widths"),
    ({"kinds": ("linear", "rnn")}, "'rnn'"),
    ({"activations": ("relu", "swish")}, "'swish'"),
    ({"grid_points": 1}, "SearchSpace.grid_points"),
])
def test_empty_or_invalid_search_space_raises(kwargs, field):
    with pytest.raises(SpecError) as e:
        SearchSpace(**kwargs)
    assert field in str(e.value)


def test_perturb_rejects_bad_mode_and_rates():
    space, rng = SearchSpace(), np.random.default_rng(0)
    with pytest.raises(SpecError, match="mode='walk'"):
        space.perturb(MemberSpec(), rng, mode="walk")
    for name in ("rate", "resample", "arch_rate"):
        with pytest.raises(SpecError, match=f"{name}=1.5"):
            space.perturb(MemberSpec(), rng, **{name: 1.5})


def test_similarity_rejects_bad_weights():
    with pytest.raises(SpecError, match="not both 0"):
        Similarity(arch=0.0, hparams=0.0)
    with pytest.raises(SpecError, match="scales"):
        Similarity(scales=(1.0, 0.0, 1.0))


# --- builder -------------------------------------------------------------------------------------

def test_build_model_linear_shapes_and_activations():
    spec = MemberSpec((Layer("linear", 32, "tanh"), Layer("linear", 16, "gelu")))
    net = build_model(spec, 64, 10)
    linears = [m for m in net if isinstance(m, nn.Linear)]
    assert [(m.in_features, m.out_features) for m in linears] == [(64, 32), (32, 16), (16, 10)]
    assert [type(m) for m in net] == [nn.Linear, nn.Tanh, nn.Linear, nn.GELU, nn.Linear]
    assert net(torch.randn(5, 64)).shape == (5, 10)
    assert build_model(MemberSpec(layers=()), 7, 3)(torch.randn(2, 7)).shape == (2, 3)  # no hidden layer


def test_build_model_conv_shapes_and_image_shape_required():
    spec = MemberSpec((Layer("conv", 4), Layer("conv", 6, "tanh"), Layer("linear", 12)))
    net = build_model(spec, 64, 10, image_shape=(1, 8, 8))
    convs = [m for m in net if isinstance(m, nn.Conv2d)]
    assert [(c.in_channels, c.out_channels, c.kernel_size, c.padding) for c in convs] == [
        (1, 4, (3, 3), (1, 1)), (4, 6, (3, 3), (1, 1))]
    linears = [m for m in net if isinstance(m, nn.Linear)]
    assert [(m.in_features, m.out_features) for m in linears] == [(6 * 64, 12), (12, 10)]
    assert net(torch.randn(3, 64)).shape == (3, 10)
    with pytest.raises(SpecError, match="image_shape=None"):
        build_model(spec, 64, 10)
    with pytest.raises(SpecError, match=r"image_shape=\(1, 4, 4\)"):
        build_model(spec, 64, 10, image_shape=(1, 4, 4))  # does not hold 64 features
    with pytest.raises(SpecError, match="n_classes"):
        build_model(MemberSpec(), 64, 1)


@settings(max_examples=25, deadline=None)
@given(seed=st.integers(0, 2**32 - 1))
def test_n_parameters_equals_sum_of_numel(seed):
    spec = CONV_SPACE.sample(np.random.default_rng(seed))
    net = build_model(spec, 64, 10, image_shape=(1, 8, 8))
    assert n_parameters(spec, 64, 10, image_shape=(1, 8, 8)) == sum(p.numel() for p in net.parameters())


def test_n_parameters_by_hand():
    spec = MemberSpec((Layer("conv", 2), Layer("linear", 5)))
    # conv 1->2: 2*1*9 + 2; linear 2*16 -> 5: 32*5 + 5; out 5 -> 3: 15 + 3
    assert n_parameters(spec, 16, 3, image_shape=(1, 4, 4)) == 20 + 165 + 18


# --- search space --------------------------------------------------------------------------------

@settings(max_examples=60, deadline=None)
@given(seed=st.integers(0, 2**32 - 1))
def test_sample_stays_within_the_space(seed):
    for space in (SearchSpace(), CONV_SPACE):
        in_space(space.sample(np.random.default_rng(seed)), space)


def test_sample_is_deterministic_for_a_seed_and_covers_choices():
    space = CONV_SPACE
    a = [space.sample(np.random.default_rng(s)) for s in range(200)]
    assert a == [space.sample(np.random.default_rng(s)) for s in range(200)]
    assert {len(s.layers) for s in a} == set(range(0, 5))
    assert {s.batch_size for s in a} == set(space.batch_size)
    lrs = np.log([s.lr for s in a])  # log-uniform: the log's mean is near the middle
    assert abs(lrs.mean() - np.mean(np.log(space.lr))) < 0.5


@settings(max_examples=60, deadline=None)
@given(seed=st.integers(0, 2**32 - 1), mode=st.sampled_from(["random", "grid"]),
       rate=st.floats(0, 1), arch_rate=st.floats(0, 1))
def test_perturb_stays_within_the_space(seed, mode, rate, arch_rate):
    rng = np.random.default_rng(seed)
    for space in (SearchSpace(batch_size=(16, 32)), CONV_SPACE):
        spec = space.sample(rng)
        in_space(space.perturb(spec, rng, mode=mode, rate=rate, arch_rate=arch_rate), space)


def _clip(space, name, v):
    lo, hi = getattr(space, name)
    return float(np.clip(v, lo, hi))


@settings(max_examples=60, deadline=None)
@given(seed=st.integers(0, 2**32 - 1), resample=st.sampled_from([0.0, 0.25, 1.0]))
def test_perturb_random_multiplies_by_a_factor_or_resamples(seed, resample):
    space = SearchSpace()
    spec = space.sample(np.random.default_rng(seed + 1))
    fresh = space.sample(np.random.default_rng(seed))  # perturb's first draw from the same state
    out = space.perturb(spec, np.random.default_rng(seed), mode="random", rate=1.0, resample=resample)
    assert out.layers == spec.layers
    for name in ("lr", "momentum", "weight_decay"):
        v = getattr(spec, name)
        factors = [_clip(space, name, v * f) for f in (0.8, 1.25)]
        got = getattr(out, name)
        by_factor = any(math.isclose(got, f, rel_tol=1e-12) for f in factors)
        resampled = math.isclose(got, getattr(fresh, name), rel_tol=1e-12)
        assert by_factor or resampled
        if resample == 0.0:
            assert by_factor
        if resample == 1.0:
            assert resampled


def test_perturb_random_uses_both_factors_and_rate_zero_changes_nothing():
    space = SearchSpace()
    spec = MemberSpec(lr=0.05, momentum=0.5, weight_decay=1e-4)
    ratios = {round(space.perturb(spec, np.random.default_rng(s), resample=0.0).lr / spec.lr, 6) for s in range(40)}
    assert ratios == {0.8, 1.25}
    for s in range(20):
        assert space.perturb(spec, np.random.default_rng(s), rate=0.0) == spec


@settings(max_examples=60, deadline=None)
@given(seed=st.integers(0, 2**32 - 1))
def test_perturb_grid_lands_on_grid_values_one_step_away(seed):
    space = SearchSpace(grid_points=5)
    rng = np.random.default_rng(seed)
    spec = space.sample(rng)
    out = space.perturb(spec, rng, mode="grid", rate=1.0)
    for name in ("lr", "momentum", "weight_decay"):
        g = space.grid(name)
        got = getattr(out, name)
        j = int(np.argmin(np.abs(g - got)))
        assert math.isclose(got, g[j], rel_tol=1e-12)
        # from a grid value, one more step moves to a neighbour (or stays at an end)
        again = getattr(space.perturb(out, rng, mode="grid", rate=1.0), name)
        k = int(np.argmin(np.abs(g - again)))
        assert math.isclose(again, g[k], rel_tol=1e-12) and abs(k - j) == 1 or (k == j and j in (0, len(g) - 1))


def test_grid_values():
    space = SearchSpace(lr=(1e-3, 1.0), momentum=(0.0, 0.9), grid_points=4)
    np.testing.assert_allclose(space.grid("lr"), [1e-3, 1e-2, 1e-1, 1.0])
    np.testing.assert_allclose(space.grid("momentum"), [0.0, 0.3, 0.6, 0.9])


@settings(max_examples=80, deadline=None)
@given(seed=st.integers(0, 2**32 - 1), lo=st.integers(0, 3), span=st.integers(0, 3))
def test_crossover_child_layers_come_from_the_parents_as_returned(seed, lo, span):
    rng = np.random.default_rng(seed)
    parents_space = CONV_SPACE  # depth 0..4: parents may be longer or shorter than the child's space
    a, b = parents_space.sample(rng), parents_space.sample(rng)
    space = SearchSpace(depth=(lo, lo + span), widths=CONV_SPACE.widths, kinds=CONV_SPACE.kinds)
    child, sources = space.crossover(a, b, rng)
    parents = (a, b)
    assert len(sources) == len(child.layers)
    assert lo <= len(child.layers) <= lo + span
    kinds = [layer.kind for layer in child.layers]
    assert kinds == sorted(kinds, key=lambda k: k != "conv")
    for layer, (p, i) in zip(child.layers, sources):
        assert p in (0, 1)
        if i >= 0:
            assert parents[p].layers[i] == layer
        else:  # a fresh layer only when neither parent has any to give
            assert not a.layers and not b.layers
    for k in HPARAMS:
        assert getattr(child, k) in (getattr(a, k), getattr(b, k))


def test_crossover_mixes_both_parents():
    space = SearchSpace(depth=(1, 4))
    a = MemberSpec((Layer("linear", 16), Layer("linear", 16)), lr=0.01)
    b = MemberSpec((Layer("linear", 128, "tanh"), Layer("linear", 128, "tanh")), lr=0.5)
    seen = set()
    for s in range(40):
        _, sources = space.crossover(a, b, np.random.default_rng(s))
        seen |= {p for p, _ in sources}
        if len({p for p, _ in sources}) == 2:
            break
    assert seen == {0, 1}


# --- similarity ----------------------------------------------------------------------------------

@settings(max_examples=40, deadline=None)
@given(seeds=st.lists(st.integers(0, 2**32 - 1), min_size=2, max_size=5))
def test_similarity_identity_symmetric_bounded_and_matrix(seeds):
    sim = Similarity()
    specs = [CONV_SPACE.sample(np.random.default_rng(s)) for s in seeds]
    for a in specs:
        assert sim(a, a) == pytest.approx(1.0)
        for b in specs:
            assert 0.0 <= sim(a, b) <= 1.0
            assert sim(a, b) == pytest.approx(sim(b, a), abs=1e-12)
    m = sim.matrix(specs)
    assert m.shape == (len(specs), len(specs))
    np.testing.assert_allclose(m, m.T)
    np.testing.assert_array_equal(np.diag(m), 1.0)
    for i in range(len(specs)):
        for j in range(len(specs)):
            if i != j:
                assert m[i, j] == pytest.approx(sim(specs[i], specs[j]))


def test_similarity_smaller_for_farther_lr_and_by_hand():
    sim = Similarity()
    base = MemberSpec(lr=0.01, momentum=0.5, weight_decay=1e-4)
    values = [sim(base, base.replace(lr=0.01 * f)) for f in (1, 2, 10, 100, 999)]
    assert all(x > y for x, y in zip(values, values[1:]))
    # hparam distance: |log 10| / log 1000 / 3 = 1/9; the architecture is the same: similarity 1 - 0.5/9
    assert sim(base, base.replace(lr=0.1)) == pytest.approx(1 - 0.5 / 9)
    # architectures: one layer of another kind and activation, 8x wider: substitution 0.5+0.25+0.25 = 1
    a = MemberSpec((Layer("linear", 8, "relu"),))
    b = MemberSpec((Layer("conv", 64, "tanh"),))
    assert sim.arch_distance(a, b) == pytest.approx(1.0)
    # one extra layer out of two: insertion cost 1 / 2
    c = MemberSpec((Layer("linear", 8, "relu"), Layer("linear", 8, "relu")))
    assert sim.arch_distance(a, c) == pytest.approx(0.5)
    assert Similarity(arch=1.0, hparams=0.0)(a, c) == pytest.approx(0.5)
