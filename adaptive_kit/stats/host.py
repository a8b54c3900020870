"""Statistics on their way to the host: an asynchronous copy, and a DataFrame for analysis."""
from __future__ import annotations

from collections.abc import Mapping

import pandas as pd
import torch

from .batched import STAT_NAMES, TensorGroup, batched_stats


class HostCopy:
    """A device tensor on its way to host memory: started at once, waited for only on demand.

    On CUDA the copy goes into pinned memory with ``non_blocking=True`` and an event marks its
    end, so creating a ``HostCopy`` never stalls the step; on CPU it is a plain snapshot.
    """

    def __init__(self, tensor: torch.Tensor) -> None:
        tensor = tensor.detach()
        self._event = None
        if tensor.device.type == "cuda":
            self._host = torch.empty(tensor.shape, dtype=tensor.dtype, pin_memory=True)
            self._host.copy_(tensor, non_blocking=True)
            self._event = torch.cuda.Event()
            self._event.record(torch.cuda.current_stream(tensor.device))
        else:
            self._host = tensor.clone()

    def ready(self) -> bool:
        """True when the copy has landed and :meth:`wait` will not block."""
        return self._event is None or self._event.query()

    def wait(self) -> torch.Tensor:
        """Block until the copy has landed; return the host tensor."""
        if self._event is not None:
            self._event.synchronize()
        return self._host


def layer_stats(tensors: Mapping[str, TensorGroup]) -> pd.DataFrame:
    """:func:`batched_stats` as a pandas DataFrame indexed by layer name (waits for the host copy).

    Meant for notebooks and analysis; training loops keep :func:`batched_stats` on device.
    """
    values = HostCopy(batched_stats(tensors)).wait()
    frame = pd.DataFrame(values.numpy(), index=list(tensors.keys()), columns=list(STAT_NAMES))
    for col in ("count", "nonfinite"):
        frame[col] = frame[col].astype("int64")
    frame.index.name = "layer"
    return frame
