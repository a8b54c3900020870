"""Predictive partitioning: a model as a graph and its split into pipeline stages.

Work in progress (issue 5): the graph, the exact chain partitioner and valid pipeline plans for
branchy graphs are here; the forecaster, the pipeline runner and the controller are not yet.
"""
from .chain import ChainPlan, partition_chain, stage_times
from .graph import TraceError, model_graph
from .plan import GraphPlan, boundary_bytes, is_valid_pipeline, partition_graph

__all__ = ["ChainPlan", "GraphPlan", "TraceError", "boundary_bytes", "is_valid_pipeline", "model_graph",
           "partition_chain", "partition_graph", "stage_times"]
