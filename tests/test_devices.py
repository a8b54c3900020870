"""adaptive_kit.devices: device choice, seeding, fast mode."""
from __future__ import annotations

import random

import numpy as np
import pytest
import torch

from adaptive_kit.devices import FAST_ENV, budget, fast_mode, pick_device, seed_everything


@pytest.fixture
def no_cuda(monkeypatch):
    monkeypatch.setattr(torch.cuda, "is_available", lambda: False)


def test_pick_device_default_follows_cuda():
    expected = "cuda" if torch.cuda.is_available() else "cpu"
    assert pick_device().type == expected


def test_pick_device_is_cpu_without_cuda(no_cuda):
    assert pick_device() == torch.device("cpu")


@pytest.mark.parametrize("prefer", ["cpu", torch.device("cpu")])
def test_pick_device_cpu(prefer):
    assert pick_device(prefer) == torch.device("cpu")


@pytest.mark.parametrize("prefer", ["cuda", "cuda:0"])
def test_pick_device_cuda_unavailable_raises(no_cuda, prefer):
    with pytest.raises(ValueError, match="CUDA") as info:
        pick_device(prefer)
    assert "CUDA" in str(info.value) and repr(prefer) in str(info.value)


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")
def test_pick_device_cuda_index_out_of_range():
    with pytest.raises(ValueError, match="GPU"):
        pick_device(f"cuda:{torch.cuda.device_count()}")


@pytest.mark.parametrize("prefer", ["gpu0", "nonsense", "cpu:x"])
def test_pick_device_nonsense_raises(prefer):
    with pytest.raises(ValueError, match=repr(prefer)):
        pick_device(prefer)


def _draws() -> tuple[list[float], np.ndarray, torch.Tensor]:
    return [random.random() for _ in range(3)], np.random.rand(3), torch.rand(3)


@pytest.mark.parametrize("seed", [0, 1234, 2**32 - 1, np.int64(7)])
def test_seed_everything_repeats(seed):
    seed_everything(seed)
    py1, np1, t1 = _draws()
    seed_everything(seed)
    py2, np2, t2 = _draws()
    assert py1 == py2
    np.testing.assert_array_equal(np1, np2)
    torch.testing.assert_close(t1, t2, rtol=0, atol=0)


def test_different_seeds_differ():
    seed_everything(0)
    a = _draws()
    seed_everything(1)
    b = _draws()
    assert a[0] != b[0] and not np.array_equal(a[1], b[1]) and not torch.equal(a[2], b[2])


@pytest.mark.parametrize("seed", [-1, 2**32, 1.5, True, "0", None])
def test_seed_everything_rejects_bad_seeds(seed):
    with pytest.raises(ValueError, match=repr(seed).replace(".", r"\.")):
        seed_everything(seed)


@pytest.mark.parametrize(
    ("value", "expected"),
    [("1", True), ("true", True), ("TRUE", True), (" yes ", True), ("on", True),
     ("0", False), ("", False), ("false", False), ("no", False), ("off", False)],
)
def test_fast_mode_values(monkeypatch, value, expected):
    monkeypatch.setenv(FAST_ENV, value)
    assert fast_mode() is expected
    assert budget(full=100, fast=3) == (3 if expected else 100)


def test_fast_mode_unset_is_false(monkeypatch):
    monkeypatch.delenv(FAST_ENV, raising=False)
    assert fast_mode() is False
    assert budget("big", "small") == "big"


@pytest.mark.parametrize("value", ["2", "maybe", "fast"])
def test_fast_mode_bad_value_raises(monkeypatch, value):
    monkeypatch.setenv(FAST_ENV, value)
    with pytest.raises(ValueError, match="ADAPTIVE_KIT_FAST") as info:
        fast_mode()
    assert repr(value) in str(info.value)
    with pytest.raises(ValueError, match="ADAPTIVE_KIT_FAST"):
        budget(1, 2)


def test_devices_fixture_names_a_working_device(devices):
    """Runs once per device here (tests/conftest.py): "cpu", and "cuda" when a GPU is present."""
    dev = pick_device(devices)
    x = torch.arange(6.0, device=dev).view(2, 3)
    assert x.device.type == devices
    torch.testing.assert_close((x @ x.T).cpu(), torch.tensor([[5.0, 14.0], [14.0, 50.0]]))


@pytest.mark.skipif(torch.cuda.device_count() < 2,
                    reason=f"nccl needs >= 2 GPUs; {torch.cuda.device_count()} visible here")
def test_nccl_all_reduce_across_gpus():
    import dist_workers

    from adaptive_kit.distributed import launch

    n = torch.cuda.device_count()
    results = launch(dist_workers.allreduce_worker, n, (1.0,), backend="nccl", timeout_s=120)
    assert sorted(r["rank"] for r in results) == list(range(n))
    assert all(r["sum"] == n * (n + 1) / 2 for r in results)
