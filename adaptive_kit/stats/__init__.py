"""Statistics of tensors: per layer on their device, pooled exactly, copied to the host
asynchronously; and the scalar EMA that host-side monitors share.

Everything that reads tensors stays on their device: no ``.item()``, no ``.cpu()``. A step's
statistics for all layers come back as one ``(L, 8)`` tensor (:func:`batched_stats`), moved to
the host with one asynchronous copy (:class:`HostCopy`).

- :mod:`.batched`: :data:`STAT_NAMES`, :func:`batched_stats`, :func:`module_tensors`;
- :mod:`.sampled`: CPU statistics in one pass (:func:`fast_stats`, :func:`small_stats`,
  :func:`tensor_stats`, :func:`partial` / :func:`rows_of`);
- :mod:`.combine`: :func:`combine_stats` (rows pooled into groups);
- :mod:`.host`: :class:`HostCopy`, :func:`layer_stats`;
- :mod:`.smoothing`: :class:`EMA` of a scalar series.
"""
from .batched import (
    CHUNK,
    CPU_BLOCK_ROWS,
    STAT_INDEX,
    STAT_NAMES,
    TensorGroup,
    batched_stats,
    module_tensors,
)
from .combine import combine_stats
from .host import HostCopy, layer_stats
from .sampled import (
    LARGE,
    SAMPLE,
    SMALL,
    WELL_CONDITIONED,
    Partial,
    _strided,
    fast_stats,
    partial,
    rows_of,
    small_stats,
    tensor_stats,
)
from .smoothing import EMA

__all__ = [
    "CHUNK", "CPU_BLOCK_ROWS", "EMA", "LARGE", "SAMPLE", "SMALL", "STAT_INDEX", "STAT_NAMES", "WELL_CONDITIONED",
    "HostCopy", "Partial", "TensorGroup", "_strided", "batched_stats", "combine_stats", "fast_stats", "layer_stats",
    "module_tensors", "partial", "rows_of", "small_stats", "tensor_stats",
]
