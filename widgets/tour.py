"""The tour's panel: train a small classifier with controls and a live loss plot."""
from __future__ import annotations

from collections.abc import Callable

import ipywidgets as w
from torch import nn

import adaptive_kit as ak
from adaptive_kit.datasets import Split
from adaptive_kit.training import TrainConfig, TrainResult, train_classifier

from .common import LivePlot, Panel, panel_layout
from .plots import set_title


class TourPanel(Panel):
    """Learning rate, batch size and steps controls, a Train button and a live loss plot.

    ``make_model`` builds a fresh model for every run, seeded by ``seed``; the last run's
    model and :class:`~adaptive_kit.training.TrainResult` stay in :attr:`model` and
    :attr:`result`. Drive it headless: set ``panel.lr.value`` and call ``panel.train.click()``.
    """

    def __init__(self, data: Split, make_model: Callable[[], nn.Module], *, steps: int = 300,
                 seed: int = 0, device: str | None = None) -> None:
        self.data = data
        self.make_model = make_model
        self.seed = seed
        self.device = ak.pick_device(device)
        wide = {"description_width": "initial"}  # the whole description, never "learning r…"
        self.lr = w.FloatLogSlider(value=0.1, base=10, min=-3, max=0, step=0.1,
                                   description="learning rate", continuous_update=False, style=wide)
        self.batch_size = w.Dropdown(options=[16, 32, 64, 128, 256], value=64, description="batch size", style=wide,
                                     layout=w.Layout(width="170px"))
        self.steps = w.IntSlider(value=steps, min=10, max=max(2000, steps), step=10,
                                 description="steps", continuous_update=False, style=wide)
        self.train = w.Button(description="Train", button_style="primary", icon="play")
        self.status = w.HTML("")
        self.out = w.Output()
        self.plot = LivePlot(["loss"], title="training loss", y_label="cross-entropy (log)", y_log=True)
        self.model: nn.Module | None = None
        self.result: TrainResult | None = None
        self.runs = 0
        self.train.on_click(lambda _: self.run())
        self.widget = panel_layout("Tour: a small classifier, live",
                                   [self.lr, self.batch_size, self.steps, self.train, self.status],
                                   [self.plot.widget], self.out)

    def run(self) -> TrainResult:
        """Train a fresh model with the current control values, streaming its loss to the plot."""
        config = TrainConfig(lr=self.lr.value, batch_size=int(self.batch_size.value),
                             steps=int(self.steps.value), seed=self.seed)
        ak.seed_everything(self.seed)
        self.model = self.make_model().to(self.device)
        self.plot.clear()
        self.train.disabled = True
        run = self.runs + 1
        what = f"run {run}: lr={config.lr:.3g}, batch {config.batch_size}, {config.steps} steps"
        set_title(self.plot.figure, f"training loss, {what}")
        self.status.value = f"training {what}…"
        try:
            self.result = train_classifier(
                self.model, self.data, config,
                on_step=lambda step, loss, _model: self.plot.push(step, loss=loss),
            )
        finally:
            self.plot.flush()
            self.train.disabled = False
        self.runs += 1
        # the text under the plot describes the run the plot shows, never an earlier one
        self.status.value = f"{what}: test accuracy <b>{self.result.test_accuracy:.1%}</b>"
        self.out.clear_output()
        with self.out:
            print(f"run {self.runs}: lr={config.lr:.3g} batch={config.batch_size} "
                  f"steps={config.steps} final loss={self.result.losses[-1]:.3f} "
                  f"test accuracy={self.result.test_accuracy:.3f}")
        return self.result

