"""Telemetry granularity: collect gradients, weights and activations at the level each layer needs.

``Telemetry`` collects; ``detectors`` read any level; ``faults`` break runs on purpose;
``policies`` choose levels; ``Controller`` closes the loop live; ``episodes`` train and
evaluate policies on recorded runs.
"""
from .collector import KINDS, LEVELS, TELEMETRY_SCHEMA, StepRecord, Telemetry, TelemetryConfig
from .control import Controller, StateTracker
from .detectors import DetectorSuite, Observation, observations
from .faults import FAULT_KINDS, Fault, FaultInjector
from .policies import (
    LinUCBPolicy,
    Policy,
    QLearningPolicy,
    RewardWeights,
    RulePolicy,
    State,
    StaticPolicy,
)

__all__ = [
    "FAULT_KINDS", "KINDS", "LEVELS", "TELEMETRY_SCHEMA", "Controller", "DetectorSuite", "Fault",
    "FaultInjector", "LinUCBPolicy", "Observation", "Policy", "QLearningPolicy", "RewardWeights",
    "RulePolicy", "State", "StateTracker", "StaticPolicy", "StepRecord", "Telemetry",
    "TelemetryConfig", "observations",
]
