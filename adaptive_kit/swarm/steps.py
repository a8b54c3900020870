"""How a swarm's members take their steps: a group of one architecture over stacked weights
(batched matmuls and grouped convolutions: what vmap computes, without its per-operation cost),
a member alone through its own module; a round's batches go to the device in one copy and its
losses come back in one, so that no step waits on the host."""
from __future__ import annotations

import time
from collections.abc import Callable
from functools import partial
from typing import TYPE_CHECKING

import numpy as np
import torch
from torch import nn
from torch.func import functional_call, vmap

from .spec import build_model

if TYPE_CHECKING:
    from .engine import Member


def _logits(model: nn.Module, params: dict[str, torch.Tensor], x: torch.Tensor) -> torch.Tensor:
    return functional_call(model, params, (x,))


BATCHABLE = (nn.Linear, nn.Conv2d, nn.Unflatten, nn.Flatten, nn.ReLU, nn.Tanh, nn.GELU)


def _stacked_logits(model: nn.Sequential, params: dict[str, torch.Tensor], x: torch.Tensor) -> torch.Tensor:
    """The logits of G members of ``model``'s architecture at once, from their stacked weights
    (``params[name]``: (G, *shape)) and inputs ``x``: (G, B, F) -> (G, B, C).

    Linear layers are one batched matmul, conv layers one grouped convolution (member g's
    channels are group g), activations apply elementwise: what vmap computes, without its
    per-operation transform cost (about 0.5 ms a step on a CPU).
    """
    h, (g, b) = x, x.shape[:2]
    for name, mod in model.named_children():
        if isinstance(mod, nn.Linear):
            h = torch.baddbmm(params[f"{name}.bias"].unsqueeze(1), h, params[f"{name}.weight"].transpose(1, 2))
        elif isinstance(mod, nn.Unflatten):  # (G, B, C*H*W) -> (B, G*C, H, W)
            c, ht, wd = mod.unflattened_size
            h = h.transpose(0, 1).reshape(b, g * c, ht, wd)
        elif isinstance(mod, nn.Conv2d):  # (B, G*C_in, H, W) -> (B, G*C_out, H, W)
            h = nn.functional.conv2d(h, params[f"{name}.weight"].flatten(0, 1), params[f"{name}.bias"].flatten(),
                                     stride=mod.stride, padding=mod.padding, groups=g)
        elif isinstance(mod, nn.Flatten):  # (B, G*C, H, W) -> (G, B, C*H*W)
            h = h.reshape(b, g, -1).transpose(0, 1)
        else:
            h = mod(h)
    return h


def batched_logits(model: nn.Sequential) -> Callable[[dict[str, torch.Tensor], torch.Tensor], torch.Tensor]:
    """``f(params, x)``: the logits (G, B, C) of G members of ``model``'s architecture from their
    stacked weights and inputs (G, B, F); vmap only for a layer :func:`_stacked_logits` does not know."""
    if all(isinstance(mod, BATCHABLE) for mod in model.children()):
        return partial(_stacked_logits, model)
    return vmap(partial(_logits, model))


def _to_device(t: torch.Tensor, device: torch.device) -> torch.Tensor:
    """``t`` (on the CPU) on ``device``; to a GPU through pinned memory, so the copy does not block the host."""
    if device.type != "cuda":
        return t.to(device)
    return t.pin_memory().to(device, non_blocking=True)


