"""Run one function on K workers under torch.distributed: spawned from Python, or under torchrun.

The worker function has the signature ``fn(rank, world_size, *args)`` and finds the process
group initialised. :func:`launch` spawns the workers itself (from a notebook or a script);
:func:`run` does the same, or, under ``torchrun``, runs this process's rank only. A worker
that raises, dies or hangs ends the whole run with a :class:`WorkerError` naming its rank.
"""
from __future__ import annotations

import multiprocessing as mp
import os
import pickle
import queue
import signal
import socket
import sys
import time
import traceback
from collections.abc import Callable, Sequence
from datetime import timedelta
from typing import Any

import torch
import torch.distributed as dist


class WorkerError(RuntimeError):
    """A worker raised, crashed or timed out; ``rank`` is the first rank that failed."""

    def __init__(self, rank: int, message: str) -> None:
        super().__init__(message)
        self.rank = rank


def default_backend(world_size: int = 1) -> str:
    """``nccl`` when every worker can have a GPU of its own, else ``gloo``."""
    if torch.cuda.is_available() and torch.cuda.device_count() >= world_size and dist.is_nccl_available():
        return "nccl"
    return "gloo"


def is_torchrun() -> bool:
    """True inside a process started by ``torchrun`` (or any launcher that sets RANK/WORLD_SIZE)."""
    return "TORCHELASTIC_RUN_ID" in os.environ or ("RANK" in os.environ and "WORLD_SIZE" in os.environ)


def worker_device() -> torch.device:
    """This worker's device: its own GPU under nccl, else the CPU."""
    if dist.is_initialized() and dist.get_backend() == "nccl":
        return torch.device("cuda", torch.cuda.current_device())
    return torch.device("cpu")


def _free_port() -> int:
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _check(world_size: int, backend: str | None, timeout_s: float) -> str:
    if isinstance(world_size, bool) or not isinstance(world_size, int) or world_size < 1:
        raise ValueError(f"world_size must be an int >= 1, got {world_size!r}")
    if not timeout_s > 0:
        raise ValueError(f"timeout_s must be > 0, got {timeout_s!r}")
    backend = backend or default_backend(world_size)
    if backend not in ("gloo", "nccl"):
        raise ValueError(f"backend={backend!r}: expected 'gloo' or 'nccl'")
    if backend == "nccl" and torch.cuda.device_count() < 1:
        raise ValueError("backend='nccl' needs CUDA GPUs; none are visible")
    return backend


def _init(backend: str, rank: int, world_size: int, timeout_s: float) -> None:
    if backend == "nccl":
        torch.cuda.set_device(int(os.environ.get("LOCAL_RANK", rank)) % torch.cuda.device_count())
    dist.init_process_group(backend, rank=rank, world_size=world_size,
                            timeout=timedelta(seconds=timeout_s))


def _entry(rank: int, world_size: int, port: int, backend: str, fn: Callable[..., Any],
           args: Sequence[Any], results: Any, timeout_s: float, threads: int) -> None:
    os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port), RANK=str(rank),
                      WORLD_SIZE=str(world_size), LOCAL_RANK=str(rank),
                      LOCAL_WORLD_SIZE=str(world_size))
    torch.set_num_threads(threads)
    code = 0
    try:
        _init(backend, rank, world_size, timeout_s)
        out = fn(rank, world_size, *args)
        # plain pickle: tensors travel by value, not as shared memory tied to this process
        results.put((rank, "ok", pickle.dumps(out)))
    except BaseException as e:  # report everything, KeyboardInterrupt included
        results.put((rank, "error", "".join(traceback.format_exception(type(e), e, e.__traceback__))))
        code = 1
    finally:
        if dist.is_initialized() and code == 0:
            dist.destroy_process_group()
    results.close()
    results.join_thread()
    sys.exit(code)


