"""Predictive partitioning: split a model into pipeline stages (work in progress: chains so far)."""
from .chain import ChainPlan, partition_chain, stage_times

__all__ = ["ChainPlan", "partition_chain", "stage_times"]
