"""Worker functions for the multi-process tests.

They live in an importable module because ``spawn`` workers import their function by name;
run as a script (``python -m torch.distributed.run ... tests/dist_workers.py``) the same
all-reduce worker serves the torchrun path through :func:`adaptive_kit.distributed.run`.
"""
from __future__ import annotations

import os
import sys
import time

import torch
import torch.distributed as dist

from adaptive_kit.distributed import run, worker_device
from adaptive_kit.records import ZmqPushSink, to_batch


def allreduce_worker(rank: int, world_size: int, scale: float = 1.0) -> dict:
    """Sum ``scale * (rank + 1)`` over all ranks; report what this rank saw."""
    t = torch.tensor([scale * (rank + 1)], dtype=torch.float64, device=worker_device())
    dist.all_reduce(t)
    return {"rank": rank, "world_size": world_size, "sum": float(t.item()),
            "dist_rank": dist.get_rank(), "dist_world_size": dist.get_world_size(),
            "pid": os.getpid()}


def _mark(marker_dir: str | None, rank: int) -> None:
    """Leave ``rank<r>.pid`` in ``marker_dir``: proof that the rank reached the worker, and its pid."""
    if marker_dir is not None:
        with open(os.path.join(marker_dir, f"rank{rank}.pid"), "w") as f:
            f.write(str(os.getpid()))


def raise_in_rank1(rank: int, world_size: int, marker_dir: str | None = None) -> int:
    """Rank 1 raises; the others wait for it in a barrier that never completes."""
    _mark(marker_dir, rank)
    if rank == 1:
        raise ValueError("rank one refuses: bad-value-42")
    dist.barrier()
    return rank


def exit_in_rank1(rank: int, world_size: int, marker_dir: str | None = None) -> int:
    """Rank 1 dies without a result (no traceback, no queue message); the others wait."""
    _mark(marker_dir, rank)
    if rank == 1:
        os._exit(3)
    dist.barrier()
    return rank


def hang(rank: int, world_size: int, marker_dir: str | None = None) -> int:
    """Every rank hangs: only the launcher's own deadline can end the run."""
    _mark(marker_dir, rank)
    time.sleep(600)
    return rank


def zmq_stream_worker(rank: int, world_size: int, address: str, n_batches: int) -> dict:
    """Stream ``n_batches`` ``scalars`` batches to ``address``; return what the sink counted."""
    sink = ZmqPushSink(address, producer=f"rank{rank}")
    for step in range(n_batches):
        sink.write(to_batch("scalars", {"step": [step] * 3, "time": time.time(), "rank": rank,
                                        "name": ["loss", "acc", "lr"],
                                        "value": [1.0 / (step + 1), step / n_batches, 0.1]}),
                   stream="scalars")
    sink.close()
    return {"producer": sink.producer, "sent": sink.seq, "rows": sink.rows, "bytes": sink.bytes,
            "dropped": sink.dropped}



def telemetry_worker(rank: int, world_size: int, address: str, steps: int) -> dict:
    """Data-parallel training of a small MLP with telemetry streamed to one analysis process."""
    from torch import nn

    from adaptive_kit.telemetry import Telemetry

    torch.manual_seed(0)  # same initial weights on every rank
    model = nn.Sequential(nn.Linear(8, 16), nn.ReLU(), nn.Linear(16, 2))
    opt = torch.optim.SGD(model.parameters(), lr=0.1)
    g = torch.Generator().manual_seed(rank)  # each rank its own data
    sink = ZmqPushSink(address, producer=f"rank{rank}")
    tel = Telemetry(model, {"grad": "meso", "weight": "macro", "act": "off"}, sink=sink, rank=rank)
    for step in range(steps):
        x = torch.randn(32, 8, generator=g)
        y = (x[:, 0] > 0).long()
        with tel.step(step):
            loss = nn.functional.cross_entropy(model(x), y)
            tel.log_loss(loss)
            loss.backward()
        for p in model.parameters():  # plain all-reduce data parallelism
            dist.all_reduce(p.grad)
            p.grad /= world_size
        opt.step()
        opt.zero_grad()
    tel.close()
    sink.close()
    return {"rank": rank, "sent": sink.seq, "bytes": sink.bytes}


