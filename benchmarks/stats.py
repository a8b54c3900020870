"""Per-layer gradient statistics every step: batched (ours) against two per-tensor anchors.

On the gradients of three small models built here from ``torch.nn`` (an MLP, a CNN and a
transformer encoder, whose many small parameter tensors are where batching should matter), the
script times one training step (forward + backward + SGD) without statistics and then, for each
way of getting the eight statistics of :data:`adaptive_kit.stats.STAT_NAMES` per layer, the extra
time per step it costs:

  ours       ``batched_stats(module_tensors(model))`` then one ``HostCopy(...).wait()``:
             one host transfer per step, a fixed number of kernels whatever the layer count.
  naive      a loop over layers computing the 7 non-count statistics with separate torch calls
             and ``.item()`` on each: 7 x L host synchronisations per step.
  per-tensor a loop over layers computing the same statistics with torch ops on the device,
             stacked and moved to the host once per step (1 synchronisation).

All three have the same semantics (finite-only moments, min/max/norm, counts of non-finite and
zero entries); before timing, the script checks that the anchors agree with ours on the real
gradients and on a copy poisoned with NaN/Inf, and stops if they do not. Times are medians over
repeats after warm-up, with methods interleaved within each repeat; ``torch.cuda.synchronize``
is called only around the timed regions, never inside a method. Host synchronisations are
counted by construction. The device comes from ``adaptive_kit.pick_device()`` (CUDA when present).

Run from the repository root::

    .venv/bin/python benchmarks/stats.py                  # full run, a few minutes on 2 CPU cores
    .venv/bin/python benchmarks/stats.py --quick          # fewer repeats, well under 3 minutes
    .venv/bin/python benchmarks/stats.py --json out.json  # also write table + machine as JSON
    .venv/bin/python benchmarks/stats.py --threads 0      # torch's default thread count (CPU)
"""
from __future__ import annotations

import math
import statistics
import sys
import time
from collections.abc import Callable
from dataclasses import dataclass

import pandas as pd
import torch
from machine import Clock, describe, epilogue, parse_args
from torch import nn

from adaptive_kit import pick_device, seed_everything
from adaptive_kit.stats import HostCopy, batched_stats, module_tensors

Groups = dict[str, list[torch.Tensor]]


# ----------------------------------------------------------------------------------- models
@dataclass(frozen=True)
class Workload:
    name: str
    model: nn.Module
    inputs: torch.Tensor
    targets: torch.Tensor
    loss: Callable[[torch.Tensor, torch.Tensor], torch.Tensor]


class TinyTransformer(nn.Module):
    """Token embedding + ``nn.TransformerEncoder`` + linear head (a language-model shape)."""

    def __init__(self, vocab: int = 256, d_model: int = 128, layers: int = 4, seq: int = 32) -> None:
        super().__init__()
        self.embed = nn.Embedding(vocab, d_model)
        self.pos = nn.Parameter(torch.zeros(seq, d_model))
        layer = nn.TransformerEncoderLayer(
            d_model, nhead=4, dim_feedforward=4 * d_model, dropout=0.0, batch_first=True
        )
        self.encoder = nn.TransformerEncoder(layer, num_layers=layers, enable_nested_tensor=False)
        self.head = nn.Linear(d_model, vocab)

    def forward(self, tokens: torch.Tensor) -> torch.Tensor:  # (B, T) -> (B, T, vocab)
        return self.head(self.encoder(self.embed(tokens) + self.pos))


