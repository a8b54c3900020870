"""A partition plan run for real: torch.fx stages trained with torch.distributed.pipelining.

:func:`~.stages.stage_modules` cuts a traced model into one GraphModule per stage of a plan
(``stage_of``: fx node name -> stage, monotone along edges); :func:`pipeline_worker` trains those stages on K
ranks with a GPipe or 1F1B schedule, emulates slow stages by sleeping, counts the bytes that
cross stage boundaries, and re-plans between steps by moving weights and momentum to their new
owners. :func:`reference_run` is the same training on one process, the oracle it is checked
against. Run it spawned (:func:`run_pipeline`) or under torchrun::

    python -m torch.distributed.run --nproc_per_node=K -m adaptive_kit.partition.pipeline spec.pkl --out DIR
"""
from __future__ import annotations

import argparse
import contextlib
import os
import pickle
import time
from collections.abc import Callable, Iterator, Sequence
from dataclasses import dataclass, field
from typing import Any

import torch
import torch.distributed as dist
import torch.nn.functional as F
from torch import fx, nn
from torch.distributed.pipelining import PipelineStage, Schedule1F1B, ScheduleGPipe

from ..checks import check_int
from ..devices import pick_device, rank_generator
from ..distributed import run as _run
from ..distributed import worker_device
from .graph import trace
from .stages import _build_stage, _flatten, _Layout, _layout, _spec, _unflatten

SCHEDULES = {"gpipe": ScheduleGPipe, "1f1b": Schedule1F1B}
TASKS = ("classify", "lm")


class _Sleep(torch.autograd.Function):
    """Identity that sleeps: ``fwd_s`` in forward, ``bwd_s`` in backward (an emulated slow stage)."""

    @staticmethod
    def forward(ctx: Any, x: torch.Tensor, fwd_s: float, bwd_s: float) -> torch.Tensor:
        time.sleep(fwd_s)
        ctx.bwd_s = bwd_s
        return x.clone()

    @staticmethod
    def backward(ctx: Any, grad: torch.Tensor) -> tuple[torch.Tensor, None, None]:
        time.sleep(ctx.bwd_s)
        return grad, None, None


def _emulate(leaves: list[torch.Tensor], compute_s: float) -> list[torch.Tensor]:
    """1/3 of ``compute_s`` in forward and 2/3 in backward, on the first output with a gradient."""
    for i, t in enumerate(leaves):
        if t.requires_grad and torch.is_grad_enabled():
            return leaves[:i] + [_Sleep.apply(t, compute_s / 3, 2 * compute_s / 3)] + leaves[i + 1:]
    time.sleep(compute_s)  # no backward reaches this stage: spend it all now
    return leaves


class _StageRunner(nn.Module):
    """A stage as PipelineStage runs it: flat tensors in, flat tensors out."""

    def __init__(self, stage: fx.GraphModule, in_specs: tuple, out_specs: tuple | None,
                 compute_s: float, device: torch.device) -> None:
        super().__init__()
        self.stage, self.in_specs, self.out_specs = stage, in_specs, out_specs  # out None: last
        self.compute_s, self.device = compute_s, device

    def forward(self, *leaves: torch.Tensor) -> Any:
        it = iter(leaves)
        out = self.stage(*(_unflatten(it, s) for s in self.in_specs))
        if self.out_specs is None:  # the last stage: the model's output, a tensor for the loss
            return _emulate([out], self.compute_s)[0] if self.compute_s else out
        flat: list[torch.Tensor] = []
        for v, s in zip(out, self.out_specs):
            _flatten(v, s, self.device, flat)
        return tuple(_emulate(flat, self.compute_s) if self.compute_s else flat)


class _CountingStage(PipelineStage):
    """PipelineStage that adds up the bytes of the activations and gradients it sends."""

    sent_bytes = 0

    def _count(self, ops: list[dist.P2POp]) -> list[dist.P2POp]:
        self.sent_bytes += sum(op.tensor.numel() * op.tensor.element_size() for op in ops)
        return ops

    def get_fwd_send_ops(self, fwd_chunk_id: int) -> list[dist.P2POp]:
        return self._count(super().get_fwd_send_ops(fwd_chunk_id))

    def get_bwd_send_ops(self, bwd_chunk_id: int) -> list[dist.P2POp]:
        return self._count(super().get_bwd_send_ops(bwd_chunk_id))


# --- the run's specification, data and loss ----------------------------------------------------

