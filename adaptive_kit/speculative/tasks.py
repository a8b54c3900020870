"""Tasks for the harness: non-IID shards of bundled digits and of seeded token sequences."""
from __future__ import annotations

import functools

import numpy as np
import torch
from torch import nn

from .. import datasets
from ..checks import check_int
from ..training import mlp
from .model import Task, mse


def _check_sizes(fn: str, **sizes: int) -> None:
    for name, v in sizes.items():
        check_int(f"{fn}: {name}", v, 1)


def digits_task(workers: int = 8, alpha: float = 0.1, hidden: tuple[int, ...] = (128, 128),
                seed: int = 0) -> Task:
    """scikit-learn's digits, an MLP, and Dirichlet(``alpha``) label shards, one per worker.

    Raises:
        ValueError: ``workers`` < 1 or ``alpha`` <= 0 (named in the message).
    """
    _check_sizes("digits_task", workers=workers)
    split = datasets.digits(seed=seed)
    parts = datasets.dirichlet_split(split.y_train, workers, alpha, seed=seed, min_size=8)
    shards = [(split.x_train[i], split.y_train[i]) for i in parts]
    build = functools.partial(mlp, (split.n_features, *hidden, split.n_classes))
    return Task(f"digits-mlp(alpha={alpha:g})", build, shards, (split.x_test, split.y_test))


class TinyGPT(nn.Module):
    """A one-block causal transformer: token + position embeddings, attention, MLP, vocab head."""

    def __init__(self, vocab: int = 32, seq_len: int = 16, width: int = 32) -> None:
        super().__init__()
        self.tok = nn.Embedding(vocab, width)
        self.pos = nn.Parameter(torch.zeros(seq_len, width))
        self.ln1 = nn.LayerNorm(width)
        self.qkv = nn.Linear(width, 3 * width)
        self.proj = nn.Linear(width, width)
        self.ln2 = nn.LayerNorm(width)
        self.ff = nn.Sequential(nn.Linear(width, 4 * width), nn.GELU(), nn.Linear(4 * width, width))
        self.head = nn.Linear(width, vocab)
        self.mask = torch.ones(seq_len, seq_len).tril().bool()  # a constant, not a buffer: no state

    def forward(self, tokens: torch.Tensor) -> torch.Tensor:  # (B, T) -> (B, T, vocab)
        t = tokens.shape[-1]
        h = self.tok(tokens) + self.pos[:t]  # (B, T, C)
        q, k, v = self.qkv(self.ln1(h)).chunk(3, dim=-1)
        att = (q @ k.transpose(-1, -2)) / q.shape[-1] ** 0.5  # (B, T, T); vmap-friendly, no SDPA
        att = att.masked_fill(~self.mask[:t, :t].to(att.device), float("-inf")).softmax(-1)
        h = h + self.proj(att @ v)
        h = h + self.ff(self.ln2(h))
        return self.head(h)


def sequence_task(workers: int = 8, alpha: float = 0.1, chains: int = 4, vocab: int = 32,
                  seq_len: int = 16, per_worker: int = 256, seed: int = 0) -> Task:
    """Next-token prediction on seeded Markov chains; each worker mixes ``chains`` chains with
    Dirichlet(``alpha``) weights, the test set mixes them equally.

    Raises:
        ValueError: a size < 1 or ``alpha`` <= 0 (named in the message).
    """
    _check_sizes("sequence_task", workers=workers, chains=chains, vocab=vocab, seq_len=seq_len,
                 per_worker=per_worker)
    if not alpha > 0:
        raise ValueError(f"sequence_task(alpha={alpha!r}): expected > 0")
    n_test = 128
    pools = [datasets.markov_tokens(per_worker * workers + n_test, seq_len + 1, vocab, seed=seed * 1000 + c)
             for c in range(chains)]
    rng = np.random.default_rng(seed)
    shards = []
    for w in range(workers):
        counts = rng.multinomial(per_worker, rng.dirichlet(np.full(chains, float(alpha))))
        seqs = torch.cat([pools[c][w * per_worker: w * per_worker + int(counts[c])] for c in range(chains)])
        shards.append((seqs[:, :-1], seqs[:, 1:]))
    test = torch.cat([pool[-n_test:] for pool in pools])
    build = functools.partial(TinyGPT, vocab, seq_len)
    return Task(f"tiny-gpt(alpha={alpha:g})", build, shards, (test[:, :-1], test[:, 1:]))


def regression_task(workers: int = 8, alpha: float = 0.1, features: int = 8, clusters: int = 4,
                    per_worker: int = 256, noise: float = 0.1, hidden: tuple[int, ...] = (64, 64),
                    seed: int = 0) -> Task:
    """Non-IID regression: inputs from ``clusters`` Gaussian clusters, each worker mixing them with
    Dirichlet(``alpha``) weights (covariate shift), targets from a fixed random teacher network
    plus noise; an MLP trained with mean squared error. Its only metric is the loss.

    Raises:
        ValueError: a size < 1, ``alpha`` <= 0 or ``noise`` < 0 (named in the message).
    """
    _check_sizes("regression_task", workers=workers, features=features, clusters=clusters,
                 per_worker=per_worker)
    if not alpha > 0:
        raise ValueError(f"regression_task(alpha={alpha!r}): expected > 0")
    if not noise >= 0:
        raise ValueError(f"regression_task(noise={noise!r}): expected >= 0")
    gen = torch.Generator().manual_seed(seed)
    centres = 2.0 * torch.randn(clusters, features, generator=gen)
    teacher = [torch.randn(features, 32, generator=gen) / features ** 0.5, torch.randn(32, generator=gen) / 32 ** 0.5]

    def draw(counts: np.ndarray) -> tuple[torch.Tensor, torch.Tensor]:
        x = torch.cat([centres[c] + torch.randn(int(n), features, generator=gen) for c, n in enumerate(counts)])
        y = torch.tanh(x @ teacher[0]) @ teacher[1] * 2.0 + noise * torch.randn(len(x), generator=gen)
        return x, y

    rng = np.random.default_rng(seed)
    shards = [draw(rng.multinomial(per_worker, rng.dirichlet(np.full(clusters, float(alpha)))))
              for _ in range(workers)]
    test = draw(np.full(clusters, 128))
    build = functools.partial(mlp, (features, *hidden, 1))
    return Task(f"regression(alpha={alpha:g})", build, shards, test, mse, ("loss",))
