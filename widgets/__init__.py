"""ipywidgets + bokeh panels for adaptive-kit notebooks (the UI side; the core stays headless)."""
from .common import LivePlot, control_row, panel_layout, setup_notebook
from .federated import FederatedPanel
from .partition import PartitionPanel
from .speculative import SpeculativePanel
from .swarm import SwarmPanel
from .tour import TourPanel

__all__ = ["FederatedPanel", "LivePlot", "PartitionPanel", "SpeculativePanel", "SwarmPanel", "TourPanel", "control_row",
           "panel_layout", "setup_notebook"]
