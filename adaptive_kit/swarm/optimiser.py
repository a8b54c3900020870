"""The swarm optimiser's decisions: fitness from goals, step allocation, exploit / explore / breed.

Pure functions of the members' latest metrics and a seeded generator, so that every process of a
distributed swarm takes the same decisions from the same gathered metrics.
"""
from __future__ import annotations

from dataclasses import dataclass

import numpy as np

ALLOCATIONS = ("proportional", "equal")
PERTURB_MODES = ("random", "grid")


@dataclass(frozen=True)
class Goals:
    """Fitness weights. Each term is a score in [0, 1]; fitness is their weighted mean.

    - accuracy: validation accuracy;
    - loss: exp(-validation loss);
    - efficiency: the cheapest member's compute per step / this member's (1 for the cheapest);
    - generalisation: 1 - max(0, training accuracy - validation accuracy).
    """

    accuracy: float = 1.0
    loss: float = 0.0
    efficiency: float = 0.0
    generalisation: float = 0.0

    def __post_init__(self) -> None:
        vals = (self.accuracy, self.loss, self.efficiency, self.generalisation)
        if any(not (isinstance(v, (int, float)) and v >= 0) for v in vals) or sum(vals) <= 0:
            raise ValueError(f"Goals{vals!r}: weights must be numbers >= 0 with a positive sum")


def fitness(goals: Goals, val_acc: np.ndarray, val_loss: np.ndarray, cost: np.ndarray,
            train_acc: np.ndarray) -> np.ndarray:
    """Fitness per member in [0, 1]; a member with a non-finite metric scores 0.

    ``cost`` is compute seconds per step (only its ratios matter).
    """
    val_acc, val_loss = np.asarray(val_acc, float), np.asarray(val_loss, float)
    cost, train_acc = np.asarray(cost, float), np.asarray(train_acc, float)
    with np.errstate(invalid="ignore", divide="ignore", over="ignore"):
        finite_cost = cost[np.isfinite(cost) & (cost > 0)]
        cheapest = finite_cost.min() if finite_cost.size else 1.0
        terms = {
            "accuracy": val_acc,
            "loss": np.exp(-val_loss),
            "efficiency": np.where(np.isfinite(cost) & (cost > 0), cheapest / cost, 1.0),
            "generalisation": 1.0 - np.clip(train_acc - val_acc, 0.0, 1.0),
        }
        weights = {k: getattr(goals, k) for k in terms}
        total = sum(weights.values())
        f = sum(w * terms[k] for k, w in weights.items() if w > 0) / total
    return np.where(np.isfinite(f), np.clip(f, 0.0, 1.0), 0.0)


def diversity_penalty(fit: np.ndarray, similarity: np.ndarray, weight: float) -> np.ndarray:
    """Fitness less ``weight`` x the largest similarity to a fitter member (fitness sharing's
    idea without its cost): a near-clone of a better member is worth less, the best member
    nothing less. Never below 0."""
    fit = np.asarray(fit, float)
    if weight == 0 or fit.size < 2:
        return fit.copy()
    fitter = fit[None, :] > fit[:, None]  # [i, j]: j is fitter than i
    sim = np.where(fitter, similarity, 0.0)
    return np.maximum(fit - weight * sim.max(axis=1), 0.0)


