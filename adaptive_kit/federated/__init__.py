"""Federated meta-learning over adaptively partitioned data.

- :mod:`~adaptive_kit.federated.ordinal`: binary and ordinal (proportional-odds) logistic
  regression in torch, matching statsmodels' ``OrderedModel``;
- :mod:`~adaptive_kit.federated.profile`: the data profiler (kNN density, feature importance,
  k-means on device);
- :mod:`~adaptive_kit.federated.partition`: the dynamic partitioning engine (granularity, minimum
  size, balanced recursive cuts, assignment to resources);
- :mod:`~adaptive_kit.federated.meta`: FedAvg, FedProx, one-shot averaging, Reptile, Per-FedAvg,
  Meta-SGD and Meta-Curvature over vectorised clients, in one process or with clients as ranks;
- :mod:`~adaptive_kit.federated.drift`: Page-Hinkley, ADWIN and KS detectors and the stream loop
  that re-partitions on drift;
- :mod:`~adaptive_kit.federated.data`: ``fair``, ``randhie`` and drifting regime mixtures.
"""
from . import data, drift, meta, ordinal, partition, profile

__all__ = ["data", "drift", "meta", "ordinal", "partition", "profile"]
