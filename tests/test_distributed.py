"""Starting K workers: spawned from Python, forked, or under torchrun; and failing cleanly."""
from __future__ import annotations

import math
import multiprocessing as mp
import os
import re
import socket
import subprocess
import sys
import time
import types
from pathlib import Path

import dist_workers
import psutil
import pytest
import torch
import torch.distributed as dist

from adaptive_kit.distributed import (
    WorkerError,
    default_backend,
    init_from_env,
    is_torchrun,
    launch,
    run,
    worker_device,
)

ROOT = Path(__file__).resolve().parents[1]
TORCHRUN_VARS = ("RANK", "WORLD_SIZE", "LOCAL_RANK", "LOCAL_WORLD_SIZE", "MASTER_ADDR",
                 "MASTER_PORT", "TORCHELASTIC_RUN_ID", "GROUP_RANK", "ROLE_RANK")


@pytest.fixture(autouse=True)
def outside_torchrun(monkeypatch):
    for var in TORCHRUN_VARS:
        monkeypatch.delenv(var, raising=False)


def assert_no_workers_left(marker_dir: Path | None = None) -> None:
    assert mp.active_children() == []
    if marker_dir is not None:  # the pids the workers wrote are gone (or at least dead)
        for f in marker_dir.glob("rank*.pid"):
            pid = int(f.read_text())
            if psutil.pid_exists(pid):
                assert psutil.Process(pid).status() == psutil.STATUS_ZOMBIE, f.name


def free_port() -> int:
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


# --- in-process helpers ----------------------------------------------------------------------

def test_helpers_outside_torchrun(monkeypatch):
    assert not is_torchrun()
    assert not dist.is_initialized()
    assert worker_device() == torch.device("cpu")
    if not torch.cuda.is_available():
        assert default_backend(2) == "gloo"
    with pytest.raises(RuntimeError, match=r"init_from_env: RANK/WORLD_SIZE are not set"):
        init_from_env()
    monkeypatch.setenv("RANK", "0")
    assert not is_torchrun()  # RANK alone is not enough
    monkeypatch.setenv("WORLD_SIZE", "2")
    assert is_torchrun()
    monkeypatch.delenv("RANK")
    monkeypatch.delenv("WORLD_SIZE")
    monkeypatch.setenv("TORCHELASTIC_RUN_ID", "x")
    assert is_torchrun()


def test_worker_error_carries_rank():
    e = WorkerError(2, "rank 2 broke")
    assert isinstance(e, RuntimeError) and e.rank == 2 and str(e) == "rank 2 broke"


# --- bad arguments: nothing is started -------------------------------------------------------

@pytest.mark.parametrize(
    ("kwargs", "pattern"),
    [
        ({"world_size": 0}, r"world_size must be an int >= 1, got 0"),
        ({"world_size": -1}, r"world_size must be an int >= 1, got -1"),
        ({"world_size": 1.5}, r"world_size must be an int >= 1, got 1.5"),
        ({"world_size": True}, r"world_size must be an int >= 1, got True"),
        ({"world_size": "2"}, r"world_size must be an int >= 1, got '2'"),
        ({"backend": "mpi"}, r"backend='mpi': expected 'gloo' or 'nccl'"),
        ({"timeout_s": 0}, r"timeout_s must be > 0, got 0"),
        ({"timeout_s": -5.0}, r"timeout_s must be > 0, got -5.0"),
        ({"timeout_s": math.nan}, r"timeout_s must be > 0, got nan"),
        ({"start_method": "thread"}, r"start_method='thread': expected 'spawn', 'fork' or 'forkserver'"),
    ],
)
@pytest.mark.parametrize("entry", [launch, run])
def test_bad_arguments_raise_before_starting(entry, kwargs, pattern):
    kwargs = {"world_size": 2, **kwargs}
    world_size = kwargs.pop("world_size")
    with pytest.raises(ValueError, match=pattern):
        entry(dist_workers.allreduce_worker, world_size, **kwargs)
    assert mp.active_children() == []


@pytest.mark.skipif(torch.cuda.is_available(), reason="checks the no-GPU message")
def test_nccl_without_gpus():
    with pytest.raises(ValueError, match=r"backend='nccl' needs CUDA GPUs; none are visible"):
        launch(dist_workers.allreduce_worker, 2, backend="nccl")


def test_function_from_a_notebook_is_refused_under_spawn(monkeypatch):
    notebook = types.ModuleType("__main__")  # a kernel's __main__ has no __file__
    monkeypatch.setitem(sys.modules, "__main__", notebook)

    def cell_worker(rank, world_size):
        return rank

    cell_worker.__module__ = "__main__"
    for method in ("spawn", "forkserver"):
        with pytest.raises(ValueError, match=rf"fn='cell_worker' is defined in a notebook, which "
                                             rf"'{method}' workers cannot import"):
            launch(cell_worker, 2, start_method=method)
    assert mp.active_children() == []


# --- runs that work --------------------------------------------------------------------------

