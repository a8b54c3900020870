"""ipywidgets + bokeh panels for adaptive-kit notebooks (the UI side; the core stays headless)."""
from .common import (
           LivePlot,
           Panel,
           control_row,
           display_fresh,
           panel_layout,
           refresh_plots,
           setup_notebook,
)
from .federated import FederatedPanel
from .partition import PartitionPanel
from .speculative import SpeculativePanel
from .swarm import SwarmPanel
from .tour import TourPanel

__all__ = ["FederatedPanel", "LivePlot", "Panel", "PartitionPanel", "SpeculativePanel", "SwarmPanel", "TourPanel", "control_row",
           "display_fresh", "panel_layout", "refresh_plots", "setup_notebook"]