# --- speculative training ---------------------------------------------------------------------

def _tally_all_reduce() -> tuple[list[int], object]:
    """Replace ``dist.all_reduce`` in this process by a pass-through that records the bytes of
    every tensor it reduces; return the tally and the original, to restore."""
    tally: list[int] = []
    original = dist.all_reduce

    def counting(tensor, *args, **kwargs):
        tally.append(tensor.numel() * tensor.element_size())
        return original(tensor, *args, **kwargs)

    dist.all_reduce = counting
    return tally, original


def speculative_jobs(rank: int, world_size: int, task, jobs: list[tuple]) -> list[dict]:
    """Run ``jobs`` in order on this rank, one after another on the same process group.

    A job is one of

    * ``("worker", config, train_config)``: :func:`adaptive_kit.speculative.worker`, the entry
      point the notebook and ``torchrun`` use;
    * ``("ours", config, train_config, nan_rank, nan_step)``: :func:`adaptive_kit.speculative.train`
      on :class:`~adaptive_kit.speculative.DistComm`, with ``nan_rank``'s weights poisoned after
      step ``nan_step``;
    * ``("torch", method, train_config, period, warmup)``: torch's own DDP or model averaging.

    Each result also says how many bytes went through ``dist.all_reduce`` while the job ran.
    """
    from adaptive_kit.speculative import train, worker
    from adaptive_kit.speculative.baselines import torch_worker
    from adaptive_kit.speculative.comm import DistComm

    out = []
    for kind, *args in jobs:
        tally, original = _tally_all_reduce()
        try:
            if kind == "torch":
                method, train_config, period, warmup = args
                res = {"theta": torch_worker(rank, world_size, task, method, train_config, period, warmup)}
            elif kind == "worker":
                res = {"result": worker(rank, world_size, task, *args)}
            else:
                config, train_config, nan_rank, nan_step = args

                def on_step(step, engine, nan_rank=nan_rank, nan_step=nan_step):
                    if rank == nan_rank and step == nan_step:
                        engine.theta[0, :5] = float("nan")  # this process holds one row: its rank's

                res = {"result": train(task, config, train_config, comm=DistComm(), on_step=on_step)}
        finally:
            dist.all_reduce = original
        res["all_reduce_bytes"] = sum(tally)
        res["all_reduce_calls"] = len(tally)
        out.append(res)
    return out


def speculative_fails(rank: int, world_size: int, task, train_config, bad_rank: int, how: str,
                      marker_dir: str) -> None:
    """Rank ``bad_rank`` raises (``how="raise"``) or hangs (``"hang"``) after its second step of
    DDP-style training; the others wait for it in the next gradient all-reduce."""
    from adaptive_kit.speculative import train
    from adaptive_kit.speculative.baselines import ddp
    from adaptive_kit.speculative.comm import DistComm

    def on_step(step, engine):
        if rank == bad_rank and step == 1:
            _mark(marker_dir, rank)
            if how == "raise":
                raise RuntimeError(f"injected failure in rank {rank} at step {step}")
            time.sleep(600)

    train(task, ddp(), train_config, comm=DistComm(), on_step=on_step)


if __name__ == "__main__":
    # Under torchrun: each process runs its own rank and checks the sum of 1..WORLD_SIZE.
    results = run(allreduce_worker, 2, (1.0,))
    (res,) = results
    expected = res["world_size"] * (res["world_size"] + 1) / 2
    assert res["sum"] == expected, (res, expected)
    # one write per line: the ranks share the launcher's stdout
    sys.stdout.write(f"RESULT rank={res['rank']} world_size={res['world_size']} sum={res['sum']:g} "
                     f"torchrun={os.environ.get('TORCHELASTIC_RUN_ID') is not None};\n")
    sys.stdout.flush()
    sys.exit(0)
