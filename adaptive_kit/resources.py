"""CPU, memory and GPU utilisation samples: psutil always, NVML and torch.cuda when a GPU is there."""
from __future__ import annotations

import threading
import time
from typing import Any

import pandas as pd
import psutil
import pyarrow as pa
import torch

from .records import to_batch

try:  # nvidia-ml-py; its import works without a GPU, nvmlInit does not
    import pynvml
except ImportError:  # pragma: no cover - it is a dependency, but stay usable without it
    pynvml = None


def _nvml_handles() -> list[Any]:
    if pynvml is None or not torch.cuda.is_available():
        return []
    try:
        pynvml.nvmlInit()
        return [pynvml.nvmlDeviceGetHandleByIndex(i) for i in range(pynvml.nvmlDeviceGetCount())]
    except pynvml.NVMLError:
        return []


class ResourceSampler:
    """Takes utilisation samples: one row for the CPU and one per visible GPU.

    CPU utilisation is the system-wide percentage since the previous sample (psutil), so the
    first sample after construction covers the time since construction.
    """

    def __init__(self) -> None:
        self._proc = psutil.Process()
        psutil.cpu_percent(interval=None)  # start the interval the first sample measures
        self._gpus = _nvml_handles()

    @property
    def gpu_count(self) -> int:
        return len(self._gpus) if self._gpus else (torch.cuda.device_count() if torch.cuda.is_available() else 0)

    def sample(self) -> dict[str, list[Any]]:
        """One sample as columns of the ``resources`` schema."""
        now = time.time()
        vm = psutil.virtual_memory()
        rss = self._proc.memory_info().rss
        cols: dict[str, list[Any]] = {
            "time": [now], "device": ["cpu"], "util_percent": [psutil.cpu_percent(interval=None)],
            "mem_used_bytes": [vm.total - vm.available], "mem_total_bytes": [vm.total],
            "torch_allocated_bytes": [None], "torch_reserved_bytes": [None],
            "process_rss_bytes": [rss],
        }
        for i in range(self.gpu_count):
            util = used = total = None
            if self._gpus:
                try:
                    util = float(pynvml.nvmlDeviceGetUtilizationRates(self._gpus[i]).gpu)
                    mem = pynvml.nvmlDeviceGetMemoryInfo(self._gpus[i])
                    used, total = int(mem.used), int(mem.total)
                except pynvml.NVMLError:
                    pass
            for key, value in (
                ("time", now), ("device", f"cuda:{i}"), ("util_percent", util),
                ("mem_used_bytes", used), ("mem_total_bytes", total),
                ("torch_allocated_bytes", torch.cuda.memory_allocated(i)),
                ("torch_reserved_bytes", torch.cuda.memory_reserved(i)),
                ("process_rss_bytes", rss),
            ):
                cols[key].append(value)
        return cols

    def batch(self) -> pa.RecordBatch:
        """One sample as a ``resources`` record batch."""
        return to_batch("resources", self.sample())


class ResourceMonitor:
    """Samples in a background thread every ``interval_s`` while the ``with`` block runs.

    ``with ResourceMonitor(0.5) as mon: train(); mon.frame()`` gives a DataFrame of samples.
    The thread is stopped and joined on exit, so no thread outlives the block.
    """

    def __init__(self, interval_s: float = 0.5, max_samples: int = 100_000) -> None:
        if not interval_s > 0:
            raise ValueError(f"ResourceMonitor.interval_s must be > 0, got {interval_s!r}")
        self.interval_s = float(interval_s)
        self.max_samples = int(max_samples)
        self._sampler = ResourceSampler()
        self._batches: list[pa.RecordBatch] = []
        self._stop = threading.Event()
        self._thread: threading.Thread | None = None

    def _run(self) -> None:
        while not self._stop.is_set() and len(self._batches) < self.max_samples:
            self._batches.append(self._sampler.batch())
            self._stop.wait(self.interval_s)

    def __enter__(self) -> ResourceMonitor:
        self._stop.clear()
        self._thread = threading.Thread(target=self._run, name="adaptive-kit-resources", daemon=True)
        self._thread.start()
        return self

    def __exit__(self, *exc: object) -> None:
        self._stop.set()
        if self._thread is not None:
            self._thread.join()
        self._batches.append(self._sampler.batch())  # always end with a sample

    def frame(self) -> pd.DataFrame:
        """All samples taken so far, one row per device per sample."""
        return pa.Table.from_batches(list(self._batches)).to_pandas()
