"""Member specifications (architecture + hyper-parameters), the search space, similarity, the builder."""
from __future__ import annotations

import dataclasses
import math
from collections.abc import Sequence
from dataclasses import dataclass

import numpy as np
import torch
from torch import nn

LAYER_KINDS = ("linear", "conv")  # conv: 3x3, padding 1, on the image shape; conv layers come first
ACTIVATIONS: dict[str, type[nn.Module]] = {"relu": nn.ReLU, "tanh": nn.Tanh, "gelu": nn.GELU}
HPARAMS = ("lr", "momentum", "weight_decay", "batch_size")


class SpecError(ValueError):
    """A member spec or a search space that cannot be built; the message names the field."""


def _int_ge(name: str, v: object, lo: int) -> None:
    if isinstance(v, bool) or not isinstance(v, (int, np.integer)) or v < lo:
        raise SpecError(f"{name} must be an int >= {lo}, got {v!r}")


@dataclass(frozen=True)
class Layer:
    kind: str  # "linear" (width = units) or "conv" (width = channels, 3x3, padding 1)
    width: int  # units or channels, >= 1
    activation: str = "relu"  # a key of ACTIVATIONS

    def __post_init__(self) -> None:
        if self.kind not in LAYER_KINDS:
            raise SpecError(f"Layer.kind={self.kind!r}: unknown layer type; expected one of {LAYER_KINDS}")
        _int_ge("Layer.width", self.width, 1)
        if self.activation not in ACTIVATIONS:
            raise SpecError(f"Layer.activation={self.activation!r}: expected one of {tuple(ACTIVATIONS)}")

    def __str__(self) -> str:
        return f"{self.kind}{self.width}/{self.activation}"


@dataclass(frozen=True)
class MemberSpec:
    """One member: hidden layers (input and output layers are implied by the data) and SGD settings."""

    layers: tuple[Layer, ...] = (Layer("linear", 64),)  # hidden layers, conv before linear
    lr: float = 0.05  # SGD learning rate, > 0
    momentum: float = 0.9  # SGD momentum in [0, 1)
    weight_decay: float = 0.0  # L2 coefficient added to the gradient (torch.optim.SGD), >= 0
    batch_size: int = 32  # examples per step, >= 1

    def __post_init__(self) -> None:
        layers = tuple(self.layers)
        object.__setattr__(self, "layers", layers)
        for i, layer in enumerate(layers):
            if not isinstance(layer, Layer):
                raise SpecError(f"MemberSpec.layers[{i}]={layer!r}: expected a Layer")
        kinds = [layer.kind for layer in layers]
        if "conv" in kinds and "linear" in kinds and kinds.index("linear") < len(kinds) - kinds[::-1].index("conv") - 1:
            raise SpecError(f"MemberSpec.layers={self.arch}: conv layers must come before linear layers")
        if not (isinstance(self.lr, (int, float)) and math.isfinite(self.lr) and self.lr > 0):
            raise SpecError(f"MemberSpec.lr must be a finite number > 0, got {self.lr!r}")
        if not (isinstance(self.momentum, (int, float)) and 0 <= self.momentum < 1):
            raise SpecError(f"MemberSpec.momentum must be in [0, 1), got {self.momentum!r}")
        if not (isinstance(self.weight_decay, (int, float)) and math.isfinite(self.weight_decay)
                and self.weight_decay >= 0):
            raise SpecError(f"MemberSpec.weight_decay must be a finite number >= 0, got {self.weight_decay!r}")
        _int_ge("MemberSpec.batch_size", self.batch_size, 1)

    @property
    def arch(self) -> str:
        """The architecture as text, e.g. ``conv8/relu-linear64/tanh`` (``-`` for none)."""
        return "-".join(map(str, self.layers)) or "-"

    @property
    def group_key(self) -> tuple:
        """Members with equal keys have equal parameter shapes and batch shapes: one vmap batch."""
        return (self.layers, self.batch_size)

    def hparams(self) -> dict[str, float]:
        return {k: getattr(self, k) for k in HPARAMS}

    def replace(self, **changes: object) -> MemberSpec:
        return dataclasses.replace(self, **changes)


