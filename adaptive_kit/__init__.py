"""adaptive-kit: see and steer how neural networks train. Headless: no UI imports here."""
from . import datasets, distributed, records, resources, stats, training
from .devices import budget, fast_mode, pick_device, seed_everything

__all__ = [
    "budget", "datasets", "distributed", "fast_mode", "pick_device", "records", "resources",
    "seed_everything", "stats", "training",
]
__version__ = "0.1.0"
