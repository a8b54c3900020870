"""Predictive partitioning: a model as a graph and its split into pipeline stages.

Work in progress (issue 5): the graph, the exact chain partitioner, valid pipeline plans for
branchy graphs and the utilisation forecaster are here; the pipeline runner and the controller
are not yet.
"""
from .chain import ChainPlan, partition_chain, stage_times
from .forecast import Forecast, ForecastConfig, Forecaster, mase, rolling_origin
from .graph import TraceError, model_graph
from .plan import GraphPlan, boundary_bytes, is_valid_pipeline, partition_graph

__all__ = ["ChainPlan", "Forecast", "ForecastConfig", "Forecaster", "GraphPlan", "TraceError",
           "boundary_bytes", "is_valid_pipeline", "mase", "model_graph", "rolling_origin",
           "partition_chain", "partition_graph", "stage_times"]
