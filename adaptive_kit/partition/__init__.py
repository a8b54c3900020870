"""Predictive partitioning: a model as a measured graph split into pipeline stages, and a
controller that re-partitions a running pipeline when devices depart from the forecast.

    plan = partition.plan_model(model, example, k=4)   # trace, measure, split, partition
    partition.compare_plans(plan.graph, 4).bottlenecks()  # ours against the anchors and METIS
    partition.emulate(plan.graph, 4, windows=100).frame()  # the controller on an emulated pipeline
"""
# Families as namespaces. More than 15 names because notebook 03 walks through the planner's steps
# and benchmarks/partition.py times them one by one: graph (trace, model_graph), profile
# (profile_batch, CostModel), chain (the exact chain split), plan (partition_graph, milp_bound, ...).
from . import anchors, chain, forecast, graph, models, pipeline, plan, profile
from .compare import Comparison, compare_plans
from .controller import ControllerConfig, EmulatedPipeline, emulate
from .plan import ModelPlan, best_plan, plan_model, stage_loads
from .simulate import SCHEDULES, Simulation, simulate

__all__ = [
    "Comparison", "ControllerConfig", "EmulatedPipeline", "ModelPlan", "SCHEDULES", "Simulation", "anchors",
    "best_plan", "chain", "compare_plans", "emulate", "forecast", "graph", "models", "pipeline", "plan",
    "plan_model", "profile", "simulate", "stage_loads",
]