def build_model(spec: MemberSpec, n_features: int, n_classes: int,
                image_shape: tuple[int, int, int] | None = None) -> nn.Sequential:
    """The network of ``spec`` for flat inputs of ``n_features`` and ``n_classes`` outputs.

    Conv layers view the input as ``image_shape`` (channels, height, width).

    Raises:
        SpecError: conv layers without an ``image_shape``, or one that does not hold ``n_features``.
    """
    _int_ge("n_features", n_features, 1)
    _int_ge("n_classes", n_classes, 2)
    mods: list[nn.Module] = []
    convs = [layer for layer in spec.layers if layer.kind == "conv"]
    width = n_features
    if convs:
        if image_shape is None or math.prod(image_shape) != n_features:
            raise SpecError(f"image_shape={image_shape!r}: conv layers need (C, H, W) with C*H*W = "
                            f"n_features = {n_features}")
        c, h, wd = image_shape
        mods.append(nn.Unflatten(1, (c, h, wd)))
        for layer in convs:
            mods += [nn.Conv2d(c, layer.width, 3, padding=1), ACTIVATIONS[layer.activation]()]
            c = layer.width
        mods.append(nn.Flatten())
        width = c * h * wd
    for layer in spec.layers[len(convs):]:
        mods += [nn.Linear(width, layer.width), ACTIVATIONS[layer.activation]()]
        width = layer.width
    mods.append(nn.Linear(width, n_classes))
    return nn.Sequential(*mods)


def _range(name: str, lo_hi: tuple[float, float], positive: bool) -> None:
    lo, hi = lo_hi
    if not (math.isfinite(lo) and math.isfinite(hi)) or lo > hi or (positive and lo <= 0):
        raise SpecError(f"SearchSpace.{name}={lo_hi!r}: empty or invalid range"
                        + (" (log scale: both ends must be > 0)" if positive else ""))


