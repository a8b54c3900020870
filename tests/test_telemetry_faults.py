"""Fault injection: every fault kind changes training against its clean twin, and only from its
step; each quiet kind does exactly what its docstring says on a tiny model."""
from __future__ import annotations

import math
from collections import OrderedDict
from collections.abc import Callable

import pytest
import torch
import torch.nn.functional as F
from hypothesis import given, settings
from hypothesis import strategies as st
from torch import nn

from adaptive_kit.datasets import Split, digits
from adaptive_kit.telemetry.faults import (
    DEFAULT_MAGNITUDES,
    FAULT_KINDS,
    LAYER_KINDS,
    QUIET_KINDS,
    REPEATED_KINDS,
    Fault,
    FaultInjector,
    layer_candidates,
)
from adaptive_kit.training import mlp

S = 25  # the fault step in every run: late enough that the clean twin is learning fast
STEPS = S + 20  # 20 steps after the fault


@pytest.fixture(scope="module")
def data() -> Split:
    return digits()


def make_mlp() -> nn.Module:
    torch.manual_seed(0)
    return mlp([64, 32, 32, 10])  # Linear "0", ReLU "1", Linear "2", ReLU "3", Linear "4"


def make_cnn() -> nn.Module:
    torch.manual_seed(0)
    return nn.Sequential(nn.Unflatten(1, (1, 8, 8)), nn.Conv2d(1, 4, 3, padding=1), nn.ReLU(),
                         nn.Flatten(), nn.Linear(4 * 8 * 8, 10))  # conv is "1", its ReLU "2"


class Run:
    """One training run: losses per step and, per step, whatever the probes recorded."""

    def __init__(self, data: Split, fault: Fault | None, *, steps: int = STEPS,
                 make_model: Callable[[], nn.Module] = make_mlp, watch: tuple[str, ...] = ("0", "1")):
        self.model = model = make_model()
        self.opt = torch.optim.SGD(model.parameters(), lr=0.1, momentum=0.9)
        self.inj = FaultInjector(fault, model, self.opt, n_classes=10)
        acts: dict[str, torch.Tensor] = {}
        for name in watch:
            model.get_submodule(name).register_forward_hook(
                lambda m, i, o, name=name: acts.__setitem__(name, o.detach()))
        weighted = [n for n, m in model.named_modules() if isinstance(m, (nn.Linear, nn.Conv2d))]
        g = torch.Generator().manual_seed(0)  # same batches for every run
        self.losses, self.acts, self.grad_norms, self.batches = [], [], [], []
        for step in range(steps):
            idx = torch.randint(0, len(data.x_train), (64,), generator=g)
            x, y = data.x_train[idx], data.y_train[idx]
            self.inj.before_step(step)
            xb, yb = self.inj.batch(step, x, y)
            loss = F.cross_entropy(model(xb), yb)
            self.opt.zero_grad()
            loss.backward()
            self.inj.after_backward(step)
            self.grad_norms.append({n: model.get_submodule(n).weight.grad.norm() for n in weighted})
            self.acts.append(dict(acts))
            self.batches.append((x, y, xb, yb))
            self.opt.step()
            self.losses.append(loss.detach())
        self.losses = torch.stack(self.losses)

    def ratio(self, step: int, first: str = "0", last: str = "4") -> float:
        """AUTOTRAINER's first/last layer gradient-norm ratio at ``step``."""
        return float(self.grad_norms[step][first] / self.grad_norms[step][last])

    def act_std(self, step: int, name: str = "0") -> float:
        return float(self.acts[step][name].std())

    def zero_frac(self, step: int, name: str = "1") -> float:
        return float((self.acts[step][name] == 0).float().mean())


@pytest.fixture(scope="module")
def clean(data: Split) -> Run:
    return Run(data, None)


@pytest.fixture(scope="module")
def faulty(data: Split) -> Callable[[str], Run]:
    """The run with ``Fault(kind, S)`` (defaults everywhere), made once per kind."""
    cache: dict[str, Run] = {}

    def get(kind: str) -> Run:
        if kind not in cache:
            cache[kind] = Run(data, Fault(kind, S))
        return cache[kind]
    return get


# --- every kind: nothing before the step, a change from it on, deterministic ------------------

