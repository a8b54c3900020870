"""Fault injection: break an ordinary PyTorch training loop on purpose, at a chosen step and layer.

Each fault is meant to exercise one family of detectors; its ``magnitude`` is kind-specific and
``None`` picks the default in :data:`DEFAULT_MAGNITUDES`:

=================  ================================================  ===========================
kind               what it does (default magnitude)                  detector it exercises
=================  ================================================  ===========================
``nan_batch``      NaN written into a fraction (0.1) of the input    non-finite loss / grads /
                   entries of the batch at ``step`` (once)           weights
``inf_grad``       +Inf written into a fraction (0.01) of the        non-finite grads, then
                   layer's weight gradient after backward (once)     weights
``lr_spike``       every param group's lr multiplied by 100, kept    loss spike / divergence,
                   from ``step`` on                                  exploding gradients
``exploding_init`` the layer's weight multiplied by 30 at ``step``   exploding gradients,
                                                                     abnormal activation scale,
                                                                     loss spike
``vanishing``      the weight of the layer and of every weighted     vanishing gradients
                   layer registered after it multiplied by 1e-3      (first/last gradient-norm
                   at ``step`` (a "tiny init")                       ratio < 1e-3)
``dead_relu``      the layer's bias shifted by -10 at ``step``, so   dead ReLU (>= 70 % zeros)
                   the ReLU it feeds outputs (almost) only zeros
``label_noise``    a fraction (0.5) of each batch's labels replaced  loss plateau / higher loss
                   by uniform random labels from ``step`` on
``input_scale``    inputs multiplied by 100 from ``step`` on         abnormal activation scale,
                                                                     loss spike
``input_noise``    Gaussian noise of std 3.0 added to the inputs     abnormal activation scale,
                   from ``step`` on                                  higher loss
``plateau``        every param group's lr multiplied by 1e-4, kept   weight progress (stall)
                   from ``step`` on
=================  ================================================  ===========================

The *quiet* faults below touch one layer or one part of each batch, so that statistics pooled
over the whole network (``macro``) barely move while the layer's own statistics (``meso`` and
finer) do; they are what makes granularity matter:

=======================  ==========================================  ===========================
kind                     what it does (default magnitude)            detector it exercises
=======================  ==========================================  ===========================
``layer_grad_vanish``    the layer's gradients multiplied by 1e-3    per-layer gradient scale
                         after every backward from ``step`` on
``layer_grad_explode``   the layer's gradients multiplied by 30      per-layer gradient scale
                         after every backward from ``step`` on
``dead_units``           a fraction (0.25) of the layer's output     per-layer zero fraction /
                         units killed once: their incoming weights   activation scale
                         zeroed, their bias set to -1
``weight_drift``         the layer's weight multiplied by 0.97       per-layer weight progress
                         before every step from ``step`` on
``label_permute``        a fraction (0.5) of each batch's labels     loss
                         shifted to the next class from ``step`` on
``input_corrupt``        a fraction (0.25) of each batch's rows      activation scale, loss
                         replaced by Gaussian noise of std 3
``lr_ramp``              every param group's lr multiplied by 1.15   weight progress, loss
                         before every step from ``step`` on
``stall``                every gradient set to zero after every      gradient scale, weight
                         backward from ``step`` on (a frozen run)    progress
=======================  ==========================================  ===========================

The gradient thresholds are AUTOTRAINER's: gradients explode when the first layer's gradient
norm exceeds 70x the last layer's, and vanish when it is below 1e-3x.

Notes on the layer faults (``inf_grad``, ``exploding_init``, ``vanishing``, ``dead_relu``):

- ``layer=None`` means the first ``nn.Linear`` or ``nn.Conv*d`` in ``model.named_modules()``;
  "after" means registered after, which for ``nn.Sequential`` is execution order.
- ``exploding_init`` multiplies everything downstream of the layer by the factor: the
  activations after it and the gradients of the layers after it (whose inputs they are) grow
  by about the factor, and the loss spikes. The first/last ratio only rises when the
  gradient growth is upstream: blowing up the *last* layer by a few hundred multiplies the
  gradients of every earlier layer but not its own, and trips the > 70 rule.
- ``vanishing`` scales the chosen layer *and the weighted layers after it* because a layer's
  gradient ``delta x^T`` only shrinks when the weights the backward signal passes through
  (those after the layer) shrink; with the default (first) layer the whole network gets a
  tiny initialisation and the first layer's gradient shrinks by about ``magnitude ** (n - 1)``
  for ``n`` weighted layers, while the last layer's does not. Normalisation layers undo the
  scaling, so use a plain stack. The other classic cause, a deep stack of sigmoids, is a
  choice of model (``mlp(sizes, activation=nn.Sigmoid)``), not an injection.
- ``dead_relu`` shifts the bias by a constant; -10 is far beyond the typical |pre-activation|
  of a standard-initialised layer on inputs of unit scale. For larger inputs pass a larger
  negative shift. A layer whose units are all dead passes no gradient to the layers before
  it (or to itself), so it also trips the vanishing-gradient rule.

The lr faults multiply ``param_groups[i]["lr"]`` once; an lr scheduler that recomputes the lr
from its base values each step (``LambdaLR``, ``OneCycleLR``) would undo them, while
multiplicative ones (``StepLR``, ``ExponentialLR``) keep them.

Usage, with the clean twin being the same loop with ``FaultInjector(None, model, opt)``::

    inj = FaultInjector(Fault("dead_relu", step=30, layer="0"), model, opt, n_classes=10)
    for step in range(steps):
        inj.before_step(step)
        x, y = inj.batch(step, x, y)
        loss = F.cross_entropy(model(x), y); opt.zero_grad(); loss.backward()
        inj.after_backward(step)
        opt.step()
"""
from __future__ import annotations

