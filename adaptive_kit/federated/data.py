"""Data for federated ordinal regression: statsmodels' bundled ``fair``, ``randhie`` and
``anes96`` with ordinal targets, and seeded regime mixtures with controllable heterogeneity and
drift. Nothing is downloaded: the three tables ship inside statsmodels.
"""
from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass

import numpy as np
import torch

from ..datasets import gaussian_mixture, statsmodels_frame


@dataclass(frozen=True)
class OrdinalData:
    name: str
    x: torch.Tensor  # (n, d) float32, standardised
    y: torch.Tensor  # (n,) int64 in 0..J-1
    features: list[str]
    levels: list[str]  # what each class means

    @property
    def classes(self) -> int:
        return len(self.levels)


def _standardise(x: np.ndarray) -> torch.Tensor:
    return torch.tensor((x - x.mean(0)) / x.std(0).clip(min=1e-12), dtype=torch.float32)


def fair() -> OrdinalData:
    """6,366 women's self-rated marriage quality (1 very poor .. 5 very good) from age, years
    married, children, religiousness, education, both occupations and log(1 + time in affairs)."""
    d = statsmodels_frame("fair")
    d["affairs"] = np.log1p(d["affairs"])
    features = ["age", "yrs_married", "children", "religious", "educ", "occupation", "occupation_husb", "affairs"]
    y = d["rate_marriage"].astype(int).to_numpy() - 1
    return OrdinalData("fair", _standardise(d[features].to_numpy(float)), torch.tensor(y),
                       features, ["very poor", "poor", "fair", "good", "very good"])


RANDHIE_BINS = (0, 1, 3, 6)  # outpatient visits: 0 | 1-2 | 3-5 | 6+


def randhie() -> OrdinalData:
    """20,190 RAND health-insurance experiment person-years: outpatient visits binned to 0, 1-2,
    3-5, 6+ from coinsurance, deductible, income, physical limitation, chronic disease and health."""
    d = statsmodels_frame("randhie")
    features = ["lncoins", "idp", "lpi", "fmde", "physlm", "disea", "hlthg", "hlthf", "hlthp"]
    y = np.searchsorted(np.asarray(RANDHIE_BINS[1:]), d["mdvis"].to_numpy(), side="right")
    return OrdinalData("randhie", _standardise(d[features].to_numpy(float)), torch.tensor(y),
                       features, ["0", "1-2", "3-5", "6+"])


def anes96() -> OrdinalData:
    """944 respondents of the 1996 American National Election Study: party identification on a
    7-point scale (strong Democrat .. strong Republican) from left-right self-placement, the
    placements of Clinton and Dole, TV news days, age, education, income and log population."""
    d = statsmodels_frame("anes96")
    features = ["selfLR", "ClinLR", "DoleLR", "TVnews", "age", "educ", "income", "logpopul"]
    y = d["PID"].astype(int).to_numpy()
    return OrdinalData("anes96", _standardise(d[features].to_numpy(float)), torch.tensor(y), features,
                       ["strong Dem", "weak Dem", "lean Dem", "independent", "lean Rep", "weak Rep", "strong Rep"])


MIXTURE_WEIGHTS = (0.4, 0.3, 0.2, 0.1)


def mixture(n: int = 8000, features: int = 4, regimes: int = 4, classes: int = 2, separation: float = 4.0,
            noise: float = 0.3, regime_weights: Sequence[float] | None = MIXTURE_WEIGHTS,
            seed: int = 0) -> tuple[OrdinalData, torch.Tensor]:
    """A mixture of regimes of unequal size, each with its own ordinal rule, and each row's regime.
    ``separation`` (between regime centres) and the regimes' own rules set the heterogeneity."""
    x, y, regime = gaussian_mixture(n, features, regimes, separation, classes, seed, regime_weights, noise)
    return OrdinalData("mixture", x, y, [f"x{i}" for i in range(features)], [str(j) for j in range(classes)]), regime


@dataclass(frozen=True)
class Stream:
    """Batches of a drifting mixture: ``x[b]``, ``y[b]``, ``regime[b]`` for batch b; the regime
    shares change at each batch in ``changes``."""

    x: torch.Tensor  # (batches, batch, d)
    y: torch.Tensor  # (batches, batch)
    regime: torch.Tensor
    changes: list[int]


def drifting_stream(batches: int = 60, batch: int = 200, changes: Sequence[int] = (30,),
                    shares: Sequence[Sequence[float]] = (MIXTURE_WEIGHTS, (0.1, 0.1, 0.2, 0.6)),
                    features: int = 4, classes: int = 2, separation: float = 4.0, noise: float = 0.3,
                    new_regimes: bool = True, seed: int = 0) -> Stream:
    """A stream whose regime shares switch from ``shares[i]`` to ``shares[i + 1]`` at ``changes[i]``.
    With ``new_regimes`` each segment also draws new regime centres and rules (seed + segment):
    covariate and concept drift; without, the same regimes come in new shares (the class cuts are
    re-balanced per segment, so labels move a little).

    Raises:
        ValueError: ``changes`` not increasing inside (0, batches), or not one fewer than ``shares``.
    """
    changes = list(changes)
    if len(shares) != len(changes) + 1:
        raise ValueError(f"shares needs len(changes) + 1 = {len(changes) + 1} entries, got {len(shares)}")
    if any(not 0 < c < batches for c in changes) or changes != sorted(set(changes)):
        raise ValueError(f"changes must be increasing batch numbers in (0, {batches}), got {changes!r}")
    bounds = [0, *changes, batches]
    xs, ys, rs = [], [], []
    for i, share in enumerate(shares):
        rows = (bounds[i + 1] - bounds[i]) * batch
        x, y, r = gaussian_mixture(rows, features, len(share), separation, classes,
                                   seed + i * new_regimes, share, noise)
        xs.append(x), ys.append(y), rs.append(r)
    x, y, r = torch.cat(xs), torch.cat(ys), torch.cat(rs)
    d = x.shape[1]
    return Stream(x.view(batches, batch, d), y.view(batches, batch), r.view(batches, batch), changes)
