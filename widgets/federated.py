"""The federated meta-learning panel: three tabs over one data set — the adaptive partition against
k-means as the granularity moves, each client's error under FedAvg and a meta-learner after a few
adaptation steps, and a drifting stream whose alarms rebuild the partition."""
from __future__ import annotations

import html
from dataclasses import replace
from typing import Any

import ipywidgets as w
import pandas as pd
import torch

from adaptive_kit import federated as fed
from adaptive_kit.federated import DataPartition, data, drift

from .common import Panel, panel_layout
from .federated_plots import (  # noqa: F401 (the panel module's figures, importable from here too)
    BASELINE,
    CHOICES,
    DETECTORS,
    NAMES,
    STEPS,
    alarms_figure,
    method_mae_figure,
    part_colors,
    per_client_mae_figure,
)
from .federated_views import DriftTab, PartitionTab, PersonalisationTab


class FederatedPanel(Panel):
    """Partition, personalise, follow a drifting stream: three tabs over one data set
    (:class:`PartitionTab`, :class:`PersonalisationTab`, :class:`DriftTab`, as ``partition_tab``,
    ``personal_tab`` and ``drift_tab``).

    Drive it headless: set the widgets' ``value``, call :meth:`train` / :meth:`run_stream` (or
    ``click()`` the buttons); sources and results are attributes of the tabs.
    """

    def __init__(self, dataset: data.OrdinalData | None = None, stream: data.Stream | None = None, *,
                 granularity: float = 0.5, min_size: int = 50, max_parts: int = 16, method: str = "metacurv",
                 rounds: int = 20, config: fed.FederatedConfig | None = None, warmup: int = 5, refit_batches: int = 5,
                 max_points: int = 4000, seed: int = 0, min_interval_s: float = 0.25) -> None:
        self.data = dataset if dataset is not None else data.mixture(n=2000, seed=seed)[0]
        self.stream = stream if stream is not None else data.drifting_stream(batches=30, batch=100, changes=(15,), seed=seed)
        n, d = self.data.x.shape
        if not 0 <= granularity <= 1:
            raise ValueError(f"FederatedPanel(granularity={granularity!r}): expected 0 <= granularity <= 1")
        if isinstance(min_size, bool) or not isinstance(min_size, int) or not 1 <= min_size <= n:
            raise ValueError(f"FederatedPanel(min_size={min_size!r}): expected an int in [1, {n}] (the rows)")
        if method not in CHOICES:
            raise ValueError(f"FederatedPanel(method={method!r}): expected one of {CHOICES}")
        if isinstance(rounds, bool) or not isinstance(rounds, int) or rounds < 1:
            raise ValueError(f"FederatedPanel(rounds={rounds!r}): expected an int >= 1")
        if max_points < 1:
            raise ValueError(f"FederatedPanel(max_points={max_points!r}): must be >= 1")
        if not 1 <= warmup < len(self.stream.x):
            raise ValueError(f"FederatedPanel(warmup={warmup!r}): expected 1 <= warmup < {len(self.stream.x)} (the batches)")
        self.out = w.Output()
        self.status = w.HTML(f"<b>{html.escape(self.data.name)}</b>: {n:,} rows, {d} features, "
                             f"{self.data.classes} ordinal classes · stream: {len(self.stream.x)} batches of "
                             f"{self.stream.x.shape[1]} rows, change at batch "
                             f"{', '.join(map(str, self.stream.changes)) or 'none'}")
        # the rows drawn: all, or a seeded sample of max_points
        g = torch.Generator().manual_seed(seed)
        shown = torch.randperm(n, generator=g)[:max_points].sort().values if n > max_points else torch.arange(n)
        self.partition_tab = PartitionTab(self.data, shown, granularity, min_size, max_parts, seed, self.status)
        self.personal_tab = PersonalisationTab(self.data, self.partition_tab, replace(config or fed.FederatedConfig(),
                                               seed=seed), seed, self.out, method, rounds, min_interval_s)
        self.drift_tab = DriftTab(self.data, self.stream, self.partition_tab, warmup, refit_batches, seed, self.out)
        self.tabs = w.Tab(children=[self.partition_tab.view, self.personal_tab.view, self.drift_tab.view],
                          titles=("Partition", "Personalisation", "Drift"))
        self.widget = panel_layout("Federated meta-learning", [self.status], [self.tabs], self.out)
        self.partition_tab.repartition()

    @property
    def partition(self) -> DataPartition:
        """The partition the Partition tab shows (and Train and Run stream use)."""
        return self.partition_tab.partition

    def train(self) -> dict[str, Any]:
        """What **Train** does: :meth:`PersonalisationTab.train`."""
        return self.personal_tab.train()

    def summary(self) -> pd.DataFrame:
        """:meth:`PersonalisationTab.summary` of the last training."""
        return self.personal_tab.summary()

    def run_stream(self) -> drift.StreamRun:
        """What **Run stream** does: :meth:`DriftTab.run_stream`."""
        return self.drift_tab.run_stream()