def test_kinds_and_defaults():
    assert len(FAULT_KINDS) == 18 and set(FAULT_KINDS) == set(DEFAULT_MAGNITUDES)
    assert QUIET_KINDS == ("layer_grad_vanish", "layer_grad_explode", "dead_units", "weight_drift",
                           "label_permute", "input_corrupt", "lr_ramp", "stall")
    assert set(QUIET_KINDS) <= set(FAULT_KINDS) and len(set(FAULT_KINDS)) == 18
    assert REPEATED_KINDS == {"weight_drift", "lr_ramp", "layer_grad_vanish", "layer_grad_explode", "stall"}
    for kind in FAULT_KINDS:
        assert Fault(kind, 0).strength == DEFAULT_MAGNITUDES[kind]
    assert Fault("lr_spike", 0, magnitude=7).strength == 7.0


@pytest.mark.parametrize("kind", FAULT_KINDS)
def test_nothing_before_the_step_and_a_change_from_it(clean, faulty, kind):
    run = faulty(kind)
    assert torch.equal(run.losses[:S], clean.losses[:S])  # bit-identical up to the fault step
    # lr faults act on the update of step S, so the loss first differs at S + 1
    assert not torch.equal(run.losses[S:S + 2], clean.losses[S:S + 2])
    assert [run.inj.active(s) for s in (0, S - 1, S, STEPS)] == [False, False, True, True]
    assert run.inj.target_layer == ("0" if kind in LAYER_KINDS else None)


@pytest.mark.parametrize("kind", ["nan_batch", "inf_grad", "label_noise", "input_noise", "dead_units",
                                  "label_permute", "input_corrupt"])
def test_same_seed_same_run(data, faulty, kind):
    # the kinds with random parts; the others are deterministic functions of the model
    again = Run(data, Fault(kind, S, seed=0))
    torch.testing.assert_close(again.losses, faulty(kind).losses, rtol=0, atol=0, equal_nan=True)


@pytest.mark.parametrize("kind", ["nan_batch", "label_noise", "input_noise", "label_permute", "input_corrupt"])
def test_seed_picks_the_random_parts(kind):
    x, y = torch.rand(64, 64), torch.randint(0, 10, (64,))
    out = [FaultInjector(Fault(kind, 0, seed=s), nn.Linear(64, 10), n_classes=10).batch(0, x, y)
           for s in (0, 0, 1)]
    flat = [torch.cat([xb.flatten().nan_to_num(-1.0), yb.float()]) for xb, yb in out]
    assert torch.equal(flat[0], flat[1]) and not torch.equal(flat[0], flat[2])


def test_inf_grad_seed_picks_the_entries():
    def infs(seed: int) -> torch.Tensor:
        layer = nn.Linear(64, 10)
        inj = FaultInjector(Fault("inf_grad", 0, seed=seed), layer)
        layer(torch.rand(8, 64)).sum().backward()
        inj.after_backward(0)
        return torch.isinf(layer.weight.grad)
    assert torch.equal(infs(0), infs(0)) and not torch.equal(infs(0), infs(1))
    assert int(infs(0).sum()) == round(0.01 * 640)


def test_clean_injector_passes_everything_through():
    model = make_mlp()
    inj = FaultInjector(None, model)
    x, y = torch.rand(4, 64), torch.tensor([1, 2, 3, 4])
    xb, yb = inj.batch(5, x, y)
    assert xb is x and yb is y
    inj.before_step(5)
    inj.after_backward(5)
    assert not inj.active(5) and inj.target_layer is None


# --- each kind does what it says ---------------------------------------------------------------

def test_nan_batch(clean, faulty):
    run = faulty("nan_batch")
    x, y, xb, yb = run.batches[S]
    assert torch.isfinite(x).all() and yb is y  # the caller's batch is untouched
    assert int(torch.isnan(xb).sum()) == round(0.1 * x.numel())
    assert torch.isfinite(run.losses[:S]).all() and torch.isnan(run.losses[S])
    assert torch.isfinite(clean.losses).all()
    assert torch.isfinite(run.batches[S + 1][2]).all()  # one poisoned batch, not every batch
    assert not all(torch.isfinite(p).all() for p in run.model.parameters())


def test_inf_grad(clean, faulty):
    run = faulty("inf_grad")
    assert math.isinf(run.grad_norms[S]["0"]) and math.isfinite(clean.grad_norms[S]["0"])
    assert math.isfinite(run.grad_norms[S - 1]["0"]) and math.isfinite(run.grad_norms[S]["4"])
    assert not torch.isfinite(run.model[0].weight).all()  # opt.step carried it into the weights
    assert torch.isfinite(run.losses[S]) and not torch.isfinite(run.losses[S + 1])