@dataclass(frozen=True)
class PipelineSpec:
    """One pipelined training run; picklable, so it can be sent to spawned workers."""

    model: Callable[[], nn.Module]  # picklable zero-arg factory, e.g. functools.partial(GPT, ...)
    stage_of: dict[str, int]  # fx node name -> stage in [0, k), monotone along edges
    k: int  # stages = ranks
    input_shape: tuple[int, ...]  # one sample: (features,), (C, H, W), or (seq_len,) for "lm"
    batch: int = 16  # global batch per step
    micro: int = 4  # micro-batches per step (batch % micro == 0)
    schedule: str = "gpipe"  # "gpipe" or "1f1b" (1f1b needs micro >= k)
    steps: int = 4  # optimisation steps
    lr: float = 0.05  # SGD learning rate
    momentum: float = 0.9  # SGD momentum
    seed: int = 0  # model init and data
    task: str = "classify"  # "classify": labels of the output's classes; "lm": next token ids
    compute_s: tuple[float, ...] | None = None  # per stage emulated seconds per micro-batch fwd+bwd
    replan: tuple[tuple[int, dict[str, int]], ...] = field(default=())  # (step, stage_of) switches
    device: str | None = None  # where stages run; None: each rank's own (its GPU under nccl, else CPU)

    def __post_init__(self) -> None:
        if not callable(self.model):
            raise ValueError(f"PipelineSpec.model must be a zero-arg callable, got {self.model!r}")
        if not isinstance(self.stage_of, dict):
            raise ValueError(f"PipelineSpec.stage_of must be a dict, got {type(self.stage_of).__name__}")
        for name, low in (("k", 1), ("batch", 1), ("micro", 1), ("steps", 1), ("seed", 0)):
            check_int(f"PipelineSpec.{name}", getattr(self, name), low)
        if self.batch % self.micro:
            raise ValueError(f"PipelineSpec.batch={self.batch} must be a multiple of micro={self.micro}")
        if self.schedule not in SCHEDULES:
            raise ValueError(f"PipelineSpec.schedule={self.schedule!r}: expected one of {sorted(SCHEDULES)}")
        if self.schedule == "1f1b" and self.micro < self.k:
            raise ValueError(f"PipelineSpec.micro={self.micro}: schedule '1f1b' needs micro >= k={self.k}")
        if not self.lr > 0:
            raise ValueError(f"PipelineSpec.lr must be > 0, got {self.lr!r}")
        if not 0 <= self.momentum < 1:
            raise ValueError(f"PipelineSpec.momentum must be in [0, 1), got {self.momentum!r}")
        if self.task not in TASKS:
            raise ValueError(f"PipelineSpec.task={self.task!r}: expected one of {TASKS}")
        shape = self.input_shape
        if (not isinstance(shape, tuple) or not shape
                or not all(isinstance(d, int) and not isinstance(d, bool) and d > 0 for d in shape)):
            raise ValueError(f"PipelineSpec.input_shape must be a non-empty tuple of ints > 0, got {shape!r}")
        if self.task == "lm" and len(shape) != 1:
            raise ValueError(f"PipelineSpec.input_shape={shape!r}: task 'lm' takes (seq_len,)")
        if self.compute_s is not None and (
                not isinstance(self.compute_s, tuple) or len(self.compute_s) != self.k
                or not all(isinstance(c, (int, float)) and c >= 0 for c in self.compute_s)):
            raise ValueError(f"PipelineSpec.compute_s must be None or a tuple of k={self.k} "
                             f"seconds >= 0, got {self.compute_s!r}")
        prev = -1
        for entry in self.replan:
            if (not isinstance(entry, tuple) or len(entry) != 2 or not isinstance(entry[1], dict)
                    or isinstance(entry[0], bool) or not isinstance(entry[0], int)):
                raise ValueError(f"PipelineSpec.replan entries must be (step, stage_of dict), got {entry!r}")
            if not prev < entry[0] < self.steps:
                raise ValueError(f"PipelineSpec.replan step {entry[0]} must be in [0, steps={self.steps}) "
                                 "and increasing")
            prev = entry[0]


def _loss(task: str) -> Callable[[torch.Tensor, torch.Tensor], torch.Tensor]:
    return _classify_loss if task == "classify" else _lm_loss