import hashlib
import math
from collections.abc import Callable
from dataclasses import dataclass
from numbers import Real

import torch
from torch import Tensor, nn

from ..checks import check_int

FAULT_KINDS: tuple[str, ...] = (
    "nan_batch", "inf_grad", "lr_spike", "exploding_init", "vanishing",
    "dead_relu", "label_noise", "input_scale", "input_noise", "plateau",
    "layer_grad_vanish", "layer_grad_explode", "dead_units", "weight_drift", "label_permute",
    "input_corrupt", "lr_ramp", "stall",
)
QUIET_KINDS: tuple[str, ...] = FAULT_KINDS[10:]  # one layer or part of a batch: macro barely moves

DEFAULT_MAGNITUDES: dict[str, float] = {
    "nan_batch": 0.1,  # fraction of the batch's input entries set to NaN (at least one)
    "inf_grad": 0.01,  # fraction of the layer's weight-gradient entries set to +Inf (at least one)
    "lr_spike": 100.0,  # learning-rate factor (> 1)
    "exploding_init": 30.0,  # weight factor (> 1)
    "vanishing": 1e-3,  # weight factor, in (0, 1)
    "dead_relu": -10.0,  # added to the bias (< 0)
    "label_noise": 0.5,  # fraction of each batch's labels replaced
    "input_scale": 100.0,  # input factor (> 0, != 1)
    "input_noise": 3.0,  # std of the added Gaussian noise (> 0)
    "plateau": 1e-4,  # learning-rate factor, in (0, 1)
    "layer_grad_vanish": 1e-3,  # gradient factor per step, in (0, 1)
    "layer_grad_explode": 30.0,  # gradient factor per step (> 1)
    "dead_units": 0.25,  # fraction of the layer's output units killed (at least one)
    "weight_drift": 0.97,  # weight factor per step, in (0, 1) shrinks, > 1 grows
    "label_permute": 0.5,  # fraction of each batch's labels shifted by one class
    "input_corrupt": 0.25,  # fraction of each batch's rows replaced by noise (at least one)
    "lr_ramp": 1.15,  # learning-rate factor per step (> 1)
    "stall": 0.0,  # gradient factor per step; 0 freezes the run, in [0, 1)
}

BATCH_KINDS = frozenset({"nan_batch", "label_noise", "input_scale", "input_noise", "label_permute",
                         "input_corrupt"})
LR_KINDS = frozenset({"lr_spike", "plateau", "lr_ramp"})
LAYER_KINDS = frozenset({"inf_grad", "exploding_init", "vanishing", "dead_relu", "layer_grad_vanish",
                         "layer_grad_explode", "dead_units", "weight_drift"})
MODEL_KINDS = LR_KINDS | {"exploding_init", "vanishing", "dead_relu", "dead_units", "weight_drift"}
GRAD_KINDS = frozenset({"inf_grad", "layer_grad_vanish", "layer_grad_explode", "stall"})  # after_backward
LABEL_KINDS = frozenset({"label_noise", "label_permute"})  # need n_classes
REPEATED_KINDS = frozenset({"weight_drift", "lr_ramp", "layer_grad_vanish", "layer_grad_explode", "stall"})
_FRACTION_KINDS = frozenset({"nan_batch", "inf_grad", "label_noise", "dead_units", "label_permute",
                             "input_corrupt"})

