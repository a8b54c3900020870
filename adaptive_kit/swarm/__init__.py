"""Live swarm: N networks trained at once, reported on a ZeroMQ bus, steered by fitness.

Train a population drawn from a search space, on one device or one rank per GPU::

    swarm = Swarm(data, SwarmConfig(members=8, space=SearchSpace(depth=(1, 3)))).run(20)
    swarm.history(), swarm.lineage_frame(), swarm.collector.frame("swarm")
    swarm, collector = train_distributed(data, SwarmConfig(members=8), rounds=20, world_size=2)

The face is ``__all__``: 18 names, above 15 because the panel and the benchmarks set the optimiser
(``ALLOCATIONS``, ``PERTURB_MODES``), build members' networks and read the report schema. The
optimiser's steps, the watch and the member record are importable from here too (listed last).
"""
from .bus import SWARM_SCHEMA, Collector
from .distributed import train_distributed
from .engine import Swarm, SwarmConfig
from .optimiser import ALLOCATIONS, PERTURB_MODES, RANDOM_SEARCH, Goals, OptimiserConfig
from .spec import Layer, MemberSpec, SearchSpace, Similarity, SpecError, build_model, n_parameters
from .watch import WatchConfig

# isort: split
# Importable from here too, outside the headline names: the optimiser's steps, the watch, the
# member record and the spec vocabulary (tests and extensions use them).
from .bus import ALARM_SCHEMA  # noqa: F401
from .engine import FAULTS, Member  # noqa: F401
from .optimiser import Action, allocate, diversity_penalty, fitness, plan  # noqa: F401
from .spec import ACTIVATIONS, HPARAMS, LAYER_KINDS  # noqa: F401
from .watch import Watch  # noqa: F401

__all__ = [
    "ALLOCATIONS", "Collector", "Goals", "Layer", "MemberSpec", "OptimiserConfig", "PERTURB_MODES", "RANDOM_SEARCH",
    "SWARM_SCHEMA", "SearchSpace", "Similarity", "SpecError", "Swarm", "SwarmConfig", "WatchConfig", "build_model",
    "n_parameters", "train_distributed",
]