def test_lr_spike(clean, faulty):
    run = faulty("lr_spike")
    assert run.opt.param_groups[0]["lr"] == pytest.approx(0.1 * 100)  # multiplied once
    after, before = run.losses[S + 1:], clean.losses[S + 1:]
    assert float(after.nan_to_num(math.inf).max()) > 20 * float(before.max())  # a spike
    assert float(after[-5:].nan_to_num(math.inf).mean()) > 2 * float(before[-5:].mean())  # no recovery


def test_plateau(clean, faulty):
    run = faulty("plateau")
    assert run.opt.param_groups[0]["lr"] == pytest.approx(0.1 * 1e-4)
    drop = float(run.losses[S:S + 5].mean() - run.losses[-5:].mean())
    clean_drop = float(clean.losses[S:S + 5].mean() - clean.losses[-5:].mean())
    assert clean_drop > 0.3 and drop < 0.1 * clean_drop, (drop, clean_drop)


def test_exploding_init(clean, faulty):
    run = faulty("exploding_init")  # default layer "0", factor 30
    assert float(run.losses[S]) > 2.5 * float(clean.losses[S])
    assert float(run.losses[S:S + 5].max()) > 20 * float(clean.losses[S:S + 5].max())  # a spike
    assert run.act_std(S) > 20 * clean.act_std(S)  # everything downstream is 30x too large
    assert float(run.grad_norms[S]["4"]) > 50 * float(clean.grad_norms[S]["4"])


def test_exploding_init_of_the_last_layer_trips_the_ratio(data, clean):
    run = Run(data, Fault("exploding_init", S, layer="4", magnitude=300.0))
    assert run.ratio(S) > 70 > clean.ratio(S)


def test_vanishing(clean, faulty):
    run = faulty("vanishing")  # "0", "2", "4" scaled by 1e-3
    assert float(run.grad_norms[S]["0"]) < 1e-4 * float(clean.grad_norms[S]["0"])
    assert run.ratio(S) < 1e-3 < clean.ratio(S)


def test_vanishing_from_a_later_layer_leaves_earlier_weights_alone(data, clean):
    run = Run(data, Fault("vanishing", S, layer="2"))
    assert run.act_std(S) == clean.act_std(S)  # layer "0" untouched ...
    assert run.ratio(S) < 1e-3  # ... yet its gradient vanishes


def test_dead_relu(clean, faulty):
    run = faulty("dead_relu")
    assert clean.zero_frac(S) < 0.7 and clean.zero_frac(S - 1) < 0.7
    assert run.zero_frac(S - 1) == clean.zero_frac(S - 1)
    assert run.zero_frac(S) >= 0.7 and run.zero_frac(STEPS - 1) >= 0.7  # and they stay dead


@pytest.mark.parametrize("kind", ["dead_relu", "inf_grad"])
def test_conv_layer(data, kind):
    clean = Run(data, None, make_model=make_cnn, watch=("2",), steps=S + 2)
    run = Run(data, Fault(kind, S), make_model=make_cnn, watch=("2",), steps=S + 2)
    assert run.inj.target_layer == "1"  # the first Linear/Conv
    if kind == "dead_relu":
        assert clean.zero_frac(S, "2") < 0.7 <= run.zero_frac(S, "2")
    else:
        assert math.isinf(run.grad_norms[S]["1"]) and not torch.isfinite(run.losses[S + 1])


def test_label_noise(clean, faulty):
    run = faulty("label_noise")
    _, y, _, yb = run.batches[S]
    changed = float((yb != y).float().mean())
    assert 0.3 < changed <= 0.5  # half replaced; about a tenth of those land on the true label
    assert torch.equal(run.batches[S - 1][3], run.batches[S - 1][1])
    noisy, base = float(run.losses[S:].mean()), float(clean.losses[S:].mean())
    assert noisy > base + 0.5, (noisy, base)


def test_input_scale(clean, faulty):
    run = faulty("input_scale")
    x, _, xb, _ = run.batches[S]
    assert torch.equal(xb, x * 100) and float(x.max()) <= 1.0  # a copy; the caller's x is as it was
    assert run.act_std(S) > 50 * clean.act_std(S)


