"""Federated meta-learning over adaptively partitioned data: balanced subsets of the rows become
clients, one starting model is learned across them without pooling rows, each client adapts it
in a step or five, and drift detectors rebuild the subsets when the data moves.

    part = adaptive_partition(d.x, d.y, granularity=0.5, min_size=50)
    clients = make_clients(d.x, d.y, part.labels)
    result = train(clients, FederatedConfig(method="metasgd", rounds=30))
    summary(evaluate(result.model, clients, steps=(0, 1, 5), lr=1.0, newton=0.03, guard=True))
"""
# families used as namespaces: the data sets, the drift detectors and stream loop, the ordinal
# model every client fits, and the data profiler (k-means, density, feature importance)
from . import data, drift, ordinal, profile
from .meta import (
    META_METHODS,
    METHODS,
    FederatedConfig,
    FederatedResult,
    adapt,
    evaluate,
    local_only,
    make_clients,
    summary,
    train,
    train_distributed,
)
from .subsets import DataPartition, adaptive_partition, largest_over_mean, local_accuracy, n_parts

__all__ = [
    "META_METHODS", "METHODS", "DataPartition", "FederatedConfig", "FederatedResult", "adapt", "adaptive_partition",
    "data", "drift", "evaluate", "largest_over_mean", "local_accuracy", "local_only", "make_clients", "n_parts",
    "ordinal", "profile", "summary", "train", "train_distributed",
]