# Valid magnitudes per kind, with the phrase used in the error message.
_VALID: dict[str, tuple[str, Callable[[float], bool]]] = {
    **{k: ("in (0, 1]", lambda m: 0 < m <= 1) for k in _FRACTION_KINDS},
    "lr_spike": ("> 1", lambda m: m > 1),
    "exploding_init": ("> 1", lambda m: m > 1),
    "vanishing": ("in (0, 1)", lambda m: 0 < m < 1),
    "plateau": ("in (0, 1)", lambda m: 0 < m < 1),
    "dead_relu": ("< 0", lambda m: m < 0),
    "input_scale": ("> 0 and != 1", lambda m: m > 0 and m != 1),
    "input_noise": ("> 0", lambda m: m > 0),
    "layer_grad_vanish": ("in (0, 1)", lambda m: 0 < m < 1),
    "layer_grad_explode": ("> 1", lambda m: m > 1),
    "weight_drift": ("> 0 and != 1", lambda m: m > 0 and m != 1),
    "lr_ramp": ("> 1", lambda m: m > 1),
    "stall": ("in [0, 1)", lambda m: 0 <= m < 1),
}


@dataclass(frozen=True)
class Fault:
    """One fault: what breaks, from which step, in which layer, how hard.

    Raises:
        ValueError: unknown ``kind``, ``step`` not an int >= 0, ``layer`` not a non-empty
            string or None, ``magnitude`` not a finite number in the kind's range, or
            ``seed`` not an int in [0, 2**31).
    """

    kind: str  # one of FAULT_KINDS
    step: int  # first step the fault acts on
    layer: str | None = None  # name in model.named_modules(); None -> first Linear/Conv
    magnitude: float | None = None  # kind-specific; None -> DEFAULT_MAGNITUDES[kind]
    seed: int = 0  # seeds the random parts (which entries, which labels, the noise)

    def __post_init__(self) -> None:
        if self.kind not in FAULT_KINDS:
            raise ValueError(f"Fault.kind must be one of {FAULT_KINDS}, got {self.kind!r}")
        check_int("Fault.step", self.step, 0)
        if self.layer is not None and (not isinstance(self.layer, str) or not self.layer):
            raise ValueError(f"Fault.layer must be a non-empty module name or None, got {self.layer!r}")
        check_int("Fault.seed", self.seed, 0, 2**31 - 1)
        m = self.magnitude
        if m is not None:
            rule, ok = _VALID[self.kind]
            if isinstance(m, bool) or not isinstance(m, Real) or not math.isfinite(m) or not ok(m):
                raise ValueError(f"Fault.magnitude for kind {self.kind!r} must be a finite number "
                                 f"{rule}, got {m!r}")

    @property
    def strength(self) -> float:
        """The magnitude in effect: ``magnitude``, or the kind's default when it is None."""
        return DEFAULT_MAGNITUDES[self.kind] if self.magnitude is None else float(self.magnitude)


def _weighted(module: nn.Module) -> bool:
    return isinstance(getattr(module, "weight", None), nn.Parameter)


def _has_bias(module: nn.Module) -> bool:
    return _weighted(module) and isinstance(getattr(module, "bias", None), nn.Parameter)


def _is_scalable(module: nn.Module) -> bool:
    """A layer whose weight is a matrix or kernel (not a norm layer's per-channel scale)."""
    return _weighted(module) and module.weight.dim() >= 2


def _is_linear_or_conv(module: nn.Module) -> bool:
    return isinstance(module, (nn.Linear, nn.modules.conv._ConvNd)) and _weighted(module)


_LAYER_RULES: dict[str, tuple[Callable[[nn.Module], bool], str]] = {
    "dead_relu": (_has_bias, "weight and bias parameters"),
    "dead_units": (_has_bias, "weight and bias parameters"),
    "vanishing": (_is_scalable, "a weight parameter of 2 or more dimensions"),
    "weight_drift": (_is_scalable, "a weight parameter of 2 or more dimensions"),
}


def layer_candidates(model: nn.Module, kind: str) -> list[str]:
    """Names of the layers of ``model`` that a layer fault of ``kind`` can act on, in order."""
    usable, _ = _LAYER_RULES.get(kind, (_weighted, ""))
    return [n for n, mod in model.named_modules() if n and usable(mod)]


