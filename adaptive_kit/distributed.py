"""Run one function on K workers under torch.distributed: spawned from Python, or under torchrun.

The worker function has the signature ``fn(rank, world_size, *args)`` and finds the process
group initialised. :func:`launch` spawns the workers itself (from a notebook or a script);
:func:`run` does the same, or, under ``torchrun``, runs this process's rank only. A worker
that raises, dies or hangs ends the whole run with a :class:`WorkerError` naming its rank:
every worker sends a heartbeat saying where its main thread is and whether it waits inside a
collective, so at the deadline a rank stuck in its own code (or silent) is named, and ranks
that only wait for it in a collective are not blamed. The rendezvous store lives in the
launcher, bound to loopback (or to ``MASTER_ADDR`` when set), and gloo's sockets bind to the
interface of that address: nothing listens on other interfaces.
"""
from __future__ import annotations

import multiprocessing as mp
import os
import pickle
import queue
import signal
import socket
import sys
import threading
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
        s.bind((bind_address(), 0))
        return s.getsockname()[1]


def bind_address() -> str:
    """Where the kit's sockets listen: ``MASTER_ADDR`` when set, else loopback (127.0.0.1)."""
    return os.environ.get("MASTER_ADDR") or "127.0.0.1"


def _interface_of(address: str) -> str | None:
    """The network interface that holds ``address`` (e.g. ``lo`` for 127.0.0.1), if any."""
    import psutil

    try:
        ip = socket.gethostbyname(address)
    except OSError:
        return None
    if ip.startswith("127."):
        ip = "127.0.0.1"  # all of 127/8 is the loopback interface's
    for name, addrs in psutil.net_if_addrs().items():
        if any(a.family == socket.AF_INET and a.address == ip for a in addrs):
            return name
    return None


def _listen_store(address: str, world_size: int, timeout_s: float) -> tuple[Any, int]:
    """A TCPStore served from this process on a socket bound to ``address`` only (not all interfaces)."""
    sock = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
    try:
        sock.bind((address, 0))
    except OSError as e:
        sock.close()
        raise ValueError(f"MASTER_ADDR={address!r}: cannot listen there ({e}); use a local address "
                         "such as 127.0.0.1") from None
    sock.listen(max(128, world_size))
    port = sock.getsockname()[1]
    fd = sock.detach()  # the store owns the socket from here and closes it
    store = dist.TCPStore(address, port, world_size, True, timedelta(seconds=timeout_s),
                          wait_for_workers=False, master_listen_fd=fd)
    return store, port


def _where(frame: Any) -> tuple[str, bool]:
    """Where a thread is ('fn (file:line)' of the innermost frame outside torch) and whether it is
    inside a torch.distributed call (a collective, a barrier, the rendezvous)."""
    inside, own = False, None
    f = frame
    while f is not None:
        name = f.f_code.co_filename.replace(os.sep, "/")
        if "/torch/distributed/" in name:
            inside = True
        elif own is None and "/torch/" not in name and "/multiprocessing/" not in name \
                and not name.endswith("adaptive_kit/distributed.py"):
            own = f"{f.f_code.co_name} ({name.rsplit('/', 1)[-1]}:{f.f_lineno})"
        f = f.f_back
    return own or "the launcher's entry", inside


def _heartbeat(rank: int, results: Any, main: int, stop: threading.Event, every_s: float) -> None:
    """Send (rank, "beat", (where, in_collective)) every ``every_s``: the launcher's view of the rank."""
    while not stop.wait(every_s):
        frame = sys._current_frames().get(main)
        if frame is None:
            return
        try:
            results.put((rank, "beat", _where(frame)))
        except (ValueError, OSError):  # the queue is closed: the run is over
            return


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


def _init(backend: str, rank: int, world_size: int, timeout_s: float, store: Any = None) -> None:
    if backend == "nccl":
        torch.cuda.set_device(int(os.environ.get("LOCAL_RANK", rank)) % torch.cuda.device_count())
    dist.init_process_group(backend, rank=rank, world_size=world_size, store=store,
                            timeout=timedelta(seconds=timeout_s))


_BEAT_S = 0.5  # seconds between a worker's heartbeats