class MemberSteps:
    """The training half of :class:`~adaptive_kit.swarm.Swarm` (it mixes this in)."""

    def _train_group(self, group: list[Member], steps: list[int]) -> dict[int, np.ndarray]:
        order = sorted(range(len(group)), key=lambda i: -steps[i])  # members still stepping are a prefix
        ms, n_steps = [group[i] for i in order], np.array([steps[i] for i in order])
        if any(m.fault == "crash" for m in ms):
            bad = next(m for m in ms if m.fault == "crash")
            if len(ms) == 1:  # in a batch, the retry one by one finds the member and quarantines it
                bad.fault = None
            raise RuntimeError(f"injected crash in member {bad.id}")
        T = int(n_steps.max(initial=0))
        if T == 0:
            return {m.id: np.zeros(0) for m in ms}
        # every batch of the round drawn up front (the same numbers as one draw per step) and sent
        # to the device in one copy, so that no step waits on the host
        idx = torch.zeros((len(ms), T, ms[0].spec.batch_size), dtype=torch.int64)  # (G, T, bs)
        for i, (m, n) in enumerate(zip(ms, n_steps)):
            idx[i, :n] = torch.randint(0, len(self.x), (int(n), m.spec.batch_size), generator=m.gen)
        idx = _to_device(idx, self.device)
        t0 = time.perf_counter()
        if len(ms) == 1:  # a group of one: the plain module path, no vmap transform to pay for
            losses = self._steps_one(ms[0], idx[0])[None]
        else:
            losses = self._steps_batched(ms, n_steps, idx)
        host = losses.cpu().numpy()  # the round's one wait for the device
        per_step = (time.perf_counter() - t0) / max(int(n_steps.sum()), 1)
        out = {}
        for i, m in enumerate(ms):
            m.steps += int(n_steps[i])
            m.step_time = per_step
            out[m.id] = host[i, :n_steps[i]]
        return out

    def _module(self, m: Member) -> tuple[nn.Module, list[torch.Tensor], list[torch.Tensor]]:
        """A module of the member's architecture whose parameters hold the member's weights, with
        the parameters and momentum buffers as lists in the module's order."""
        cached = self._nets.get(m.id)
        if cached is None or cached[0] != m.spec.layers:
            model = build_model(m.spec, self.n_features, self.n_classes, self.config.image_shape).to(self.device)
            cached = (m.spec.layers, model, {k: p.detach() for k, p in model.named_parameters()})
            self._nets[m.id] = cached
        _, model, weights = cached
        if m.params is not weights:  # new weights since the last round (batched, evolved, loaded)
            with torch.no_grad():
                for k, w in weights.items():
                    w.copy_(m.params[k])
            m.params = weights  # from now on the member's weights are the module's parameters
        return model, list(model.parameters()), [m.buf[k] for k in weights]

    def _steps_one(self, m: Member, idx: torch.Tensor) -> torch.Tensor:
        """``len(idx)`` SGD steps of one member through its own module; its losses, (T,) on device.

        The update is torch.optim.SGD's (g += wd p; buf = mom buf + g; p -= lr buf) with foreach ops.
        """
        model, params, bufs = self._module(m)
        lr, mom, wd = m.spec.lr, m.spec.momentum, m.spec.weight_decay
        losses = []
        for t in range(len(idx)):
            rows = idx[t]
            loss = nn.functional.cross_entropy(model(self.x[rows]), self.y[rows])
            grads = torch.autograd.grad(loss, params)
            with torch.no_grad():
                if wd:
                    grads = torch._foreach_add(grads, params, alpha=wd)
                if mom:
                    torch._foreach_mul_(bufs, mom)
                    torch._foreach_add_(bufs, grads)
                else:
                    torch._foreach_copy_(bufs, grads)
                torch._foreach_add_(params, bufs, alpha=-lr)
            losses.append(loss.detach())
        return torch.stack(losses)

    def _steps_batched(self, ms: list[Member], n_steps: np.ndarray, idx: torch.Tensor) -> torch.Tensor:
        """The steps of members that share an architecture, in one vmap over stacked weights;
        their losses, (G, T) on device (NaN after a member's last step)."""
        model, _ = self._template(ms[0].spec)
        P = {k: torch.stack([m.params[k] for m in ms]) for k in ms[0].params}  # (G, *shape)
        B = {k: torch.stack([m.buf[k] for m in ms]) for k in ms[0].buf}
        dev, G, T, bs = self.device, len(ms), idx.shape[1], ms[0].spec.batch_size
        hp = torch.tensor([[getattr(m.spec, k) for m in ms] for k in ("lr", "momentum", "weight_decay")],
                          dtype=self.x.dtype)
        lr, mom, wd = _to_device(hp, dev)
        # vmap's forward over the stacked weights, then one ordinary backward: each member's loss
        # depends only on its own slice, so the summed loss gives every member its own gradient
        # (twice as fast on a CPU as vmap(grad(...)), whose per-call transform overhead dominates)
        fwd = batched_logits(model)
        names = list(P)
        losses = torch.full((G, T), float("nan"), device=dev)
        active_at = [int((n_steps > t).sum()) for t in range(T)]
        k_views = -1
        for t in range(T):
            k = active_at[t]
            if k != k_views:  # the first k members' slices, remade only when a member drops out
                k_views = k
                ps, bs_ = [P[n][:k] for n in names], [B[n][:k] for n in names]
                per = [(k,) + (1,) * (P[n].dim() - 1) for n in names]  # per-member scalars against each tensor
                wd_k, mom_k = [wd[:k].view(sh) for sh in per], [mom[:k].view(sh) for sh in per]
                neg_lr_k = [-lr[:k].view(sh) for sh in per]
            rows = idx[:k, t]  # (k, bs)
            leaves = [p.detach().requires_grad_() for p in ps]
            logits = fwd(dict(zip(names, leaves)), self.x[rows])  # (k, bs, C)
            loss = nn.functional.cross_entropy(logits.flatten(0, 1), self.y[rows].flatten(),
                                               reduction="none").view(k, bs).mean(1)
            grads = torch.autograd.grad(loss.sum(), leaves)
            with torch.no_grad():  # torch.optim.SGD: g += wd p; buf = mom buf + g; p -= lr buf
                grads = torch._foreach_addcmul(grads, ps, wd_k)
                torch._foreach_mul_(bs_, mom_k)
                torch._foreach_add_(bs_, grads)
                torch._foreach_addcmul_(ps, bs_, neg_lr_k)
            losses[:k, t] = loss.detach()
        for i, m in enumerate(ms):
            m.params = {k: v[i].clone() for k, v in P.items()}
            m.buf = {k: v[i].clone() for k, v in B.items()}
        return losses
