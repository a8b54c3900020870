"""CPU / memory samples and the background resource monitor."""
from __future__ import annotations

import math
import threading
import time

import numpy as np
import psutil
import pytest
import torch

from adaptive_kit.records import SCHEMAS
from adaptive_kit.resources import ResourceMonitor, ResourceSampler

THREAD_NAME = "adaptive-kit-resources"


def monitor_threads() -> list[threading.Thread]:
    return [t for t in threading.enumerate() if t.name == THREAD_NAME]


def test_sample_has_schema_columns_and_sane_cpu_row():
    sampler = ResourceSampler()
    assert sampler.gpu_count == (torch.cuda.device_count() if torch.cuda.is_available() else 0)
    before = time.time()
    cols = sampler.sample()
    assert list(cols) == SCHEMAS["resources"].names
    n = 1 + sampler.gpu_count
    assert all(len(v) == n for v in cols.values())
    assert cols["device"][0] == "cpu"
    assert cols["device"][1:] == [f"cuda:{i}" for i in range(sampler.gpu_count)]
    assert before <= cols["time"][0] <= time.time()
    assert 0.0 <= cols["util_percent"][0] <= 100.0
    total = psutil.virtual_memory().total
    assert cols["mem_total_bytes"][0] == total
    assert 0 < cols["mem_used_bytes"][0] <= cols["mem_total_bytes"][0]
    assert cols["process_rss_bytes"][0] > 10 * 2**20  # this process holds torch: well above 10 MiB
    assert cols["process_rss_bytes"][0] < total
    assert cols["torch_allocated_bytes"][0] is None  # no torch allocator on the CPU row


def test_batch_validates_against_schema():
    batch = ResourceSampler().batch()
    assert batch.schema.equals(SCHEMAS["resources"])
    assert batch.num_rows == 1 + ResourceSampler().gpu_count
    row = batch.to_pylist()[0]
    assert row["device"] == "cpu"
    assert row["mem_used_bytes"] <= row["mem_total_bytes"]
    assert row["process_rss_bytes"] > 0


def test_cpu_util_sees_a_busy_core():
    sampler = ResourceSampler()
    sampler.sample()
    end = time.perf_counter() + 0.3
    x = 0
    while time.perf_counter() < end:  # keep one core busy between two samples
        x += 1
    util = sampler.sample()["util_percent"][0]
    # system-wide: one busy core of N shows as at least about 100/N percent
    assert util >= 0.5 * 100 / psutil.cpu_count()


def test_monitor_collects_samples_and_stops_its_thread():
    assert monitor_threads() == []
    start = time.time()
    with ResourceMonitor(0.02) as mon:
        assert len(monitor_threads()) == 1
        assert monitor_threads()[0].daemon
        time.sleep(0.2)
    end = time.time()
    assert monitor_threads() == []
    df = mon.frame()
    assert list(df.columns) == SCHEMAS["resources"].names
    cpu = df[df["device"] == "cpu"]
    # about 0.2 / 0.02 = 10 samples plus the closing one; allow a slow, shared machine
    assert 3 <= len(cpu) <= 15
    times = cpu["time"].to_numpy()
    assert np.all(np.diff(times) > 0)
    assert start <= times[0] and times[-1] <= end
    assert np.median(np.diff(times)) >= 0.015  # it waits its interval between samples
    assert cpu["util_percent"].between(0, 100).all()
    assert (cpu["mem_used_bytes"] <= cpu["mem_total_bytes"]).all()
    assert (cpu["process_rss_bytes"] > 0).all()


def test_monitor_stops_on_exception_and_caps_samples():
    with pytest.raises(RuntimeError, match="boom"):
        with ResourceMonitor(0.01, max_samples=3) as mon:
            time.sleep(0.15)
            raise RuntimeError("boom")
    assert monitor_threads() == []
    # the thread stops at max_samples; the exit adds its closing sample
    assert len(mon.frame()) == 3 + 1


@pytest.mark.parametrize("interval", [0, -1, -0.5, math.nan])
def test_monitor_rejects_bad_interval(interval):
    with pytest.raises(ValueError, match=rf"ResourceMonitor.interval_s must be > 0, got {interval!r}"):
        ResourceMonitor(interval)
    assert monitor_threads() == []
