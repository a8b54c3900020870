"""Telemetry granularity: collect gradients, weights and activations at the level each layer needs."""
from .collector import KINDS, LEVELS, TELEMETRY_SCHEMA, StepRecord, Telemetry, TelemetryConfig

__all__ = ["KINDS", "LEVELS", "TELEMETRY_SCHEMA", "StepRecord", "Telemetry", "TelemetryConfig"]