def test_input_noise(clean, faulty):
    run = faulty("input_noise")
    x, _, xb, _ = run.batches[S]
    assert float((xb - x).std()) == pytest.approx(3.0, rel=0.05) and float(x.max()) <= 1.0
    assert run.act_std(S) > 3 * clean.act_std(S)
    assert float(run.losses[S:].mean()) > float(clean.losses[S:].mean()) + 0.5


# --- the quiet kinds: one layer or part of a batch, exactly as documented ----------------------

def tiny() -> nn.Module:
    torch.manual_seed(0)
    return nn.Sequential(nn.Linear(6, 5), nn.ReLU(), nn.Linear(5, 4), nn.ReLU(), nn.Linear(4, 3))


def fresh_grads(model: nn.Module, x: torch.Tensor, y: torch.Tensor) -> dict[str, torch.Tensor]:
    model.zero_grad()
    F.cross_entropy(model(x), y).backward()
    return {n: p.grad.clone() for n, p in model.named_parameters()}


def test_layer_candidates_follow_what_each_kind_needs():
    assert all(layer_candidates(make_mlp(), k) == ["0", "2", "4"] for k in LAYER_KINDS)
    model = nn.Sequential(OrderedDict(
        stem=nn.Sequential(nn.Conv2d(1, 4, 3, bias=False), nn.BatchNorm2d(4), nn.ReLU()),
        head=nn.Linear(8, 3)))
    assert layer_candidates(model, "layer_grad_vanish") == ["stem.0", "stem.1", "head"]
    assert layer_candidates(model, "weight_drift") == ["stem.0", "head"]  # no norm layer's scale
    assert layer_candidates(model, "vanishing") == ["stem.0", "head"]
    assert layer_candidates(model, "dead_units") == ["stem.1", "head"]  # needs a bias
    assert FaultInjector(Fault("dead_units", 0), model).target_layer == "head"  # first Linear/Conv with one
    with pytest.raises(ValueError, match=r"'stem.1' lacks a weight parameter of 2 or more dimensions"
                                         r".*\['stem.0', 'head'\]"):
        FaultInjector(Fault("weight_drift", 0, layer="stem.1"), model)


scale_faults = st.one_of(st.tuples(st.just("layer_grad_vanish"), st.floats(1e-6, 0.99)),
                         st.tuples(st.just("layer_grad_explode"), st.floats(1.01, 1e4)))


@settings(max_examples=25, deadline=None)
@given(fault=scale_faults, layer=st.sampled_from(["0", "2", "4"]), at=st.integers(0, 3))
def test_layer_grad_faults_scale_that_layer_s_gradients_at_every_step(fault, layer, at):
    kind, m = fault
    model = tiny()
    inj = FaultInjector(Fault(kind, at, layer=layer, magnitude=m), model)
    x, y = torch.randn(8, 6, generator=torch.Generator().manual_seed(1)), torch.arange(8) % 3
    for step in range(at + 3):
        clean = fresh_grads(model, x, y)
        inj.after_backward(step)
        for name, p in model.named_parameters():
            hit = step >= at and name.rpartition(".")[0] == layer  # weight and bias of the layer
            assert torch.equal(p.grad, clean[name] * m if hit else clean[name]), (step, name)


@pytest.mark.parametrize("m", [0.0, 0.5])
def test_stall_scales_every_gradient_at_every_step(m):
    model = tiny()
    inj = FaultInjector(Fault("stall", 2, magnitude=None if m == 0.0 else m), model)
    assert inj.target_layer is None
    x, y = torch.randn(8, 6), torch.arange(8) % 3
    for step in range(5):
        clean = fresh_grads(model, x, y)
        inj.after_backward(step)
        for name, p in model.named_parameters():
            assert torch.equal(p.grad, clean[name] * (m if step >= 2 else 1.0)), (step, name)


