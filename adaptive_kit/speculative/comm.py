"""Collectives for K workers: simulated in one process (vectorised) or real torch.distributed.

Both communicators hold the rows of the workers that live in this process: ``SimComm`` all K
(a leading worker dimension, so one process trains K workers with vectorised kernels),
``DistComm`` one row, its rank's. Every collective is logged with its bytes, its kind and
whether it was overlapped with compute, so bytes counted are bytes moved and the network model
can price each one.
"""
from __future__ import annotations

from dataclasses import dataclass

import torch
import torch.distributed as dist

from ..checks import check_int

KINDS = ("grad", "weights", "control", "repair", "eval")


@dataclass(frozen=True)
class Collective:
    """One all-reduce: what each worker contributed and how the step waited for it."""

    step: int
    kind: str  # one of KINDS
    payload_bytes: int  # model data (gradients or weights) per worker
    control_bytes: int  # statistics and health flags per worker
    overlapped: bool  # launched asynchronously and waited for a step later


class Pending:
    """An all-reduce in flight; :meth:`wait` returns the sum over all K workers, (W, n)."""

    def __init__(self, buf: torch.Tensor, work: object | None) -> None:
        self._buf, self._work = buf, work

    def wait(self) -> torch.Tensor:
        if self._work is not None:
            self._work.wait()
            self._work = None
        return self._buf


class _Comm:
    world: int  # K, all workers
    ranks: torch.Tensor  # (W,) global ranks of the rows in this process

    def __init__(self) -> None:
        self.log: list[Collective] = []

    @property
    def local(self) -> int:
        return len(self.ranks)

    def _record(self, buf: torch.Tensor, step: int, kind: str, control: int, overlapped: bool) -> None:
        if kind not in KINDS:
            raise ValueError(f"collective kind={kind!r}: expected one of {KINDS}")
        row = buf.shape[-1] * buf.element_size()
        self.log.append(Collective(step, kind, row - control * buf.element_size(),
                                   control * buf.element_size(), overlapped))

    def all_sum(self, buf: torch.Tensor, *, step: int, kind: str, control: int = 0,
                overlapped: bool = False) -> torch.Tensor:
        """Sum ``buf`` (W, n) over all K workers and wait; ``control`` trailing entries are stats.

        ``overlapped`` says how the network model prices it: a gradient all-reduce overlaps the
        backward pass (as DDP's buckets do), a weight average blocks the step.
        """
        return self.start_sum(buf, step=step, kind=kind, control=control, overlapped=overlapped).wait()

    def start_sum(self, buf: torch.Tensor, *, step: int, kind: str, control: int = 0,
                  overlapped: bool = True) -> Pending:
        raise NotImplementedError

    def bytes_by_kind(self) -> dict[str, int]:
        """Per-worker bytes sent, by collective kind (payload and control together)."""
        out = dict.fromkeys(KINDS, 0)
        for c in self.log:
            out[c.kind] += c.payload_bytes + c.control_bytes
        return out


class SimComm(_Comm):
    """K workers in this process: rows of a (K, n) tensor; an all-reduce is a sum over rows."""

    def __init__(self, world: int, device: torch.device | str = "cpu") -> None:
        super().__init__()
        self.world = check_int("workers (K)", world, 1)
        self.ranks = torch.arange(world, device=device)

    def start_sum(self, buf: torch.Tensor, *, step: int, kind: str, control: int = 0,
                  overlapped: bool = True) -> Pending:
        if buf.shape[0] != self.world:
            raise ValueError(f"SimComm: buffer has {buf.shape[0]} rows for {self.world} workers")
        self._record(buf, step, kind, control, overlapped)
        return Pending(buf.sum(0, keepdim=True).expand_as(buf).clone(), None)


class DistComm(_Comm):
    """This process's rank in an initialised torch.distributed process group."""

    def __init__(self, device: torch.device | str = "cpu") -> None:
        super().__init__()
        if not dist.is_initialized():
            raise RuntimeError("DistComm needs an initialised process group (use "
                               "adaptive_kit.distributed.launch or run under torchrun)")
        self.world = dist.get_world_size()
        self.ranks = torch.tensor([dist.get_rank()], device=device)

    def start_sum(self, buf: torch.Tensor, *, step: int, kind: str, control: int = 0,
                  overlapped: bool = True) -> Pending:
        if buf.shape[0] != 1:
            raise ValueError(f"DistComm: buffer has {buf.shape[0]} rows, expected 1")
        self._record(buf, step, kind, control, overlapped)
        out = buf.contiguous().clone()
        work = dist.all_reduce(out, op=dist.ReduceOp.SUM, async_op=True)
        return Pending(out, work)