class FaultInjector:
    """Applies one :class:`Fault` (or None for a clean run) to a model, its optimiser and its batches.

    Call :meth:`before_step`, :meth:`batch` and :meth:`after_backward` at the places shown in
    the module docstring, every step; each does nothing for faults of another kind or before
    ``fault.step``. Model and optimiser changes are made once, at the first
    :meth:`before_step` with ``step >= fault.step``, except the repeated ones (``weight_drift``,
    ``lr_ramp``), which act at every step from then on; ``nan_batch`` and ``inf_grad`` fire
    once, at their first call with ``step >= fault.step``; the other batch and gradient faults
    act on every step from ``fault.step`` on. Random choices come from a generator on the tensors' device seeded
    from ``(fault.seed, step)``, so a step's corruption does not depend on earlier calls.

    Raises:
        ValueError: ``fault`` is not a Fault or None; an lr fault without ``optimizer``;
            ``label_noise`` without ``n_classes`` >= 2; a layer fault whose layer does not
            exist or lacks the parameter it needs (the message lists the valid names).
    """

    def __init__(self, fault: Fault | None, model: nn.Module,
                 optimizer: torch.optim.Optimizer | None = None,
                 n_classes: int | None = None) -> None:
        if fault is not None and not isinstance(fault, Fault):
            raise ValueError(f"FaultInjector.fault must be a Fault or None, got {type(fault).__name__}")
        if not isinstance(model, nn.Module):
            raise ValueError(f"FaultInjector.model must be an nn.Module, got {type(model).__name__}")
        self.fault = fault
        self.model = model
        self.optimizer = optimizer
        self.n_classes = n_classes
        self._fired = False  # one-time faults already applied
        self._generators: dict[torch.device, torch.Generator] = {}
        self._layer: str | None = None
        if fault is None:
            return
        if fault.kind in LR_KINDS and optimizer is None:
            raise ValueError(f"FaultInjector.optimizer is None: fault kind {fault.kind!r} changes "
                             "the learning rate and needs the optimiser")
        if fault.kind in LABEL_KINDS:
            check_int(f"FaultInjector.n_classes for fault kind {fault.kind!r}", n_classes, 2)
        if fault.kind in LAYER_KINDS:
            self._layer = self._resolve_layer(fault)

    # --- public API ---------------------------------------------------------------------------

    @property
    def target_layer(self) -> str | None:
        """The name of the layer a layer fault acts on (None for other kinds and clean runs)."""
        return self._layer

    def active(self, step: int) -> bool:
        """True from ``fault.step`` on (always False for a clean run)."""
        return self.fault is not None and step >= self.fault.step

    def batch(self, step: int, x: Tensor, y: Tensor) -> tuple[Tensor, Tensor]:
        """The batch the model should see at ``step``: ``(x, y)`` itself, or corrupted copies.

        The caller's tensors are never modified in place.

        Raises:
            ValueError: an input fault on a non-floating ``x``, or ``label_noise`` on
                non-integer ``y``.
        """
        f = self.fault
        if f is None or f.kind not in BATCH_KINDS or not self.active(step):
            return x, y
        m = f.strength
        if f.kind in LABEL_KINDS:
            if y.is_floating_point() or y.is_complex() or y.dtype == torch.bool:
                raise ValueError(f"FaultInjector.batch: {f.kind} needs integer class labels, "
                                 f"got y.dtype={y.dtype}")
            g = self._generator(y.device, step)
            n = y.numel()
            k = round(m * n)
            idx = torch.randperm(n, generator=g, device=y.device)[:k]
            if f.kind == "label_noise":
                new = torch.randint(0, self.n_classes, (k,), generator=g, device=y.device, dtype=y.dtype)
            else:  # label_permute: a systematic error, the next class
                new = (y.flatten()[idx] + 1) % self.n_classes
            return x, y.flatten().index_copy(0, idx, new).view_as(y)
        if not x.is_floating_point():
            raise ValueError(f"FaultInjector.batch: fault kind {f.kind!r} needs floating inputs, "
                             f"got x.dtype={x.dtype}")
        if f.kind == "input_scale":
            return x * m, y
        if f.kind == "input_noise":
            g = self._generator(x.device, step)
            return x + m * torch.randn(x.shape, generator=g, device=x.device, dtype=x.dtype), y
        if f.kind == "input_corrupt":  # some rows (examples) become noise; the rest are intact
            g = self._generator(x.device, step)
            rows = torch.randperm(x.shape[0], generator=g, device=x.device)[:max(1, round(m * x.shape[0]))]
            noise = 3.0 * torch.randn((len(rows), *x.shape[1:]), generator=g, device=x.device, dtype=x.dtype)
            return x.index_copy(0, rows, noise), y
        # nan_batch: one poisoned batch is enough; SGD carries the NaN into every weight
        if self._fired:
            return x, y
        self._fired = True
        g = self._generator(x.device, step)
        n = x.numel()
        idx = torch.randperm(n, generator=g, device=x.device)[:max(1, round(m * n))]
        return x.flatten().index_fill(0, idx, math.nan).view_as(x), y

    @torch.no_grad()
    def before_step(self, step: int) -> None:
        """Apply a model or optimiser fault, once, at the first call with ``step >= fault.step``."""
        f = self.fault
        if f is None or f.kind not in MODEL_KINDS or self._fired or not self.active(step):
            return
        self._fired = f.kind not in REPEATED_KINDS
        m = f.strength
        if f.kind in LR_KINDS:
            for group in self.optimizer.param_groups:
                group["lr"] = group["lr"] * m
        elif f.kind in ("exploding_init", "weight_drift"):
            self._module(self._layer).weight.mul_(m)
        elif f.kind == "dead_relu":
            self._module(self._layer).bias.add_(m)
        elif f.kind == "dead_units":  # no input reaches them, a negative bias: a ReLU after is 0
            module = self._module(self._layer)
            units = module.weight.shape[0]
            g = self._generator(module.weight.device, step)
            idx = torch.randperm(units, generator=g, device=module.weight.device)[:max(1, round(m * units))]
            module.weight[idx] = 0.0
            module.bias[idx] = -1.0
        else:  # vanishing: the layer and every weighted layer registered after it
            names = [n for n, mod in self.model.named_modules() if _is_scalable(mod)]
            for name in names[names.index(self._layer):]:
                self._module(name).weight.mul_(m)

    @torch.no_grad()
    def after_backward(self, step: int) -> None:
        """Change gradients: +Inf into the layer's weight gradient once (``inf_grad``); the
        layer's gradients scaled (``layer_grad_vanish``, ``layer_grad_explode``) or every
        gradient scaled (``stall``) at every step.

        Raises:
            RuntimeError: the layer's weight has no gradient when the fault should fire
                (call this after ``loss.backward()``).
        """
        f = self.fault
        if f is None or f.kind not in GRAD_KINDS or self._fired or not self.active(step):
            return
        if f.kind in REPEATED_KINDS:
            params = self.model.parameters() if f.kind == "stall" else \
                self._module(self._layer).parameters(recurse=False)
            for p in params:
                if p.grad is not None:
                    p.grad.mul_(f.strength)
            return
        weight = self._module(self._layer).weight
        if weight.grad is None:
            raise RuntimeError(f"FaultInjector.after_backward(step={step}): layer {self._layer!r} "
                               "has no weight gradient; call it after loss.backward()")
        self._fired = True
        grad = weight.grad
        n = grad.numel()
        idx = torch.randperm(n, generator=self._generator(grad.device, step), device=grad.device)
        mask = torch.zeros(n, dtype=torch.bool, device=grad.device)
        mask[idx[:max(1, round(f.strength * n))]] = True
        grad.masked_fill_(mask.view_as(grad), math.inf)

    # --- helpers ------------------------------------------------------------------------------

    def _module(self, name: str) -> nn.Module:
        return self.model.get_submodule(name)

    def _resolve_layer(self, fault: Fault) -> str:
        usable, what = _LAYER_RULES.get(fault.kind, (_weighted, "a weight parameter"))
        valid = layer_candidates(self.model, fault.kind)
        if fault.layer is None:
            for name, mod in self.model.named_modules():
                if _is_linear_or_conv(mod) and usable(mod):
                    return name
            raise ValueError(f"Fault.layer=None: the model has no Linear/Conv layer with {what} "
                             f"for fault kind {fault.kind!r}; valid layer names: {valid}")
        if fault.layer not in valid:
            exists = fault.layer in dict(self.model.named_modules())
            why = f"lacks {what}" if exists else "is not a module of the model"
            raise ValueError(f"Fault.layer={fault.layer!r} {why} (fault kind {fault.kind!r}); "
                             f"valid layer names: {valid}")
        return fault.layer

    def _generator(self, device: torch.device, step: int) -> torch.Generator:
        g = self._generators.get(device)
        if g is None:
            g = self._generators[device] = torch.Generator(device=device)
        # a hash of (seed, step) that fits in 32 bits: the CPU generator ignores higher bits
        key = hashlib.blake2b(f"{self.fault.seed},{step}".encode(), digest_size=4).digest()
        return g.manual_seed(int.from_bytes(key, "little"))

