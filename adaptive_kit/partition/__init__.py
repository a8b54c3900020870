"""Predictive partitioning: a model as a measured graph split into pipeline stages, and a
controller that re-partitions a running pipeline when devices depart from the forecast.

    plan = partition.plan_model(model, example, k=4)   # trace, measure, split, partition
    partition.compare_plans(plan.graph, 4).bottlenecks()  # ours against the anchors and METIS
    partition.emulate(plan.graph, 4, windows=100).frame()  # the controller on an emulated pipeline
"""
# families: baseline partitioners, load forecasts, test models, real pipelined runs
from . import anchors, forecast, models, pipeline
from .compare import Comparison, compare_plans
from .controller import ControllerConfig, EmulatedPipeline, emulate
from .plan import ModelPlan, plan_model, stage_loads
from .simulate import SCHEDULES, Simulation, simulate

# isort: split
# The planner's steps one by one (graph, costs, exact and bounded plans): notebook 03 walks
# through them and benchmarks/partition.py times them, so they stay on the face.
from .chain import partition_chain, stage_times
from .graph import TraceError, model_graph, trace
from .plan import best_plan, is_valid_pipeline, milp_bound, partition_graph
from .profile import CostModel, profile_batch

# isort: split
# Kept importable for widgets/partition_plots.py until it uses compare_plans (then drop):
from .metis import metis_parts, repair  # noqa: F401
from .plan import Bound, stage_graph  # noqa: F401

__all__ = [
    "Comparison", "ControllerConfig", "CostModel", "EmulatedPipeline", "ModelPlan", "SCHEDULES", "Simulation",
    "TraceError", "anchors", "best_plan", "compare_plans", "emulate", "forecast", "is_valid_pipeline", "milp_bound",
    "model_graph", "models", "partition_chain", "partition_graph", "pipeline", "plan_model", "profile_batch",
    "simulate", "stage_loads", "stage_times", "trace",
]