@dataclass(frozen=True)
class SearchSpace:
    """Where members are drawn from, perturbed in and bred within.

    Learning rate and weight decay are log-uniform; momentum uniform; depth, widths, kinds,
    activations and batch sizes are choices. ``grid_points`` values per continuous
    hyper-parameter make the grid that ``perturb(mode="grid")`` moves on.
    """

    depth: tuple[int, int] = (1, 2)  # min and max number of hidden layers
    widths: tuple[int, ...] = (16, 32, 64, 128)  # choices of units / channels
    kinds: tuple[str, ...] = ("linear",)  # allowed layer kinds ("conv" needs an image shape)
    activations: tuple[str, ...] = ("relu", "tanh")
    lr: tuple[float, float] = (1e-3, 1.0)  # log-uniform
    momentum: tuple[float, float] = (0.0, 0.95)
    weight_decay: tuple[float, float] = (1e-6, 1e-2)  # log-uniform
    batch_size: tuple[int, ...] = (32,)
    grid_points: int = 7  # grid resolution per continuous hyper-parameter

    def __post_init__(self) -> None:
        for name in ("widths", "kinds", "activations", "batch_size"):
            if len(getattr(self, name)) == 0:
                raise SpecError(f"SearchSpace.{name}=(): empty search space")
        lo, hi = self.depth
        _int_ge("SearchSpace.depth[0]", lo, 0)
        if hi < lo:
            raise SpecError(f"SearchSpace.depth={self.depth!r}: empty range")
        for wd in self.widths:
            _int_ge("SearchSpace.widths[...]", wd, 1)
        for b in self.batch_size:
            _int_ge("SearchSpace.batch_size[...]", b, 1)
        for k in self.kinds:
            if k not in LAYER_KINDS:
                raise SpecError(f"SearchSpace.kinds: unknown layer type {k!r}; expected one of {LAYER_KINDS}")
        for a in self.activations:
            if a not in ACTIVATIONS:
                raise SpecError(f"SearchSpace.activations: unknown activation {a!r}; expected {tuple(ACTIVATIONS)}")
        _range("lr", self.lr, True)
        _range("weight_decay", self.weight_decay, True)
        _range("momentum", self.momentum, False)
        if not 0 <= self.momentum[0] <= self.momentum[1] < 1:
            raise SpecError(f"SearchSpace.momentum={self.momentum!r}: must lie in [0, 1)")
        _int_ge("SearchSpace.grid_points", self.grid_points, 2)

    # -- drawing ------------------------------------------------------------------------------------
    def _layer(self, rng: np.random.Generator, kind: str | None = None) -> Layer:
        return Layer(kind or str(rng.choice(self.kinds)), int(rng.choice(self.widths)),
                     str(rng.choice(self.activations)))

    def _order(self, layers: Sequence[Layer]) -> tuple[Layer, ...]:
        return tuple(sorted(layers, key=lambda layer: layer.kind != "conv"))  # stable: conv first

    def sample(self, rng: np.random.Generator) -> MemberSpec:
        """A spec drawn uniformly from the space."""
        depth = int(rng.integers(self.depth[0], self.depth[1] + 1))
        layers = self._order([self._layer(rng) for _ in range(depth)])
        return MemberSpec(layers, lr=_log_uniform(rng, self.lr), momentum=float(rng.uniform(*self.momentum)),
                          weight_decay=_log_uniform(rng, self.weight_decay),
                          batch_size=int(rng.choice(self.batch_size)))

    def grid(self, name: str) -> np.ndarray:
        """The grid values of a continuous hyper-parameter."""
        lo, hi = getattr(self, name)
        if name in ("lr", "weight_decay"):
            return np.geomspace(lo, hi, self.grid_points)
        return np.linspace(lo, hi, self.grid_points)

    def perturb(self, spec: MemberSpec, rng: np.random.Generator, *, mode: str = "random",
                rate: float = 1.0, factors: tuple[float, float] = (0.8, 1.25), resample: float = 0.25,
                arch_rate: float = 0.0) -> MemberSpec:
        """A neighbour of ``spec``: each hyper-parameter changes with probability ``rate``.

        ``mode="random"`` (PBT's explore): multiply by one of ``factors``, or with probability
        ``resample`` draw afresh; ``mode="grid"``: move one step up or down the grid. Results
        stay inside the space. With probability ``arch_rate`` a layer is added, removed or resized.

        Raises:
            SpecError: an unknown mode or a rate outside [0, 1].
        """
        if mode not in ("random", "grid"):
            raise SpecError(f"perturb(mode={mode!r}): expected 'random' or 'grid'")
        for name, v in (("rate", rate), ("resample", resample), ("arch_rate", arch_rate)):
            if not 0 <= v <= 1:
                raise SpecError(f"perturb({name}={v!r}): must be in [0, 1]")
        fresh = self.sample(rng)
        changes: dict[str, object] = {}
        for name in ("lr", "momentum", "weight_decay"):
            if rng.random() >= rate:
                continue
            v, (lo, hi) = getattr(spec, name), getattr(self, name)
            if mode == "grid":
                g = self.grid(name)
                i = int(np.argmin(np.abs(np.log(g) - math.log(max(v, 1e-300))) if name != "momentum"
                                  else np.abs(g - v)))
                v = float(g[int(np.clip(i + rng.choice((-1, 1)), 0, len(g) - 1))])
            elif rng.random() < resample:
                v = getattr(fresh, name)
            else:
                v = v * float(rng.choice(factors))
            changes[name] = float(np.clip(v, lo, min(hi, np.nextafter(1.0, 0.0)) if name == "momentum" else hi))
        if len(self.batch_size) > 1 and rng.random() < rate * resample:
            changes["batch_size"] = int(rng.choice(self.batch_size))
        if rng.random() < arch_rate:
            changes["layers"] = self._mutate_layers(spec.layers, rng)
        return spec.replace(**changes)

    def _mutate_layers(self, layers: tuple[Layer, ...], rng: np.random.Generator) -> tuple[Layer, ...]:
        out = list(layers)
        moves = [m for m, ok in (("add", len(out) < self.depth[1]), ("remove", len(out) > self.depth[0]),
                                 ("resize", len(out) > 0)) if ok]
        if not moves:
            return layers
        move = str(rng.choice(moves))
        if move == "add":
            out.insert(int(rng.integers(0, len(out) + 1)), self._layer(rng))
        elif move == "remove":
            out.pop(int(rng.integers(0, len(out))))
        else:
            i = int(rng.integers(0, len(out)))
            widths = sorted(self.widths)
            j = int(np.argmin([abs(w - out[i].width) for w in widths]))
            out[i] = dataclasses.replace(out[i], width=widths[int(np.clip(j + rng.choice((-1, 1)), 0, len(widths) - 1))])
        return self._order(out)

    def crossover(self, a: MemberSpec, b: MemberSpec,
                  rng: np.random.Generator) -> tuple[MemberSpec, list[tuple[int, int]]]:
        """A child of ``a`` and ``b``: a prefix of one parent's layers and a suffix of the other's
        (one-point crossover, conv layers kept first, depth kept in the space), each
        hyper-parameter from either parent.

        Returns:
            the child spec and, per child layer, ``(parent, index)``: the parent it came from
            (0 = ``a``, 1 = ``b``) and its position there, which the engine uses to inherit
            weights where shapes allow.
        """
        first = int(rng.integers(0, 2))
        p, q = (a, b) if first == 0 else (b, a)
        cut_p = int(rng.integers(0, len(p.layers) + 1))
        cut_q = int(rng.integers(0, len(q.layers) + 1))
        tagged = ([(layer, first, i) for i, layer in enumerate(p.layers[:cut_p])]
                  + [(layer, 1 - first, cut_q + i) for i, layer in enumerate(q.layers[cut_q:])])
        while len(tagged) > self.depth[1]:
            tagged.pop(int(rng.integers(0, len(tagged))))
        longer, which = (a, 0) if len(a.layers) >= len(b.layers) else (b, 1)
        while len(tagged) < self.depth[0]:  # too short: take the longer parent's next layers
            i = min(len(tagged), len(longer.layers) - 1)
            tagged.append((longer.layers[i], which, i) if longer.layers else (self._layer(rng), which, -1))
        tagged.sort(key=lambda t: t[0].kind != "conv")
        hp = {k: getattr(a if rng.random() < 0.5 else b, k) for k in HPARAMS}
        child = MemberSpec(tuple(t[0] for t in tagged), **hp)
        return child, [(t[1], t[2]) for t in tagged]


