"""Live swarm: N networks trained at once, reported on a ZeroMQ bus, steered by fitness.

``Swarm(data, SwarmConfig(members=8)).run(20)`` trains a population drawn from a
:class:`SearchSpace`; :meth:`Swarm.history`, :meth:`Swarm.lineage_frame` and the
:class:`Collector` hold what happened.
"""
from .bus import ALARM_SCHEMA, SWARM_SCHEMA, Collector
from .distributed import train_distributed
from .engine import FAULTS, Member, Swarm, SwarmConfig
from .optimiser import (
                   RANDOM_SEARCH,
                   Action,
                   Goals,
                   OptimiserConfig,
                   allocate,
                   diversity_penalty,
                   fitness,
                   plan,
)
from .spec import (
                   ACTIVATIONS,
                   HPARAMS,
                   LAYER_KINDS,
                   Layer,
                   MemberSpec,
                   SearchSpace,
                   Similarity,
                   SpecError,
                   build_model,
                   n_parameters,
)
from .watch import Watch, WatchConfig

__all__ = [
    "ACTIVATIONS", "ALARM_SCHEMA", "Action", "Collector", "FAULTS", "Goals", "HPARAMS", "LAYER_KINDS", "Layer",
    "Member", "MemberSpec", "OptimiserConfig", "RANDOM_SEARCH", "SWARM_SCHEMA", "SearchSpace", "Similarity", "SpecError", "Swarm",
    "SwarmConfig", "Watch", "WatchConfig", "allocate", "build_model", "diversity_penalty", "fitness", "n_parameters",
    "plan", "train_distributed",
]
