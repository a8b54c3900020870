"""Models built in code for partitioning: every one traces with torch.fx.

Chains (MLPs with uneven widths, plain CNNs), small GPTs whose output layer dominates, and
branchy models (residual and inception-style blocks). :func:`zoo` returns them with an example
batch each, the set the benchmark and the notebook partition.
"""
from __future__ import annotations

from collections.abc import Sequence

import torch
import torch.nn.functional as F
from torch import nn


class Block(nn.Module):
    """Pre-norm transformer block; causal attention through scaled_dot_product_attention."""

    def __init__(self, d: int, heads: int) -> None:
        super().__init__()
        self.heads = heads
        self.ln1, self.ln2 = nn.LayerNorm(d), nn.LayerNorm(d)
        self.qkv, self.proj = nn.Linear(d, 3 * d), nn.Linear(d, d)
        self.up, self.down = nn.Linear(d, 4 * d), nn.Linear(4 * d, d)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        b, t, d = x.shape
        q, k, v = self.qkv(self.ln1(x)).split(d, dim=-1)
        shape = (b, t, self.heads, d // self.heads)
        q, k, v = (z.reshape(shape).transpose(1, 2) for z in (q, k, v))
        att = F.scaled_dot_product_attention(q, k, v, is_causal=True)
        x = x + self.proj(att.transpose(1, 2).reshape(b, t, d))
        return x + self.down(F.gelu(self.up(self.ln2(x))))


class GPT(nn.Module):
    """A small decoder-only transformer of fixed context: token ids (B, T) -> logits (B, T, vocab).

    fx-traceable (no slicing by the input's length), so it can be split at operation level; a
    large ``vocab`` makes the output Linear the dominant node.
    """

    def __init__(self, vocab: int = 8192, d: int = 64, layers: int = 4, heads: int = 4,
                 seq_len: int = 32) -> None:
        super().__init__()
        if d % heads:
            raise ValueError(f"d={d} must be divisible by heads={heads}")
        self.embed = nn.Embedding(vocab, d)
        self.pos = nn.Parameter(torch.zeros(seq_len, d))
        self.blocks = nn.Sequential(*(Block(d, heads) for _ in range(layers)))
        self.ln = nn.LayerNorm(d)
        self.head = nn.Linear(d, vocab)

    def forward(self, ids: torch.Tensor) -> torch.Tensor:
        return self.head(self.ln(self.blocks(self.embed(ids) + self.pos)))


def uneven_mlp(widths: Sequence[int]) -> nn.Sequential:
    """Linear + ReLU layers through ``widths`` (the last layer without activation)."""
    layers: list[nn.Module] = []
    for i, (a, b) in enumerate(zip(widths[:-1], widths[1:])):
        layers.append(nn.Linear(a, b))
        if i < len(widths) - 2:
            layers.append(nn.ReLU())
    return nn.Sequential(*layers)


def cnn(channels: Sequence[int], classes: int = 10, pool_every: int = 2) -> nn.Sequential:
    """Conv-BN-ReLU stages through ``channels``, pooling every ``pool_every`` convs, then a head."""
    layers: list[nn.Module] = []
    for i, (a, b) in enumerate(zip(channels[:-1], channels[1:])):
        layers += [nn.Conv2d(a, b, 3, padding=1), nn.BatchNorm2d(b), nn.ReLU()]
        if (i + 1) % pool_every == 0:
            layers.append(nn.MaxPool2d(2))
    layers += [nn.AdaptiveAvgPool2d(1), nn.Flatten(), nn.Linear(channels[-1], classes)]
    return nn.Sequential(*layers)


class ResMLP(nn.Module):
    """Residual MLP blocks: every block's input skips over it (a branch per block)."""

    def __init__(self, d: int = 256, blocks: int = 6, hidden: int = 1024, out: int = 10) -> None:
        super().__init__()
        self.inp = nn.Linear(64, d)
        self.ups = nn.ModuleList(nn.Linear(d, hidden) for _ in range(blocks))
        self.downs = nn.ModuleList(nn.Linear(hidden, d) for _ in range(blocks))
        self.out = nn.Linear(d, out)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        h = self.inp(x)
        for up, down in zip(self.ups, self.downs):
            h = h + down(torch.relu(up(h)))
        return self.out(h)


class Inception(nn.Module):
    """Blocks of parallel branches of unequal cost (1x1, 3x3, 5x5 convs) joined by concatenation."""

    def __init__(self, channels: int = 16, blocks: int = 3, classes: int = 10) -> None:
        super().__init__()
        c = channels
        self.stem = nn.Conv2d(3, c, 3, padding=1)
        self.b1 = nn.ModuleList(nn.Conv2d(c, c, 1) for _ in range(blocks))
        self.b3 = nn.ModuleList(nn.Conv2d(c, c, 3, padding=1) for _ in range(blocks))
        self.b5 = nn.ModuleList(nn.Sequential(nn.Conv2d(c, c, 3, padding=1), nn.ReLU(),
                                              nn.Conv2d(c, c, 5, padding=2)) for _ in range(blocks))
        self.mix = nn.ModuleList(nn.Conv2d(3 * c, c, 1) for _ in range(blocks))
        self.head = nn.Linear(c, classes)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        h = torch.relu(self.stem(x))
        for b1, b3, b5, mix in zip(self.b1, self.b3, self.b5, self.mix):
            h = torch.relu(mix(torch.cat([b1(h), b3(h), b5(h)], dim=1))) + h
        return self.head(h.mean(dim=(2, 3)))


class TwoTower(nn.Module):
    """Two towers of different depth on the same input, merged at the end (a wide branch)."""

    def __init__(self, d: int = 128, deep: int = 6, shallow: int = 2, out: int = 10) -> None:
        super().__init__()
        self.deep = uneven_mlp([64] + [d] * deep)
        self.shallow = uneven_mlp([64] + [4 * d] * shallow)
        self.head = nn.Linear(d + 4 * d, out)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.head(torch.cat([torch.relu(self.deep(x)), torch.relu(self.shallow(x))], dim=-1))


def zoo(batch: int = 32, seed: int = 0) -> dict[str, tuple[nn.Module, torch.Tensor]]:
    """Twelve named models with an example batch each (CPU, seeded)."""
    torch.manual_seed(seed)
    g = torch.Generator().manual_seed(seed)
    x64 = torch.randn(batch, 64, generator=g)
    img = torch.randn(batch // 4, 3, 32, 32, generator=g)
    ids = torch.randint(0, 8192, (batch // 4, 32), generator=g)
    return {
        "mlp-funnel": (uneven_mlp([64, 2048, 1024, 512, 256, 128, 64, 32, 10]), x64),
        "mlp-bulge": (uneven_mlp([64, 128, 512, 2048, 2048, 512, 128, 10]), x64),
        "mlp-deep": (uneven_mlp([64] + [256, 1024] * 8 + [10]), x64),
        "cnn-small": (cnn([3, 16, 32, 32, 64, 64]), img),
        "cnn-wide": (cnn([3, 64, 64, 128, 128, 256, 256], pool_every=2), img),
        "cnn-deep": (cnn([3] + [32] * 12, pool_every=4), img),
        "gpt-small": (GPT(vocab=8192, d=64, layers=4), ids),
        "gpt-deep": (GPT(vocab=8192, d=64, layers=8), ids),
        "gpt-wide": (GPT(vocab=8192, d=128, layers=4), ids),
        "resmlp": (ResMLP(), x64),
        "inception": (Inception(), img),
        "two-tower": (TwoTower(), x64),
    }
