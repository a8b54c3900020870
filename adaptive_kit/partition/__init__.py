"""Predictive partitioning: a model as a graph, its split into pipeline stages, and a controller
that re-partitions a running pipeline when devices depart from the forecast.

- :func:`model_graph` / :func:`trace`: torch.fx nodes with FLOPs, bytes and measured time.
- :func:`profile_batch`, :class:`CostModel`: batch characteristics and seconds calibrated on
  measurements.
- :class:`Forecaster`: online ETS forecasts of utilisation with intervals (statsmodels).
- :func:`partition_chain` (exact), :func:`partition_graph` / :func:`best_plan` (always a valid
  pipeline), :func:`milp_bound` (the gap), :func:`split_linear` (operation-level splits),
  :func:`metis_parts` + :func:`repair` (pymetis, optional), :func:`plan_model` (all in one call).
- :func:`simulate`: GPipe and 1F1B schedules; :mod:`.pipeline`: real execution with
  torch.distributed.pipelining.
- :class:`Controller`, :class:`EmulatedPipeline`: runtime adaptation.
"""
from .chain import ChainPlan, partition_chain, stage_times
from .controller import (
    Controller,
    ControllerConfig,
    Decision,
    EmulatedPipeline,
    emulate,
    migration_seconds,
)
from .forecast import Forecast, ForecastConfig, Forecaster, mase, rolling_origin
from .graph import TraceError, model_graph, trace
from .plan import (
    Bound,
    GraphPlan,
    ModelPlan,
    best_plan,
    boundary_bytes,
    is_valid_pipeline,
    metis_parts,
    milp_bound,
    partition_graph,
    plan_model,
    refine,
    repair,
    stage_graph,
)
from .profile import BatchProfile, CostModel, profile_batch
from .simulate import Simulation, simulate, stage_order
from .split import dominant_linears, split_linear

__all__ = ["BatchProfile", "Bound", "ChainPlan", "Controller", "ControllerConfig", "CostModel", "Decision",
           "EmulatedPipeline", "Forecast", "ForecastConfig", "Forecaster", "GraphPlan", "ModelPlan", "Simulation",
           "TraceError", "best_plan", "boundary_bytes", "dominant_linears", "emulate", "is_valid_pipeline",
           "mase", "metis_parts", "migration_seconds", "milp_bound", "model_graph", "partition_chain",
           "partition_graph", "plan_model", "profile_batch", "refine", "repair", "rolling_origin", "simulate",
           "split_linear", "stage_graph", "stage_order", "stage_times", "trace"]