@settings(max_examples=30, deadline=None)
@given(units=st.integers(1, 40), frac=st.floats(0.01, 1.0), seed=st.integers(0, 2**20), conv=st.booleans())
def test_dead_units_kills_exactly_k_units_once(units, frac, seed, conv):
    torch.manual_seed(0)
    first = nn.Conv2d(2, units, 3, padding=1) if conv else nn.Linear(6, units)
    model = nn.Sequential(first, nn.ReLU())
    w0, b0 = first.weight.detach().clone(), first.bias.detach().clone()
    inj = FaultInjector(Fault("dead_units", 2, magnitude=frac, seed=seed), model)
    inj.before_step(1)
    assert torch.equal(first.weight, w0) and torch.equal(first.bias, b0)
    inj.before_step(2)
    w, b = first.weight.detach(), first.bias.detach()
    dead = torch.tensor([bool((w[u] == 0).all()) and float(b[u]) == -1.0 for u in range(units)])
    assert int(dead.sum()) == max(1, round(frac * units))
    assert torch.equal(first.weight[~dead], w0[~dead]) and torch.equal(first.bias[~dead], b0[~dead])
    x = 10 * torch.randn(4, 2, 5, 5) if conv else 10 * torch.randn(4, 6)
    out = model(x)
    assert (out[:, dead] == 0).all()  # no input reaches them: the ReLU after them is 0
    w1 = first.weight.detach().clone()
    inj.before_step(3)  # once, not every step
    assert torch.equal(first.weight, w1)


@settings(max_examples=25, deadline=None)
@given(m=st.floats(0.5, 1.5).filter(lambda v: v != 1.0), layer=st.sampled_from(["0", "2", "4"]),
       at=st.integers(0, 3))
def test_weight_drift_multiplies_the_layer_s_weight_before_every_step(m, layer, at):
    model = tiny()
    before = {n: p.detach().clone() for n, p in model.named_parameters()}
    inj = FaultInjector(Fault("weight_drift", at, layer=layer, magnitude=m), model)
    expected = before[f"{layer}.weight"].clone()
    for step in range(at + 4):
        inj.before_step(step)
        if step >= at:
            expected.mul_(m)
        for name, p in model.named_parameters():
            want = expected if name == f"{layer}.weight" else before[name]  # bias left alone
            assert torch.equal(p, want), (step, name)


@settings(max_examples=25, deadline=None)
@given(m=st.floats(1.001, 2.0), at=st.integers(0, 3))
def test_lr_ramp_multiplies_every_group_s_lr_before_every_step(m, at):
    model = tiny()
    opt = torch.optim.SGD([{"params": model[0].parameters(), "lr": 0.1},
                           {"params": model[2].parameters(), "lr": 0.01}], lr=0.5)
    inj = FaultInjector(Fault("lr_ramp", at, magnitude=m), model, opt)
    lrs = [0.1, 0.01]
    for step in range(at + 4):
        inj.before_step(step)
        if step >= at:
            lrs = [lr * m for lr in lrs]
        assert [g["lr"] for g in opt.param_groups] == lrs, step


@settings(max_examples=40, deadline=None)
@given(n=st.integers(1, 200), classes=st.integers(2, 20), frac=st.floats(0.01, 1.0), seed=st.integers(0, 2**20),
       rows=st.sampled_from([None, 2]))
def test_label_permute_shifts_a_fraction_of_labels_to_the_next_class(n, classes, frac, seed, rows):
    g = torch.Generator().manual_seed(seed)
    shape = (n,) if rows is None else (rows, n)
    x, y = torch.rand(shape[0], 3), torch.randint(0, classes, shape, generator=g)
    y0 = y.clone()
    inj = FaultInjector(Fault("label_permute", 1, magnitude=frac, seed=seed), tiny(), n_classes=classes)
    assert all(a is b for a, b in zip(inj.batch(0, x, y), (x, y)))  # before the step
    xb, yb = inj.batch(1, x, y)
    assert xb is x and torch.equal(y, y0) and yb.shape == y.shape
    changed = yb != y
    assert int(changed.sum()) == round(frac * y.numel())
    assert torch.equal(yb[changed], (y[changed] + 1) % classes)


@settings(max_examples=40, deadline=None)
@given(n=st.integers(1, 64), width=st.integers(1, 20), frac=st.floats(0.01, 1.0), seed=st.integers(0, 2**20))
def test_input_corrupt_replaces_a_fraction_of_rows_and_nothing_else(n, width, frac, seed):
    x, y = torch.rand(n, width), torch.arange(n) % 3
    x0 = x.clone()
    inj = FaultInjector(Fault("input_corrupt", 1, magnitude=frac, seed=seed), tiny())
    assert all(a is b for a, b in zip(inj.batch(0, x, y), (x, y)))
    xb, yb = inj.batch(1, x, y)
    assert yb is y and torch.equal(x, x0) and xb.shape == x.shape
    replaced = (xb != x).any(1)
    assert int(replaced.sum()) == max(1, round(frac * n))  # at least one row
    assert torch.equal(xb[~replaced], x[~replaced])