def launch(fn: Callable[..., Any], world_size: int, args: Sequence[Any] = (), *,
           backend: str | None = None, timeout_s: float = 300.0, start_method: str = "spawn",
           threads_per_worker: int | None = None) -> list[Any]:
    """Run ``fn(rank, world_size, *args)`` on ``world_size`` new processes; return results by rank.

    Args:
        fn: the worker; under ``spawn`` it must be importable (defined in a module, not a
            notebook cell). ``start_method="fork"`` lifts that on CPU.
        world_size: number of workers.
        args: extra arguments, pickled to every worker.
        backend: ``gloo`` or ``nccl``; default :func:`default_backend`.
        timeout_s: limit for the whole run and for each collective.
        start_method: ``spawn`` (safe everywhere) or ``fork`` (CPU only, faster to start).
        threads_per_worker: torch intra-op threads per worker; default shares the cores.

    Raises:
        ValueError: an argument is invalid (the message names it).
        WorkerError: a worker raised, died without a result, or the run passed ``timeout_s``;
            the other workers are stopped first, so nothing is left hanging.
    """
    backend = _check(world_size, backend, timeout_s)
    if start_method not in ("spawn", "fork", "forkserver"):
        raise ValueError(f"start_method={start_method!r}: expected 'spawn', 'fork' or 'forkserver'")
    if start_method == "fork" and backend == "nccl":
        raise ValueError("start_method='fork' cannot be used with backend='nccl' (CUDA after fork)")
    if start_method != "fork" and getattr(fn, "__module__", None) == "__main__" and not getattr(
        sys.modules["__main__"], "__file__", None
    ):
        raise ValueError(f"fn={getattr(fn, '__name__', fn)!r} is defined in a notebook, which "
                         f"{start_method!r} workers cannot import: move it to a module, or use "
                         "start_method='fork' on CPU")
    threads = threads_per_worker or max(1, (os.cpu_count() or 1) // world_size)
    ctx = mp.get_context(start_method)
    results = ctx.Queue()
    port = _free_port()
    procs = [ctx.Process(target=_entry, name=f"adaptive-kit-rank{r}", daemon=True,
                         args=(r, world_size, port, backend, fn, tuple(args), results, timeout_s, threads))
             for r in range(world_size)]
    for p in procs:
        p.start()
    done: dict[int, Any] = {}
    errors: dict[int, str] = {}
    deadline = time.monotonic() + timeout_s

    def take(block_s: float) -> None:
        try:
            rank, status, payload = results.get(timeout=block_s)
        except queue.Empty:
            return
        if status == "ok":
            done[rank] = pickle.loads(payload)
        else:
            errors[rank] = payload

    try:
        while len(done) + len(errors) < world_size and not errors:
            take(0.05)
            dead = [r for r, p in enumerate(procs)
                    if not p.is_alive() and r not in done and r not in errors]
            if dead:
                take(0.5)  # a result may still be in the pipe
                for r in dead:
                    if r not in done and r not in errors:
                        code = procs[r].exitcode
                        why = (f"killed by {signal.Signals(-code).name}" if code is not None and code < 0
                               else f"exit code {code}")
                        errors[r] = f"rank {r} died without a result ({why})"
            if time.monotonic() > deadline and len(done) + len(errors) < world_size:
                waiting = [r for r in range(world_size) if r not in done and r not in errors]
                raise WorkerError(waiting[0], f"timed out after {timeout_s:g} s waiting for ranks {waiting}")
        if errors:
            time.sleep(0.2)  # let peers that saw the failure report theirs, for the message
            while True:
                before = len(errors) + len(done)
                take(0.05)
                if len(errors) + len(done) == before:
                    break
            # a dead process first, else the first error to arrive: a peer's collective fails
            # ("Connection closed by peer") only after the rank that raised has gone
            order = {r: i for i, r in enumerate(errors)}
            first = min(errors, key=lambda r: ("died without" not in errors[r], order[r]))
            others = sorted(set(errors) - {first})
            msg = f"worker rank {first} failed:\n{errors[first]}"
            if others:
                msg += f"\n(ranks {others} failed after it)"
            raise WorkerError(first, msg)
    finally:
        for p in procs:
            if p.is_alive():
                p.terminate()
        for p in procs:
            p.join(timeout=5)
            if p.is_alive():
                p.kill()
                p.join()
        results.close()
    return [done[r] for r in range(world_size)]


def init_from_env(backend: str | None = None, timeout_s: float = 300.0) -> tuple[int, int]:
    """Join the process group that ``torchrun`` describes in the environment; return (rank, size)."""
    if not is_torchrun():
        raise RuntimeError("init_from_env: RANK/WORLD_SIZE are not set; start with torchrun")
    rank, world_size = int(os.environ["RANK"]), int(os.environ["WORLD_SIZE"])
    backend = _check(world_size, backend, timeout_s)
    if not dist.is_initialized():
        _init(backend, rank, world_size, timeout_s)
    return rank, world_size


def run(fn: Callable[..., Any], world_size: int, args: Sequence[Any] = (), **launch_kwargs: Any) -> list[Any]:
    """The same worker everywhere: under ``torchrun`` run this rank, else :func:`launch` K workers.

    Under torchrun the result list holds only this rank's result (``world_size`` is taken
    from the environment); otherwise it holds every rank's, in rank order.
    """
    if is_torchrun():
        rank, size = init_from_env(launch_kwargs.get("backend"), launch_kwargs.get("timeout_s", 300.0))
        try:
            return [fn(rank, size, *args)]
        finally:
            dist.destroy_process_group()
    return launch(fn, world_size, args, **launch_kwargs)