def build_workloads(device: torch.device) -> list[Workload]:
    seed_everything(0)
    ce = nn.functional.cross_entropy
    mlp = nn.Sequential(  # 8x8 digits-like input
        nn.Linear(64, 256), nn.ReLU(), nn.Linear(256, 256), nn.ReLU(), nn.Linear(256, 10)
    )
    cnn = nn.Sequential(  # 1x28x28 input
        nn.Conv2d(1, 16, 3, padding=1), nn.ReLU(), nn.MaxPool2d(2),  # (B, 16, 14, 14)
        nn.Conv2d(16, 32, 3, padding=1), nn.ReLU(), nn.MaxPool2d(2),  # (B, 32, 7, 7)
        nn.Conv2d(32, 32, 3, padding=1), nn.ReLU(),
        nn.Flatten(), nn.Linear(32 * 7 * 7, 128), nn.ReLU(), nn.Linear(128, 10),
    )
    vocab, seq = 256, 32
    tr = TinyTransformer(vocab=vocab, seq=seq)
    tokens = torch.randint(0, vocab, (16, seq))
    return [
        Workload("mlp", mlp.to(device), torch.randn(64, 64).to(device),
                 torch.randint(0, 10, (64,)).to(device), ce),
        Workload("cnn", cnn.to(device), torch.randn(32, 1, 28, 28).to(device),
                 torch.randint(0, 10, (32,)).to(device), ce),
        Workload("transformer", tr.to(device), tokens.to(device),
                 torch.roll(tokens, -1, dims=1).to(device),
                 lambda out, y: ce(out.reshape(-1, out.shape[-1]), y.reshape(-1))),
    ]


def make_step(w: Workload) -> Callable[[], None]:
    opt = torch.optim.SGD(w.model.parameters(), lr=1e-3)

    def step() -> None:
        opt.zero_grad()
        w.loss(w.model(w.inputs), w.targets).backward()
        opt.step()

    return step


# ---------------------------------------------------------------------------------- methods
def ours(groups: Groups) -> torch.Tensor:
    return HostCopy(batched_stats(groups)).wait()  # (L, 8) float64 on the host, 1 transfer


def _layer_terms(group: list[torch.Tensor]) -> list[torch.Tensor]:
    """The 7 non-count statistics of one layer as 0-d device tensors, same semantics as ours."""
    acc = torch.float64 if any(t.dtype == torch.float64 for t in group) else torch.float32
    x = torch.cat([t.detach().reshape(-1).to(acc) for t in group])
    if x.numel() == 0:  # known on the host: no device work, no sync
        nan = torch.tensor(math.nan, dtype=acc, device=x.device)
        return [nan, nan, nan, nan, torch.zeros_like(nan), torch.zeros_like(nan), nan]
    # the same element-wise formulation as ours, so that the comparison is about batching only
    x0 = torch.nan_to_num(x, nan=0.0, posinf=0.0, neginf=0.0)
    finite = (x0 == x).to(acc)
    n = finite.sum()
    mean = x0.sum() / n  # NaN when no finite entry
    dev = (x0 - mean) * finite
    std = torch.sqrt((dev * dev).sum() / n)
    lo = torch.where(n > 0, torch.nan_to_num(x, nan=math.inf, neginf=math.inf).amin(), math.nan)
    hi = torch.where(n > 0, torch.nan_to_num(x, nan=-math.inf, posinf=-math.inf).amax(), math.nan)
    norm = torch.sqrt((x0 * x0).sum())
    nonfinite = x.numel() - n
    zero_frac = (x == 0).sum() / x.numel()
    return [mean, std, lo, hi, norm, nonfinite, zero_frac]


def naive(groups: Groups) -> torch.Tensor:
    rows = []
    for group in groups.values():
        count = float(sum(t.numel() for t in group))  # host metadata, no sync
        rows.append([count] + [v.item() for v in _layer_terms(group)])  # 7 syncs per layer
    return torch.tensor(rows, dtype=torch.float64)


def per_tensor(groups: Groups) -> torch.Tensor:
    rows = []
    for group in groups.values():
        terms = _layer_terms(group)
        count = torch.tensor(float(sum(t.numel() for t in group)), device=terms[0].device)
        rows.append(torch.stack([v.to(torch.float64) for v in [count, *terms]]))
    return torch.stack(rows).cpu()  # 1 sync


METHODS: dict[str, Callable[[Groups], torch.Tensor]] = {
    "ours": ours, "naive": naive, "per-tensor": per_tensor,
}


def host_syncs(method: str, n_layers: int) -> int:
    return {"ours": 1, "naive": 7 * n_layers, "per-tensor": 1}[method]


