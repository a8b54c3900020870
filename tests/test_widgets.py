"""Panels driven headless through their widget attributes."""
import json
import math

import pytest
import torch

import adaptive_kit as ak
from widgets import LivePlot, TourPanel, panel_layout


def test_liveplot_throttles_and_flushes_everything():
    plot = LivePlot(["loss", "acc"], min_interval_s=3600)  # only the first push draws
    for step in range(50):
        plot.push(step, loss=torch.tensor(1.0 / (step + 1)), acc=step / 50)
    assert plot.redraws == 1 and len(plot.source.data["step"]) == 1
    plot.flush()
    assert plot.redraws == 2
    assert plot.source.data["step"] == list(range(50))
    assert plot.source.data["loss"][9] == pytest.approx(0.1)
    assert plot.source.data["acc"][-1] == pytest.approx(49 / 50)


def test_liveplot_rollover_and_missing_series():
    plot = LivePlot(["a", "b"], rollover=10, min_interval_s=0)
    for i in range(25):
        plot.push(i, a=i)
    assert plot.source.data["step"] == list(range(15, 25))
    assert all(math.isnan(v) for v in plot.source.data["b"])
    plot.clear()
    assert plot.source.data["step"] == []


@pytest.mark.parametrize("kwargs, match", [
    ({"series": []}, "series"),
    ({"series": ["a", "a"]}, "series"),
    ({"series": ["step"]}, "x_name='step'"),
    ({"series": ["a"], "rollover": 0}, "rollover=0"),
    ({"series": ["a"], "min_interval_s": -1}, "min_interval_s=-1"),
])
def test_liveplot_rejects_bad_configuration(kwargs, match):
    with pytest.raises(ValueError, match=match):
        LivePlot(**kwargs)


def test_liveplot_rejects_unknown_series():
    with pytest.raises(ValueError, match="unknown series"):
        LivePlot(["loss"]).push(0, los=1.0)


def test_panel_layout_puts_title_controls_plots_output():
    plot = LivePlot(["x"])
    import ipywidgets as w
    out = w.Output()
    box = panel_layout("Title", [w.Button()], [plot.widget], out)
    assert "Title" in box.children[0].value
    assert box.children[2] is plot.widget and box.children[-1] is out


def test_tour_panel_trains_and_streams_its_loss():
    data = ak.datasets.digits()
    panel = TourPanel(data, lambda: ak.training.mlp([64, 32, 10]), steps=60)
    panel.lr.value = 0.1
    panel.batch_size.value = 32
    panel.train.click()
    result = panel.result
    assert panel.runs == 1 and result.steps_run == 60
    assert panel.plot.source.data["step"] == list(range(60))
    assert panel.plot.source.data["loss"] == pytest.approx(result.losses.tolist(), rel=1e-6)
    assert result.test_accuracy > 0.7
    assert "test accuracy" in panel.status.value and not panel.train.disabled
    # same controls, same seed: the same run again
    panel.train.click()
    assert panel.runs == 2
    assert panel.plot.source.data["loss"] == pytest.approx(result.losses.tolist(), rel=1e-6)


def test_telemetry_panel_runs_a_fault_and_redraws_on_a_new_statistic():
    from widgets.telemetry import TelemetryPanel

    panel = TelemetryPanel("mlp", steps=40)
    panel.fault.value = "dead_relu"
    panel.fault_step.value = 20
    panel.run_button.click()
    run = panel.result
    assert run.spec.fault.kind == "dead_relu" and run.spec.fault.step == 20
    assert panel.plots["act"].source.data["step"] == list(range(40))
    assert any(a.detector == "dead_relu" and a.layer == "1" for a in run.suite.alarms)
    assert "dead_relu" in panel.alarm_box.value
    assert len(panel.bytes_plot.source.data["bytes"]) == 40
    # a different statistic redraws the same run: the dead ReLU's zero fraction is 1 after the fault
    panel.stat.value = "zero_frac"
    zeros = panel.plots["act"].source.data["1"]
    assert zeros[-1] == 1.0 and zeros[0] < 0.9


def test_telemetry_panel_macro_level_shows_only_the_pooled_line():
    import math

    from widgets.telemetry import TelemetryPanel

    panel = TelemetryPanel("mlp", steps=20)
    for dd in panel.levels.values():
        dd.value = "macro"
    panel.run_button.click()
    data = panel.plots["grad"].source.data
    assert all(math.isfinite(v) for v in data["*"])
    assert all(math.isnan(v) for v in data["0"])  # macro cannot show a layer


def test_a_panel_shows_its_plots_as_they_are_when_displayed(monkeypatch):
    """jupyter_bokeh sends changes only to existing views: what a panel draws before it is displayed
    must still reach the page, so display re-sends every plot under the panel whole."""
    import ipywidgets as w
    from bokeh.plotting import figure
    from jupyter_bokeh.widgets import BokehModel

    from widgets import Panel, refresh_plots

    fig = figure(title="before")
    inner = BokehModel(fig)
    fig.title.text = "after"  # drawn before display: no view exists to receive the patch
    assert "after" not in json.dumps(inner.render_bundle) and "before" in json.dumps(inner.render_bundle)

    panel = Panel()
    panel.widget = w.VBox([w.HTML("x"), w.Tab(children=[w.VBox([inner])])])
    shown = []
    monkeypatch.setattr("IPython.display.display", shown.append)
    panel._ipython_display_()
    assert shown == [panel.widget] and "after" in json.dumps(inner.render_bundle)
    assert refresh_plots(w.HBox([inner, BokehModel(figure())])) == 2