@pytest.mark.timeout(120)
def test_run_outside_torchrun_spawns_like_launch():
    results = run(dist_workers.allreduce_worker, 2, (2.5,))
    assert [r["rank"] for r in results] == [0, 1]
    assert [r["dist_rank"] for r in results] == [0, 1]
    assert all(r["world_size"] == r["dist_world_size"] == 2 for r in results)
    assert [r["sum"] for r in results] == [2.5 * (1 + 2)] * 2
    pids = {r["pid"] for r in results}
    assert len(pids) == 2 and os.getpid() not in pids
    assert not dist.is_initialized()  # the parent never joined the group
    assert_no_workers_left()


@pytest.mark.timeout(120)
def test_launch_three_ranks():
    results = launch(dist_workers.allreduce_worker, 3, (1.0,), backend="gloo", timeout_s=90)
    assert [r["rank"] for r in results] == [0, 1, 2]
    assert [r["sum"] for r in results] == [6.0, 6.0, 6.0]
    assert all(r["dist_world_size"] == 3 for r in results)
    assert len({r["pid"] for r in results}) == 3
    assert_no_workers_left()


@pytest.mark.timeout(60)
def test_fork_runs_a_function_spawn_could_not_import():
    offset = 10.0  # a closure over a local: only fork can run it

    def local_worker(rank, world_size):
        t = torch.tensor([offset + rank])
        dist.all_reduce(t)
        return (rank, float(t), dist.get_backend())

    t0 = time.monotonic()
    results = launch(local_worker, 2, start_method="fork", timeout_s=50)
    assert results == [(0, 21.0, "gloo"), (1, 21.0, "gloo")]
    assert time.monotonic() - t0 < 30
    assert_no_workers_left()


# --- runs that fail --------------------------------------------------------------------------

@pytest.mark.timeout(120)
def test_exception_in_rank_1(tmp_path):
    t0 = time.monotonic()
    with pytest.raises(WorkerError) as info:
        launch(dist_workers.raise_in_rank1, 2, (str(tmp_path),), timeout_s=100)
    elapsed = time.monotonic() - t0
    err = info.value
    assert err.rank == 1
    msg = str(err)
    assert msg.startswith("worker rank 1 failed:")
    assert "ValueError: rank one refuses: bad-value-42" in msg  # the original traceback
    assert "raise_in_rank1" in msg
    assert elapsed < 60  # rank 0, stuck in its barrier, was stopped long before the timeout
    assert sorted(f.name for f in tmp_path.glob("rank*.pid")) == ["rank0.pid", "rank1.pid"]
    assert_no_workers_left(tmp_path)


@pytest.mark.timeout(120)
def test_rank_1_dies_without_a_result(tmp_path):
    t0 = time.monotonic()
    with pytest.raises(WorkerError, match=r"rank 1 died without a result \(exit code 3\)") as info:
        launch(dist_workers.exit_in_rank1, 2, (str(tmp_path),), timeout_s=100)
    elapsed = time.monotonic() - t0
    assert info.value.rank == 1
    assert str(info.value).startswith("worker rank 1 failed:")
    assert elapsed < 60
    assert (tmp_path / "rank1.pid").exists()
    assert_no_workers_left(tmp_path)


@pytest.mark.timeout(60)
def test_hanging_workers_time_out(tmp_path):
    # fork starts the workers in well under the timeout, so they really hang in the function
    t0 = time.monotonic()
    with pytest.raises(WorkerError, match=re.escape("timed out after 3 s waiting for ranks [0, 1]")) as info:
        launch(dist_workers.hang, 2, (str(tmp_path),), timeout_s=3, start_method="fork")
    elapsed = time.monotonic() - t0
    assert info.value.rank == 0
    assert 3 <= elapsed < 10
    assert sorted(f.name for f in tmp_path.glob("rank*.pid")) == ["rank0.pid", "rank1.pid"]
    assert_no_workers_left(tmp_path)


# --- the same worker under torchrun ----------------------------------------------------------

@pytest.mark.timeout(150)
def test_same_worker_under_torchrun():
    env = {k: v for k, v in os.environ.items() if k not in TORCHRUN_VARS}
    env["OMP_NUM_THREADS"] = "1"
    env["PYTHONPATH"] = os.pathsep.join(filter(None, [str(ROOT), env.get("PYTHONPATH")]))
    cmd = [sys.executable, "-m", "torch.distributed.run", "--nproc_per_node=2",
           "--master_addr=127.0.0.1", f"--master_port={free_port()}", "tests/dist_workers.py"]
    proc = subprocess.run(cmd, cwd=ROOT, env=env, capture_output=True, text=True, timeout=120)
    out = proc.stdout + proc.stderr
    assert proc.returncode == 0, out[-3000:]
    found = sorted(re.findall(r"RESULT rank=(\d+) world_size=(\d+) sum=(\S+) torchrun=(\w+);",
                              proc.stdout))
    assert found == [("0", "2", "3", "True"), ("1", "2", "3", "True")], out[-3000:]