def test_input_corrupt_rows_are_noise_of_std_three():
    x = torch.rand(1000, 50)
    xb, _ = FaultInjector(Fault("input_corrupt", 0), tiny()).batch(0, x, torch.zeros(1000, dtype=torch.long))
    replaced = (xb != x).any(1)
    assert int(replaced.sum()) == 250
    noise = xb[replaced]
    assert float(noise.std()) == pytest.approx(3.0, rel=0.02) and abs(float(noise.mean())) < 0.05


def test_layer_grad_vanish_in_training_leaves_every_other_layer_alone(clean, data):
    run = Run(data, Fault("layer_grad_vanish", S, layer="2"), steps=S + 1)
    # the model at S is the clean twin's: layer "2"'s gradient is 1e-3 of it, the others equal
    assert float(run.grad_norms[S]["2"]) == pytest.approx(1e-3 * float(clean.grad_norms[S]["2"]), rel=1e-5)
    assert all(torch.equal(run.grad_norms[S][n], clean.grad_norms[S][n]) for n in ("0", "4"))
    assert torch.equal(run.losses, clean.losses[:S + 1])


def test_stall_in_training_zeroes_every_gradient(faulty):
    run = faulty("stall")
    assert all(float(v) == 0.0 for s in range(S, STEPS) for v in run.grad_norms[s].values())
    assert all(float(v) > 0.0 for v in run.grad_norms[S - 1].values())


# --- bad input ---------------------------------------------------------------------------------

@pytest.mark.parametrize("kwargs, match", [
    (dict(kind="nan", step=0), "Fault.kind.*'nan'"),
    (dict(kind="lr_spike", step=-1), r"Fault.step.*-1"),
    (dict(kind="lr_spike", step=True), r"Fault.step.*True"),
    (dict(kind="lr_spike", step=1.5), r"Fault.step.*1.5"),
    (dict(kind="lr_spike", step=0, magnitude=0.5), r"Fault.magnitude.*'lr_spike'.*> 1.*0.5"),
    (dict(kind="plateau", step=0, magnitude=2.0), r"Fault.magnitude.*'plateau'.*2.0"),
    (dict(kind="nan_batch", step=0, magnitude=1.5), r"Fault.magnitude.*\(0, 1\].*1.5"),
    (dict(kind="label_noise", step=0, magnitude=0), r"Fault.magnitude.*'label_noise'.*0"),
    (dict(kind="vanishing", step=0, magnitude=10.0), r"Fault.magnitude.*'vanishing'.*10.0"),
    (dict(kind="exploding_init", step=0, magnitude=0.1), r"Fault.magnitude.*0.1"),
    (dict(kind="dead_relu", step=0, magnitude=5.0), r"Fault.magnitude.*< 0.*5.0"),
    (dict(kind="input_noise", step=0, magnitude=-1.0), r"Fault.magnitude.*-1.0"),
    (dict(kind="input_scale", step=0, magnitude=1.0), r"Fault.magnitude.*!= 1.*1.0"),
    (dict(kind="input_scale", step=0, magnitude=math.nan), r"Fault.magnitude.*nan"),
    (dict(kind="input_scale", step=0, magnitude=math.inf), r"Fault.magnitude.*inf"),
    (dict(kind="input_scale", step=0, magnitude="big"), r"Fault.magnitude.*'big'"),
    (dict(kind="dead_relu", step=0, layer=""), r"Fault.layer.*''"),
    (dict(kind="dead_relu", step=0, seed=-2), r"Fault.seed.*-2"),
    (dict(kind="layer_grad_vanish", step=0, magnitude=1.0), r"'layer_grad_vanish'.*in \(0, 1\).*1.0"),
    (dict(kind="layer_grad_vanish", step=0, magnitude=0.0), r"'layer_grad_vanish'.*0.0"),
    (dict(kind="layer_grad_explode", step=0, magnitude=0.5), r"'layer_grad_explode'.*> 1.*0.5"),
    (dict(kind="dead_units", step=0, magnitude=0), r"'dead_units'.*\(0, 1\].*0"),
    (dict(kind="dead_units", step=0, magnitude=1.5), r"'dead_units'.*1.5"),
    (dict(kind="weight_drift", step=0, magnitude=1.0), r"'weight_drift'.*> 0 and != 1.*1.0"),
    (dict(kind="weight_drift", step=0, magnitude=-0.5), r"'weight_drift'.*-0.5"),
    (dict(kind="label_permute", step=0, magnitude=1.5), r"'label_permute'.*\(0, 1\].*1.5"),
    (dict(kind="input_corrupt", step=0, magnitude=0.0), r"'input_corrupt'.*0.0"),
    (dict(kind="lr_ramp", step=0, magnitude=1.0), r"'lr_ramp'.*> 1.*1.0"),
    (dict(kind="lr_ramp", step=0, magnitude=math.inf), r"'lr_ramp'.*inf"),
    (dict(kind="stall", step=0, magnitude=1.0), r"'stall'.*in \[0, 1\).*1.0"),
    (dict(kind="stall", step=0, magnitude=-0.1), r"'stall'.*-0.1"),
    (dict(kind="stall", step=0, magnitude=True), r"'stall'.*True"),
])
def test_bad_fault_raises(kwargs, match):
    with pytest.raises(ValueError, match=match):
        Fault(**kwargs)


