"""Federated meta-learning over adaptively partitioned data (issue 6, in progress).

So far: binary and ordinal (proportional-odds) logistic regression in torch,
:mod:`adaptive_kit.federated.ordinal`, matching statsmodels' ``OrderedModel``.
"""
from . import ordinal

__all__ = ["ordinal"]
