"""Per-member anomaly detection: against the member's own history and against the population."""
from __future__ import annotations

from dataclasses import dataclass, field

import numpy as np

from ..anomaly import Alarm, SeriesConfig, SeriesMonitor


@dataclass(frozen=True)
class WatchConfig:
    series: SeriesConfig = SeriesConfig()  # own history: spikes and divergence of loss and step time
    population_sigmas: float = 5.0  # population: robust z (median / MAD) above which a member stands out
    min_population: int = 4  # fewer active members: no population rule

    def __post_init__(self) -> None:
        if not self.population_sigmas > 0:
            raise ValueError(f"WatchConfig.population_sigmas must be > 0, got {self.population_sigmas!r}")
        if isinstance(self.min_population, bool) or not isinstance(self.min_population, int) or self.min_population < 2:
            raise ValueError(f"WatchConfig.min_population must be an int >= 2, got {self.min_population!r}")


@dataclass
class MemberAlarm:
    round: int
    member: int
    scope: str  # "own" (the member's history) or "population"
    alarm: Alarm


@dataclass
class Watch:
    """Feeds each member's per-step losses and per-round step time to its own monitors, and
    compares each round's mean loss across members with a robust z-score (step times are not
    compared across members: a bigger network is slower without being anomalous)."""

    config: WatchConfig = WatchConfig()
    monitors: dict[tuple[int, str], SeriesMonitor] = field(default_factory=dict)

    def reset(self, member: int) -> None:
        """Forget a member's history (its weights were replaced)."""
        for key in [k for k in self.monitors if k[0] == member]:
            del self.monitors[key]

    def _own(self, member: int, name: str, step: int, value: float) -> list[Alarm]:
        key = (member, name)
        if key not in self.monitors:
            self.monitors[key] = SeriesMonitor(name, self.config.series)
        return [a for a in self.monitors[key].update(step, value) if a.detector != "plateau"]

    def update(self, rnd: int, members: np.ndarray, first_step: np.ndarray, losses: np.ndarray,
               step_time: np.ndarray, loss_mean: np.ndarray) -> list[MemberAlarm]:
        """One round. ``losses`` is (M, T) with NaN padding past each member's steps; non-finite
        losses inside a member's steps are reported by the engine (quarantine), not here."""
        out: list[MemberAlarm] = []
        for i, m in enumerate(members.tolist()):
            row = losses[i]
            for t in np.flatnonzero(np.isfinite(row)).tolist():
                out += [MemberAlarm(rnd, m, "own", a) for a in self._own(m, "loss", int(first_step[i]) + t, float(row[t]))]
            if np.isfinite(step_time[i]):
                out += [MemberAlarm(rnd, m, "own", a) for a in self._own(m, "step_time", rnd, float(step_time[i]))
                        if a.detector == "spike"]
        out += self._population(rnd, members, np.log(np.maximum(loss_mean, 1e-12)), "loss")
        return out

    def _population(self, rnd: int, members: np.ndarray, x: np.ndarray, name: str) -> list[MemberAlarm]:
        ok = np.isfinite(x)
        if ok.sum() < self.config.min_population:
            return []
        med = np.median(x[ok])
        mad = 1.4826 * np.median(np.abs(x[ok] - med))
        scale = max(mad, 0.1)  # in log units: a loss within ~10 % of the median is never an outlier
        z = (x - med) / scale
        out = []
        for i in np.flatnonzero(ok & (z > self.config.population_sigmas)).tolist():
            ev = (f"mean {name} {np.exp(x[i]):.4g} is {z[i]:.1f} robust sigmas (in log {name}) above the "
                  f"population median {np.exp(med):.4g}")
            out.append(MemberAlarm(rnd, int(members[i]), "population",
                                   Alarm(rnd, "outlier", name, "", "scalar", ev, float(z[i]))))
        return out