def _log_uniform(rng: np.random.Generator, lo_hi: tuple[float, float]) -> float:
    lo, hi = lo_hi
    return float(math.exp(rng.uniform(math.log(lo), math.log(hi))))


@dataclass(frozen=True)
class Similarity:
    """Similarity in [0, 1] between two specs: 1 - weighted mean of an architecture distance and a
    hyper-parameter distance, each in [0, 1].

    The architecture distance aligns the two layer lists (edit distance: inserting or deleting
    a layer costs 1; substituting costs 0.5 for another kind, 0.25 for another activation and
    up to 0.25 for the width ratio, a factor of 8 or more costing the full 0.25), divided by the
    longer list's length. The hyper-parameter distance is the mean absolute difference of log
    learning rate, momentum and log weight decay, each divided by ``scales``.
    """

    arch: float = 0.5  # weight of the architecture distance
    hparams: float = 0.5  # weight of the hyper-parameter distance
    scales: tuple[float, float, float] = (math.log(1000.0), 1.0, math.log(1e4))  # lr (log), momentum, wd (log)

    def __post_init__(self) -> None:
        if self.arch < 0 or self.hparams < 0 or self.arch + self.hparams <= 0:
            raise SpecError(f"Similarity(arch={self.arch!r}, hparams={self.hparams!r}): weights must be >= 0, "
                            "not both 0")
        if any(not s > 0 for s in self.scales):
            raise SpecError(f"Similarity.scales={self.scales!r}: each must be > 0")

    def arch_distance(self, a: MemberSpec, b: MemberSpec) -> float:
        la, lb = a.layers, b.layers
        if not la and not lb:
            return 0.0
        d = np.zeros((len(la) + 1, len(lb) + 1))
        d[:, 0], d[0, :] = np.arange(len(la) + 1), np.arange(len(lb) + 1)
        for i, x in enumerate(la, 1):
            for j, y in enumerate(lb, 1):
                sub = (0.5 * (x.kind != y.kind) + 0.25 * (x.activation != y.activation)
                       + 0.25 * min(1.0, abs(math.log2(x.width / y.width)) / 3))
                d[i, j] = min(d[i - 1, j] + 1, d[i, j - 1] + 1, d[i - 1, j - 1] + sub)
        return float(d[-1, -1] / max(len(la), len(lb)))

    def hparam_distance(self, a: MemberSpec, b: MemberSpec) -> float:
        s_lr, s_m, s_wd = self.scales
        parts = [abs(math.log(a.lr / b.lr)) / s_lr, abs(a.momentum - b.momentum) / s_m,
                 abs(math.log(max(a.weight_decay, 1e-12) / max(b.weight_decay, 1e-12))) / s_wd]
        return float(np.mean(np.minimum(parts, 1.0)))

    def __call__(self, a: MemberSpec, b: MemberSpec) -> float:
        d = (self.arch * self.arch_distance(a, b) + self.hparams * self.hparam_distance(a, b)) / (self.arch + self.hparams)
        return 1.0 - d

    def matrix(self, specs: Sequence[MemberSpec], arch_cache: dict[tuple, float] | None = None) -> np.ndarray:
        """The (N, N) symmetric similarity matrix with ones on the diagonal, fast enough for a live
        256-member dashboard: the architecture distance once per pair of distinct architectures
        (``arch_cache`` keeps them between calls: a swarm has few), the hyper-parameter distance for
        all pairs at once."""
        cache = arch_cache if arch_cache is not None else {}
        archs = list(dict.fromkeys(s.layers for s in specs))
        rep = {layers: next(s for s in specs if s.layers == layers) for layers in archs}
        dist = np.zeros((len(archs), len(archs)))
        for i, a in enumerate(archs):
            for j in range(i + 1, len(archs)):
                b = archs[j]
                if (a, b) not in cache:
                    cache[a, b] = cache[b, a] = self.arch_distance(rep[a], rep[b])
                dist[i, j] = dist[j, i] = cache[a, b]
        where = {layers: i for i, layers in enumerate(archs)}
        idx = np.array([where[s.layers] for s in specs], dtype=int)
        s_lr, s_m, s_wd = self.scales
        cols = (np.log([s.lr for s in specs]) / s_lr, np.array([s.momentum for s in specs], float) / s_m,
                np.log([max(s.weight_decay, 1e-12) for s in specs]) / s_wd)
        hp = np.mean([np.minimum(np.abs(c[:, None] - c[None, :]), 1.0) for c in cols], axis=0)
        out = 1.0 - (self.arch * dist[np.ix_(idx, idx)] + self.hparams * hp) / (self.arch + self.hparams)
        np.fill_diagonal(out, 1.0)
        return out


def n_parameters(spec: MemberSpec, n_features: int, n_classes: int,
                 image_shape: tuple[int, int, int] | None = None) -> int:
    """Number of trainable parameters of ``build_model(spec, ...)``."""
    with torch.device("meta"):
        model = build_model(spec, n_features, n_classes, image_shape)
    return sum(p.numel() for p in model.parameters())