# ------------------------------------------------------------------------------------ check
def poisoned(groups: Groups) -> Groups:
    """A copy of the gradients with NaN, +-Inf and exact zeros, and one layer with no finite entry."""
    out: Groups = {}
    for i, (key, group) in enumerate(groups.items()):
        copies = [t.detach().clone() for t in group]
        flat = copies[0].view(-1)
        if i == 0:
            flat.fill_(math.nan)
        else:
            flat[:: 5] = 0.0
            flat[1] = math.nan
            if flat.numel() > 3:
                flat[2], flat[3] = math.inf, -math.inf
        out[key] = copies
    return out


def check_agreement(groups: Groups) -> None:
    for label, g in (("gradients", groups), ("poisoned gradients", poisoned(groups))):
        ref = ours(g)
        scale = ref[:, 3:5].abs().nan_to_num(0.0).amax(dim=1, keepdim=True).clamp(min=1e-30)
        for name in ("naive", "per-tensor"):
            got = METHODS[name](g)
            err = ((got - ref).abs() / scale).nan_to_num(0.0)
            same_nan = torch.equal(got.isnan(), ref.isnan())
            if got.shape != ref.shape or not same_nan or err.max().item() > 1e-4:
                sys.exit(f"{name} disagrees with ours on {label}: max rel err {err.max().item():.3g}")


# ----------------------------------------------------------------------------------- timing
def _sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def _timed(fn: Callable[[], object], device: torch.device) -> float:
    _sync(device)
    t0 = time.perf_counter()
    fn()
    _sync(device)
    return time.perf_counter() - t0


def bench_workload(w: Workload, device: torch.device, repeats: int, warmup: int) -> list[dict]:
    step = make_step(w)
    step()
    n_layers = len(module_tensors(w.model))
    check_agreement(module_tensors(w.model))
    for _ in range(warmup):
        step()
        for fn in METHODS.values():
            fn(module_tensors(w.model))
    times: dict[str, list[float]] = {"step": [], **{m: [] for m in METHODS}}
    names = list(METHODS)
    for r in range(repeats):
        times["step"].append(_timed(step, device))
        for m in names[r % len(names):] + names[: r % len(names)]:  # rotate the order
            times[m].append(_timed(lambda m=m: METHODS[m](module_tensors(w.model)), device))
    step_s = statistics.median(times["step"])
    ours_s = statistics.median(times["ours"])
    n_params = sum(p.numel() for p in w.model.parameters())
    rows = []
    for m in names:
        t = statistics.median(times[m])
        rows.append({
            "model": w.name,
            "layers": n_layers,
            "params": n_params,
            "method": m,
            "step_ms": round(step_s * 1e3, 3),
            "stats_ms": round(t * 1e3, 3),
            "overhead_%": round(100 * t / step_s, 1),
            "host_syncs": host_syncs(m, n_layers),
            "x_ours": round(t / ours_s, 2),
        })
    return rows


def main(argv: list[str] | None = None) -> pd.DataFrame:
    args = parse_args(__doc__.splitlines()[0], "fewer repeats (well under 3 min)", argv)
    repeats, warmup = (15, 3) if args.quick else (100, 10)
    device = pick_device()
    info = describe(device)
    print(f"device={device} cpu={info['cpu']!r} cores={info['cpu_count']} "
          f"threads={info['torch_threads']} torch={info['torch']} repeats={repeats} warmup={warmup}")
    clock = Clock()
    rows = []
    with clock.section("workloads"):
        for w in build_workloads(device):
            rows.extend(bench_workload(w, device, repeats, warmup))
    table = pd.DataFrame(rows)
    print("anchors checked against ours (real and NaN/Inf-poisoned gradients): agree to 1e-4")
    print(table.to_string(index=False))
    print(f"stats_ms: extra time per step; overhead_%: stats_ms / step_ms; x_ours: stats_ms / "
          f"ours' stats_ms; medians of {repeats} repeats")
    epilogue(args, {"machine": info, "repeats": repeats, "warmup": warmup,
                    "rows": table.to_dict(orient="records")}, clock)
    return table


if __name__ == "__main__":
    main()