def _classify_loss(out: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
    return F.cross_entropy(out, y)


def _lm_loss(logits: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
    return F.cross_entropy(logits.reshape(-1, logits.shape[-1]), y.reshape(-1))  # (B*T, V)


@contextlib.contextmanager
def _untouched(model: nn.Module) -> Iterator[None]:
    """Run a probe without changing buffers (BatchNorm statistics) or the RNG."""
    saved = [(b, b.detach().clone()) for b in model.buffers()]
    with torch.random.fork_rng(devices=[]):
        try:
            yield
        finally:
            with torch.no_grad():
                for b, v in saved:
                    b.copy_(v)


def _classes(model: nn.Module, spec: PipelineSpec, device: torch.device) -> int:
    """The model's output size (classes, or vocabulary for "lm"), from a probe on zeros."""
    dtype = torch.long if spec.task == "lm" else torch.float32
    x = torch.zeros((spec.batch // spec.micro, *spec.input_shape), dtype=dtype, device=device)
    with _untouched(model), torch.no_grad():
        return int(model(x).shape[-1])


def make_batch(spec: PipelineSpec, step: int, classes: int,
               device: torch.device | str = "cpu") -> tuple[torch.Tensor, torch.Tensor]:
    """Step ``step``'s (inputs, targets), the same on every rank: a fixed seeded teacher for
    "classify", arithmetic token sequences (start + stride * t mod vocab) for "lm"."""
    g = rank_generator(spec.seed, step)  # indexed by step, not rank: every rank draws the same batch
    if spec.task == "classify":
        x = torch.randn((spec.batch, *spec.input_shape), generator=g)
        teacher = torch.randn(x[0].numel(), classes, generator=torch.Generator().manual_seed(spec.seed))
        y = (x.flatten(1) @ teacher).argmax(dim=1)
    else:
        t = spec.input_shape[0]
        start = torch.randint(0, classes, (spec.batch, 1), generator=g)
        stride = torch.randint(1, 4, (spec.batch, 1), generator=g)
        ids = (start + stride * torch.arange(t + 1)) % classes  # (B, T + 1)
        x, y = ids[:, :-1].contiguous(), ids[:, 1:].contiguous()
    return x.to(device), y.to(device)


# --- the worker --------------------------------------------------------------------------------

@dataclass
class _Runtime:
    plan: dict[str, int]
    layout: _Layout
    stage: _CountingStage
    schedule: Any
    optimizer: torch.optim.SGD | None
    params: list[tuple[str, nn.Parameter]]


def _runtime(gm: fx.GraphModule, plan: dict[str, int], spec: PipelineSpec, rank: int,
             example: torch.Tensor, device: torch.device) -> _Runtime:
    """This rank's stage of ``plan``: module, PipelineStage with static metadata, schedule, SGD."""
    k = spec.k
    layout = _layout(gm, plan, k)
    stages = [_build_stage(gm, layout, j) for j in range(k)]
    # one pass of the whole model on an example micro-batch gives every boundary's values: their
    # structure (for the flattening) and tensor metadata, requires_grad included
    with _untouched(gm), torch.enable_grad():
        crossing = [(example,)]
        for j, st in enumerate(stages):
            crossing.append(st(*crossing[-1]) if j < k - 1 else (st(*crossing[-1]),))
    names = [tuple(v.name for v in layout.inputs[j]) for j in range(k)]
    specs = [tuple(_spec(v, n) for v, n in zip(crossing[j], names[j])) for j in range(k)]
    for j in range(1, k):
        if not crossing[j]:
            raise ValueError(f"no value crosses from stage {j - 1} to stage {j}: nothing to pipeline")

    def flat(j: int) -> tuple[torch.Tensor, ...]:
        out: list[torch.Tensor] = []
        for v, s in zip(crossing[j], specs[j]):
            _flatten(v, s, device, out)
        return tuple(t.detach().requires_grad_(t.requires_grad) for t in out)

    (output,) = crossing[k]
    if not isinstance(output, torch.Tensor):
        raise ValueError(f"the model returns {type(output).__name__}; the loss needs a tensor")
    compute = spec.compute_s[rank] if spec.compute_s else 0.0
    runner = _StageRunner(stages[rank], specs[rank], specs[rank + 1] if rank < k - 1 else None,
                          compute, device)
    stage = _CountingStage(runner, rank, k, device, input_args=flat(rank),
                           output_args=flat(rank + 1) if rank < k - 1 else output.detach())
    schedule = SCHEDULES[spec.schedule](stage, n_microbatches=spec.micro, loss_fn=_loss(spec.task),
                                        scale_grads=True)
    params = [(n, gm.get_parameter(n)) for n in layout.params[rank]]
    opt = (torch.optim.SGD([p for _, p in params], lr=spec.lr, momentum=spec.momentum)
           if params else None)
    return _Runtime(dict(plan), layout, stage, schedule, opt, params)


def _nbytes(t: torch.Tensor) -> int:
    return t.numel() * t.element_size()


def _migrate(gm: fx.GraphModule, old: _Runtime, new: _Runtime, rank: int) -> tuple[int, int]:
    """Every parameter and buffer from its old owner to all ranks, and SGD momentum to the new
    owner's optimiser; returns (bytes broadcast, bytes whose owner changed)."""
    tensors = dict(gm.named_parameters()) | dict(gm.named_buffers())
    names = [n for n in tensors if n in old.layout.owner]  # the same order on every rank
    params = dict(gm.named_parameters())
    own_state = old.optimizer.state if old.optimizer is not None else {}
    device = old.stage.device  # collectives need tensors on the backend's device (nccl: GPU)
    has = torch.tensor([int(n in params and rank == old.layout.owner[n]
                            and "momentum_buffer" in own_state.get(params[n], {})) for n in names],
                       device=device)
    dist.all_reduce(has)
    flags = has.tolist()
    sent = moved = 0
    buffers: dict[str, torch.Tensor] = {}
    for i, n in enumerate(names):
        src, t = old.layout.owner[n], tensors[n]
        with torch.no_grad():
            dist.broadcast(t.detach(), src=src)
        size = _nbytes(t)
        if flags[i]:
            buf = own_state[t]["momentum_buffer"] if rank == src else torch.empty_like(t)
            dist.broadcast(buf, src=src)
            buffers[n] = buf
            size *= 2
        sent += size
        moved += size if new.layout.owner.get(n, src) != src else 0
    if new.optimizer is not None:
        for n, p in new.params:
            if n in buffers:
                new.optimizer.state[p]["momentum_buffer"] = buffers[n].clone()
    return sent, moved


def _train_step(rt: _Runtime, x: torch.Tensor, y: torch.Tensor) -> float | None:
    """One optimisation step of this rank's stage; the mean micro-batch loss on the last stage."""
    if rt.optimizer is not None:
        rt.optimizer.zero_grad(set_to_none=True)
    args = (x,) if rt.stage.is_first else ()
    losses: list[torch.Tensor] = []
    if rt.stage.is_last:
        rt.schedule.step(*args, target=y, losses=losses, return_outputs=False)
    else:
        rt.schedule.step(*args, return_outputs=False)
    if rt.optimizer is not None:
        rt.optimizer.step()
    return float(torch.stack([v.detach() for v in losses]).mean()) if losses else None


def pipeline_worker(rank: int, world_size: int, spec: PipelineSpec) -> dict[str, Any]:
    """Train stage ``rank`` of ``spec`` for ``spec.steps`` steps; for ``distributed.run``.

    Every rank builds the whole model from the seed and the same data, runs its own stage, and
    at a re-plan step broadcasts weights and momentum so each stage can move. Returns a dict:
    ``step_s`` (wall seconds per step, the slowest rank's), ``losses`` (mean micro-batch loss
    per step, from the last stage), ``state`` (this stage's parameters on CPU), ``sent_bytes``
    (bytes this rank sent per step) and ``boundary_bytes`` (all ranks), ``plan`` (in force at
    the end) and ``plans`` ((step, plan) switches made), ``migrations`` (step, seconds, bytes
    broadcast, bytes that changed owner) and ``replan_errors`` (step, error: the old plan kept).

    Raises:
        ValueError: ``world_size`` differs from ``spec.k``, or the initial plan is invalid.
    """
    if world_size != spec.k:
        raise ValueError(f"world_size={world_size} but the plan has k={spec.k} stages")
    device = worker_device() if spec.device is None else pick_device(spec.device)
    torch.manual_seed(spec.seed)
    model = spec.model().to(device)
    gm = trace(model)
    classes = _classes(gm, spec, device)
    example = make_batch(spec, 0, classes, device)[0].tensor_split(spec.micro)[0]
    rt = _runtime(gm, dict(spec.stage_of), spec, rank, example, device)
    replans = dict(spec.replan)
    out: dict[str, Any] = {"rank": rank, "plans": [(0, dict(rt.plan))], "migrations": [],
                           "replan_errors": []}
    step_s, sent, losses = [], [], []
    for step in range(spec.steps):
        if step in replans:
            dist.barrier()
            t0 = time.perf_counter()
            try:
                new, error = _runtime(gm, dict(replans[step]), spec, rank, example, device), ""
            except Exception as e:  # any failure to build keeps the old plan
                new, error = None, f"{type(e).__name__}: {e}"
            ok = torch.tensor([int(new is not None)], device=device)
            dist.all_reduce(ok, op=dist.ReduceOp.MIN)  # every rank keeps or switches together
            if ok.item() and new is not None:
                nbytes, moved = _migrate(gm, rt, new, rank)
                rt = new
                dist.barrier()
                out["plans"].append((step, dict(rt.plan)))
                out["migrations"].append({"step": step, "seconds": time.perf_counter() - t0,
                                          "bytes": nbytes, "moved_bytes": moved})
            else:
                out["replan_errors"].append({"step": step, "error": error or "failed on another rank"})
        x, y = make_batch(spec, step, classes, device)
        before = rt.stage.sent_bytes
        dist.barrier()
        t0 = time.perf_counter()
        loss = _train_step(rt, x, y)
        dist.barrier()
        step_s.append(time.perf_counter() - t0)
        sent.append(rt.stage.sent_bytes - before)
        losses.append(loss if loss is not None else float("nan"))
    times = torch.tensor(step_s, dtype=torch.float64, device=device)
    dist.all_reduce(times, op=dist.ReduceOp.MAX)
    total = torch.tensor(sent, dtype=torch.int64, device=device)
    dist.all_reduce(total)
    loss_t = torch.tensor(losses, dtype=torch.float64, device=device)
    dist.broadcast(loss_t, src=spec.k - 1)
    out.update(stage=rank, plan=dict(rt.plan), step_s=times.tolist(), losses=loss_t.tolist(),
               sent_bytes=sent, boundary_bytes=total.tolist(),
               state={n: p.detach().cpu().clone() for n, p in rt.params})
    return out


def run_pipeline(spec: PipelineSpec, **launch_kwargs: Any) -> list[dict[str, Any]]:
    """Check the initial plan here, then run :func:`pipeline_worker` on ``spec.k`` ranks (under
    torchrun: this rank only); results in rank order. ``launch_kwargs`` go to ``distributed.run``.

    Raises:
        ValueError: the plan is invalid (as :func:`~.stages.stage_modules`).
        WorkerError: a worker failed.
    """
    torch.manual_seed(spec.seed)
    _layout(trace(spec.model()), spec.stage_of, spec.k)
    return _run(pipeline_worker, spec.k, (spec,), **launch_kwargs)


def reference_run(spec: PipelineSpec) -> dict[str, Any]:
    """The same training on one process, the oracle for :func:`pipeline_worker`: the whole model,
    the same micro-batches, gradients accumulated and divided by ``micro`` (as the pipelining
    schedules do with ``scale_grads=True``), SGD. Returns ``losses``, ``step_s`` and ``state``
    (every parameter on CPU). It runs on ``spec.device``, default :func:`adaptive_kit.pick_device`."""
    device = pick_device(spec.device)
    torch.manual_seed(spec.seed)
    model = spec.model().to(device)
    classes = _classes(model, spec, device)
    opt = torch.optim.SGD(model.parameters(), lr=spec.lr, momentum=spec.momentum)
    loss_fn = _loss(spec.task)
    losses, step_s = [], []
    for step in range(spec.steps):
        x, y = make_batch(spec, step, classes, device)
        t0 = time.perf_counter()
        opt.zero_grad(set_to_none=True)
        parts = []
        for xm, ym in zip(x.tensor_split(spec.micro), y.tensor_split(spec.micro)):
            loss = loss_fn(model(xm), ym)
            loss.backward()
            parts.append(loss.detach())
        for p in model.parameters():
            if p.grad is not None:
                p.grad.div_(spec.micro)
        opt.step()
        step_s.append(time.perf_counter() - t0)
        losses.append(float(torch.stack(parts).mean()))
    return {"losses": losses, "step_s": step_s,
            "state": {n: p.detach().cpu().clone() for n, p in model.named_parameters()}}


def main(argv: Sequence[str] | None = None) -> None:
    """``torchrun ... -m adaptive_kit.partition.pipeline SPEC.pkl --out DIR``: run a pickled
    :class:`PipelineSpec`, each rank saving its result to ``DIR/rank<r>.pt``."""
    parser = argparse.ArgumentParser(description=main.__doc__)
    parser.add_argument("spec", help="a pickled PipelineSpec")
    parser.add_argument("--out", default=".", help="folder for rank<r>.pt results")
    args = parser.parse_args(argv)
    with open(args.spec, "rb") as f:
        spec = pickle.load(f)
    os.makedirs(args.out, exist_ok=True)
    for result in run_pipeline(spec):
        torch.save(result, os.path.join(args.out, f"rank{result['rank']}.pt"))


if __name__ == "__main__":
    main()