@dataclass(frozen=True)
class OptimiserConfig:
    allocation: str = "proportional"  # "proportional" (the seed's pseudocode) or "equal"
    temperature: float = 0.25  # p ∝ fitness ** (1 / temperature); 1 is the seed's linear rule
    min_share: float = 0.1  # every active member gets at least this fraction of an equal share
    exploit_every: int = 2  # rounds between exploit / explore steps (0: never)
    warmup_rounds: int = 2  # rounds before the first exploit
    truncation: float = 0.25  # the bottom fraction is replaced from the top fraction
    perturb: str = "random"  # "random" (x0.8 / x1.25 or resample) or "grid" (one grid step)
    mutation_rate: float = 1.0  # probability that each hyper-parameter is perturbed on explore
    resample: float = 0.25  # in random mode, probability of a fresh draw instead of a factor
    breed_rate: float = 0.25  # fraction of replacements that are children of two top parents
    arch_mutation: float = 0.1  # probability that an explored or bred member's layers change
    diversity: float = 0.05  # fitness penalty per unit of similarity to a fitter member
    refill_quarantined: bool = True  # quarantined members are replaced at the next exploit

    def __post_init__(self) -> None:
        if self.allocation not in ALLOCATIONS:
            raise ValueError(f"OptimiserConfig.allocation={self.allocation!r}: expected one of {ALLOCATIONS}")
        if self.perturb not in PERTURB_MODES:
            raise ValueError(f"OptimiserConfig.perturb={self.perturb!r}: expected one of {PERTURB_MODES}")
        if not self.temperature > 0:
            raise ValueError(f"OptimiserConfig.temperature must be > 0, got {self.temperature!r}")
        for name in ("min_share", "mutation_rate", "resample", "breed_rate", "arch_mutation"):
            if not 0 <= getattr(self, name) <= 1:
                raise ValueError(f"OptimiserConfig.{name} must be in [0, 1], got {getattr(self, name)!r}")
        if not 0 < self.truncation <= 0.5:
            raise ValueError(f"OptimiserConfig.truncation must be in (0, 0.5], got {self.truncation!r}")
        for name in ("exploit_every", "warmup_rounds"):
            v = getattr(self, name)
            if isinstance(v, bool) or not isinstance(v, int) or v < 0:
                raise ValueError(f"OptimiserConfig.{name} must be an int >= 0, got {v!r}")
        if not self.diversity >= 0:
            raise ValueError(f"OptimiserConfig.diversity must be >= 0, got {self.diversity!r}")


RANDOM_SEARCH = OptimiserConfig(allocation="equal", exploit_every=0)  # a swarm's random-search twin


def allocate(fit: np.ndarray, total_steps: int, active: np.ndarray, config: OptimiserConfig) -> np.ndarray:
    """Steps per member for one round; they sum to ``total_steps`` exactly (inactive members get 0).

    The seed's rule: probabilities = fitness / sum(fitness), steps = probability x total. Here
    fitness is first raised to ``1 / temperature`` (1 keeps the seed's rule), every active member
    keeps at least ``min_share`` of an equal share so that it is still measured, and the
    fractions are rounded by largest remainder.
    """
    fit = np.asarray(fit, float)
    active = np.asarray(active, bool)
    out = np.zeros(fit.size, dtype=np.int64)
    n = int(active.sum())
    if n == 0 or total_steps <= 0:
        return out
    if config.allocation == "equal":
        p = np.full(n, 1.0 / n)
    else:
        f = np.clip(np.nan_to_num(fit[active], nan=0.0), 0.0, None) ** (1.0 / config.temperature)
        p = f / f.sum() if f.sum() > 0 else np.full(n, 1.0 / n)
        floor = config.min_share / n
        p = floor + (1.0 - config.min_share) * p
    raw = p * total_steps
    steps = np.floor(raw).astype(np.int64)
    short = total_steps - int(steps.sum())
    if short > 0:
        steps[np.argsort(-(raw - steps), kind="stable")[:short]] += 1
    out[active] = steps
    return out


@dataclass(frozen=True)
class Action:
    """One replacement: member ``dst`` takes weights from ``parents`` (one: exploit; two: breed)."""

    kind: str  # "exploit" or "breed"
    dst: int
    parents: tuple[int, ...]


def plan(adjusted: np.ndarray, active: np.ndarray, quarantined: np.ndarray, config: OptimiserConfig,
         rng: np.random.Generator) -> list[Action]:
    """Truncation selection: the bottom ``truncation`` of active members (and, with
    ``refill_quarantined``, every quarantined one) is replaced, each by a copy of a random
    member of the top ``truncation`` (exploit, then explore) or, with probability
    ``breed_rate``, by a child of two distinct top members.
    """
    adjusted = np.asarray(adjusted, float)
    ids = np.flatnonzero(active)
    if ids.size == 0:
        return []
    k = max(1, min(int(round(config.truncation * ids.size)), ids.size // 2))  # top and bottom never overlap
    order = ids[np.argsort(-adjusted[ids], kind="stable")]
    top, bottom = order[:k], (list(order[-k:]) if ids.size >= 2 else [])
    if config.refill_quarantined:
        bottom += list(np.flatnonzero(quarantined))
    actions = []
    for dst in bottom:
        if top.size >= 2 and rng.random() < config.breed_rate:
            a, b = rng.choice(top, size=2, replace=False)
            actions.append(Action("breed", int(dst), (int(a), int(b))))
        else:
            actions.append(Action("exploit", int(dst), (int(rng.choice(top)),)))
    return actions