def _entry(rank: int, world_size: int, port: int, backend: str, fn: Callable[..., Any],
           args: Sequence[Any], results: Any, timeout_s: float, threads: int,
           address: str = "127.0.0.1") -> None:
    os.environ.update(MASTER_ADDR=address, MASTER_PORT=str(port), RANK=str(rank),
                      WORLD_SIZE=str(world_size), LOCAL_RANK=str(rank),
                      LOCAL_WORLD_SIZE=str(world_size))
    iface = _interface_of(address)
    if iface is not None:  # gloo and nccl listen on that interface only, not the hostname's
        os.environ.setdefault("GLOO_SOCKET_IFNAME", iface)
        os.environ.setdefault("NCCL_SOCKET_IFNAME", iface)
    torch.set_num_threads(threads)
    stop = threading.Event()
    threading.Thread(target=_heartbeat, args=(rank, results, threading.get_ident(), stop, _BEAT_S),
                     name=f"adaptive-kit-heartbeat-rank{rank}", daemon=True).start()
    code = 0
    try:
        store = dist.TCPStore(address, port, world_size, False, timedelta(seconds=timeout_s))
        _init(backend, rank, world_size, timeout_s, store)
        out = fn(rank, world_size, *args)
        # plain pickle: tensors travel by value, not as shared memory tied to this process
        results.put((rank, "ok", pickle.dumps(out)))
    except BaseException as e:  # report everything, KeyboardInterrupt included
        results.put((rank, "error", "".join(traceback.format_exception(type(e), e, e.__traceback__))))
        code = 1
    finally:
        stop.set()
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
    address = bind_address()
    store, port = _listen_store(address, world_size, timeout_s)
    procs = [ctx.Process(target=_entry, name=f"adaptive-kit-rank{r}", daemon=True,
                         args=(r, world_size, port, backend, fn, tuple(args), results, timeout_s, threads,
                               address))
             for r in range(world_size)]
    for p in procs:
        p.start()
    done: dict[int, Any] = {}
    errors: dict[int, str] = {}
    beats: dict[int, tuple[float, str, bool]] = {}  # rank -> (received at, where, in a collective)
    started = time.monotonic()
    deadline = started + timeout_s

    def take(block_s: float) -> None:
        while True:
            try:
                rank, status, payload = results.get(timeout=block_s)
            except queue.Empty:
                return
            if status == "beat":
                beats[rank] = (time.monotonic(), *payload)
                block_s = 0.001  # drain the beats, then look at the processes again
                continue
            if status == "ok":
                done[rank] = pickle.loads(payload)
            else:
                errors[rank] = payload
            return

    def reap() -> None:
        """Record the ranks whose process ended without a result."""
        dead = [r for r, p in enumerate(procs) if not p.is_alive() and r not in done and r not in errors]
        if dead:
            take(0.5)  # a result may still be in the pipe
            for r in dead:
                if r not in done and r not in errors:
                    code = procs[r].exitcode
                    why = (f"killed by {signal.Signals(-code).name}" if code is not None and code < 0
                           else f"exit code {code}")
                    errors[r] = f"rank {r} died without a result ({why})"

    def stuck(ranks: list[int], evidence: bool = False) -> tuple[list[int], dict[int, str]]:
        """Of ``ranks`` (alive, no result): those stuck outside a collective or silent, and why.

        With ``evidence``, a rank that never sent a heartbeat (still starting) is not blamed."""
        now, why = time.monotonic(), {}
        for r in ranks:
            if evidence and r not in beats:
                continue
            seen, where, inside = beats.get(r, (started, "its start", False))
            if now - seen > max(4 * _BEAT_S, 2.0):
                why[r] = f"no heartbeat for {now - seen:.1f} s (last at {where})"
            elif not inside:
                why[r] = f"busy in its own code at {where}, not in a collective"
        return sorted(why), why

    try:
        while len(done) + len(errors) < world_size and not errors:
            take(0.05)
            reap()
            if time.monotonic() > deadline and len(done) + len(errors) < world_size:
                waiting = [r for r in range(world_size) if r not in done and r not in errors]
                hung, why = stuck(waiting)
                blamed = hung or waiting
                others = [r for r in waiting if r not in hung]
                msg = (f"timed out after {timeout_s:g} s waiting for ranks {waiting}: "
                       + "; ".join(f"rank {r} hung ({why[r]})" for r in hung))
                if hung and others:
                    msg += f"; ranks {others} were waiting for it in a collective"
                elif not hung:
                    msg += "every one waiting in a collective (" + "; ".join(
                        f"rank {r} at {beats[r][1]}" for r in waiting if r in beats) + ")"
                raise WorkerError(blamed[0], msg)
        if errors:
            time.sleep(0.2)  # let peers that saw the failure report theirs, for the message
            while True:
                before = len(errors) + len(done)
                take(0.05)
                if len(errors) + len(done) == before:
                    break
            for _ in range(10):  # a rank that died makes its peers' collectives fail: find it
                reap()
                if any("died without" in e for e in errors.values()):
                    break
                time.sleep(0.1)
            # a dead process first, else the first error to arrive: a peer's collective fails
            # ("Connection closed by peer") only after the rank that raised has gone
            order = {r: i for i, r in enumerate(errors)}
            first = min(errors, key=lambda r: ("died without" not in errors[r], order[r]))
            others = sorted(set(errors) - {first})
            alive = [r for r in range(world_size) if r not in done and r not in errors]
            hung, why = stuck(alive, evidence=True)
            if hung and not any("died without" in e for e in errors.values()) and all("/torch/distributed/" in errors[r].replace(os.sep, "/") for r in errors):
                # the failures are collectives timing out: the rank they waited for is to blame
                raise WorkerError(hung[0], f"worker rank {hung[0]} hung ({why[hung[0]]}); ranks "
                                  f"{sorted(errors)} failed waiting for it:\n{errors[first]}")
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
        del store  # closes its listening socket
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
