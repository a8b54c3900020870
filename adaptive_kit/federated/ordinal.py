"""Binary and ordinal (proportional-odds, cumulative logit) logistic regression in torch.

One flat parameter vector per model, ``[beta (d), t0, log-increments (J - 2)]``, the
parametrisation of statsmodels' ``OrderedModel``: thresholds t0 < t0 + exp(u1) < ... so any vector
is valid. P(y <= j | x) = sigmoid(threshold_j - x @ beta); binary is the case J = 2
(P(y = 1) = sigmoid(x @ beta - t0)). Functions are pure, so ``torch.func`` can vectorise them over
clients and differentiate through local updates.
"""
from __future__ import annotations

from dataclasses import dataclass

import numpy as np
import torch

from .checks import check_features, check_labels


def check_ordinal(y: torch.Tensor | np.ndarray, name: str = "y") -> int:
    """The number of classes of ordinal labels 0..J-1; raises naming the problem
    (see :func:`~adaptive_kit.federated.checks.check_labels`)."""
    return check_labels(y, name)[1]


def n_params(features: int, classes: int) -> int:
    return features + classes - 1


def init_params(features: int, classes: int, y: torch.Tensor | None = None, dtype=torch.float64) -> torch.Tensor:
    """Zero coefficients and thresholds at the logits of the marginal cumulative shares of ``y``
    (evenly spaced when ``y`` is None)."""
    if y is None:
        cum = torch.arange(1, classes, dtype=dtype) / classes
    else:
        counts = torch.bincount(y.long(), minlength=classes).to(dtype) + 0.5
        cum = (counts.cumsum(0) / counts.sum())[:-1]
    t = torch.logit(cum)
    inc = torch.log(torch.clamp(t[1:] - t[:-1], min=1e-3))
    return torch.cat([torch.zeros(features, dtype=dtype, device=t.device), t[:1], inc])


def thresholds(params: torch.Tensor, classes: int) -> torch.Tensor:
    raw = params[..., -(classes - 1):]
    return torch.cat([raw[..., :1], torch.exp(raw[..., 1:])], dim=-1).cumsum(-1)


def class_probs(params: torch.Tensor, x: torch.Tensor, classes: int) -> torch.Tensor:
    """(n, J) class probabilities."""
    beta = params[: x.shape[-1]]
    cum = torch.sigmoid(thresholds(params, classes) - (x @ beta)[:, None])  # (n, J - 1)
    ones = torch.ones_like(cum[:, :1])
    return torch.diff(torch.cat([torch.zeros_like(ones), cum, ones], dim=1), dim=1)


def nll(params: torch.Tensor, x: torch.Tensor, y: torch.Tensor, classes: int,
        weight: torch.Tensor | None = None) -> torch.Tensor:
    """Mean negative log-likelihood (weighted by ``weight``, e.g. a 0/1 mask for padded rows)."""
    beta = params[: x.shape[-1]]
    t = thresholds(params, classes)
    eta = x @ beta
    inf = torch.full_like(eta[:, None], torch.inf)
    bounds = torch.cat([-inf, t.expand(len(eta), -1), inf], dim=1)
    yl = y.long()[:, None]
    upper = torch.gather(bounds, 1, yl + 1)[:, 0] - eta
    lower = torch.gather(bounds, 1, yl)[:, 0] - eta
    # log(sigmoid(u) - sigmoid(l)) computed stably: log sigmoid(u) + log(1 - exp(log sigmoid(l) - log sigmoid(u)))
    ls_u = torch.nn.functional.logsigmoid(upper)
    ls_l = torch.nn.functional.logsigmoid(lower)
    ll = ls_u + torch.log1p(-torch.exp(torch.clamp(ls_l - ls_u, max=-1e-12)))
    if weight is None:
        return -ll.mean()
    return -(ll * weight).sum() / weight.sum().clamp(min=1e-12)


def predict(params: torch.Tensor, x: torch.Tensor, classes: int, rule: str = "mode") -> torch.Tensor:
    """Class per row: the most probable (``"mode"``, best for accuracy) or the median of the
    predicted distribution (``"median"``, best for absolute error)."""
    if rule == "mode":
        return class_probs(params, x, classes).argmax(dim=-1)
    if rule == "median":  # the first class whose cumulative probability reaches 1/2
        cum = torch.sigmoid(thresholds(params, classes) - (x @ params[: x.shape[-1]])[..., None])
        return (cum < 0.5).sum(-1)
    raise ValueError(f"rule must be 'mode' or 'median', got {rule!r}")


def mae(params: torch.Tensor, x: torch.Tensor, y: torch.Tensor, classes: int) -> float:
    """Mean absolute error of the median prediction."""
    return float((predict(params, x, classes, "median") - y.long()).abs().float().mean())


@dataclass(frozen=True)
class OrdinalFit:
    params: torch.Tensor
    classes: int
    features: int
    nll: float
    iterations: int

    @property
    def coef(self) -> torch.Tensor:
        return self.params[: self.features]

    @property
    def thresholds(self) -> torch.Tensor:
        return thresholds(self.params, self.classes)


def fit(x: torch.Tensor, y: torch.Tensor, classes: int | None = None, *, l2: float = 0.0,
        init: torch.Tensor | None = None, max_iter: int = 200, tol: float = 1e-10) -> OrdinalFit:
    """Maximum-likelihood fit by L-BFGS (float64), the same estimator as ``OrderedModel(distr="logit")``.

    Raises:
        ValueError: NaN features, shape mismatch, or labels that are not 0..J-1 with J >= 2.
    """
    x = check_features(x).to(torch.float64)
    if classes is None:
        y, classes = check_labels(y, rows=len(x))
    else:
        y = torch.as_tensor(y)
        if len(y) != len(x):
            raise ValueError(f"y has {len(y)} rows, x has {len(x)}")
    p = (init.detach().clone().to(torch.float64) if init is not None
         else init_params(x.shape[1], classes, y)).to(x.device).requires_grad_(True)
    opt = torch.optim.LBFGS([p], lr=1, max_iter=max_iter, tolerance_grad=tol, tolerance_change=1e-14,
                            history_size=20, line_search_fn="strong_wolfe")

    def closure():
        opt.zero_grad()
        loss = nll(p, x, y, classes) + l2 * (p[: x.shape[1]] ** 2).sum()
        loss.backward()
        return loss

    opt.step(closure)
    with torch.no_grad():
        final = float(nll(p, x, y, classes))
    return OrdinalFit(p.detach(), classes, x.shape[1], final, opt.state[opt._params[0]]["n_iter"])