def test_bad_layer_raises_with_the_valid_names():
    model = make_mlp()
    with pytest.raises(ValueError, match=r"'fc9' is not a module.*valid layer names: \['0', '2', '4'\]"):
        FaultInjector(Fault("exploding_init", 0, layer="fc9"), model)
    with pytest.raises(ValueError, match=r"'1' lacks a weight parameter.*\['0', '2', '4'\]"):
        FaultInjector(Fault("inf_grad", 0, layer="1"), model)  # a ReLU
    no_bias = nn.Sequential(nn.Linear(4, 4, bias=False), nn.ReLU(), nn.Linear(4, 2))
    with pytest.raises(ValueError, match=r"'0' lacks weight and bias parameters.*valid layer names: \['2'\]"):
        FaultInjector(Fault("dead_relu", 0, layer="0"), no_bias)
    with pytest.raises(ValueError, match=r"Fault.layer=None.*no Linear/Conv"):
        FaultInjector(Fault("dead_relu", 0), nn.Sequential(nn.Linear(4, 4, bias=False)))


def test_missing_optimizer_or_classes_raises():
    model = make_mlp()
    with pytest.raises(ValueError, match=r"optimizer is None.*'lr_spike'"):
        FaultInjector(Fault("lr_spike", 0), model)
    with pytest.raises(ValueError, match=r"n_classes.*'label_noise'.*None"):
        FaultInjector(Fault("label_noise", 0), model)
    with pytest.raises(ValueError, match=r"n_classes.*1"):
        FaultInjector(Fault("label_noise", 0), model, n_classes=1)
    with pytest.raises(ValueError, match=r"optimizer is None.*'lr_ramp'"):
        FaultInjector(Fault("lr_ramp", 0), model)
    with pytest.raises(ValueError, match=r"n_classes.*'label_permute'.*None"):
        FaultInjector(Fault("label_permute", 0), model)
    with pytest.raises(ValueError, match=r"FaultInjector.fault.*str"):
        FaultInjector("lr_spike", model)  # type: ignore[arg-type]


def test_wrong_batch_dtypes_and_call_order_raise():
    model = make_mlp()
    tokens = torch.randint(0, 10, (4, 64))
    with pytest.raises(ValueError, match=r"floating inputs.*torch.int64"):
        FaultInjector(Fault("input_noise", 0), model).batch(0, tokens, torch.zeros(4, dtype=torch.long))
    with pytest.raises(ValueError, match=r"integer class labels.*torch.float32"):
        FaultInjector(Fault("label_noise", 0), model, n_classes=10).batch(0, torch.rand(4, 64), torch.rand(4))
    with pytest.raises(ValueError, match=r"label_permute needs integer class labels.*torch.float32"):
        FaultInjector(Fault("label_permute", 0), model, n_classes=10).batch(0, torch.rand(4, 64), torch.rand(4))
    with pytest.raises(ValueError, match=r"floating inputs.*torch.int64"):
        FaultInjector(Fault("input_corrupt", 0), model).batch(0, tokens, torch.zeros(4, dtype=torch.long))
    with pytest.raises(RuntimeError, match=r"layer '0' has no weight gradient"):
        FaultInjector(Fault("inf_grad", 0), model).after_backward(0)
