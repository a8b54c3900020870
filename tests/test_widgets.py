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
    panel.policy.value = "meso"
    panel.fault.value = "dead_relu"
    panel.fault_step.value = 20
    panel.run_button.click()
    run = panel.result
    assert run.spec.fault.kind == "dead_relu" and run.spec.fault.step == 20
    assert panel.plots["act"].source.data["step"] == list(range(40))
    assert any(a.detector == "dead_relu" and a.layer == "1" for a in run.suite.alarms)
    assert "dead_relu" in panel.alarm_box.value
    assert len(panel.bytes_plot.source.data["bytes"]) == 40
    assert set(panel.level_map.levels_at(5).values()) == {"meso"}  # a static level, every layer
    assert "act 1" in panel.level_map.alarms.data["row"]
    # a different statistic redraws the same run: the dead ReLU's zero fraction is 1 after the fault
    panel.stat.value = "zero_frac"
    zeros = panel.plots["act"].source.data["1"]
    assert zeros[-1] == 1.0 and zeros[0] < 0.9


def test_telemetry_panel_macro_level_shows_only_the_pooled_line():
    from widgets.telemetry import TelemetryPanel

    panel = TelemetryPanel("mlp", steps=20)
    panel.policy.value = "macro"
    assert panel.look_every.disabled  # the look period is the rule policy's
    panel.run_button.click()
    data = panel.plots["grad"].source.data
    assert all(math.isfinite(v) for v in data["*"])
    assert all(math.isnan(v) for v in data["0"])  # macro cannot show a layer
    assert {lv for s in range(20) for lv in panel.level_map.levels_at(s).values()} == {"macro"}


def test_telemetry_panel_rule_policy_looks_every_few_steps_and_finds_a_quiet_fault():
    from widgets.telemetry import TelemetryPanel

    panel = TelemetryPanel("mlp", steps=60)
    assert panel.policy.value == "rule" and not panel.look_every.disabled
    panel.look_every.value = 4
    panel.fault.value = "layer_grad_vanish"
    panel.fault_layer.value = "2"
    panel.fault_step.value = 30
    panel.run_button.click()
    rows = panel.level_map.rows
    assert rows[-1] == "loss" and {"grad 2", "weight 0", "act 3"} <= set(rows)
    assert panel.level_map.fault_line.visible and panel.level_map.fault_line.location == 30
    before = [set(panel.level_map.levels_at(s).values()) for s in range(30)]
    looks = [s for s, lv in enumerate(before) if lv == {"meso"}]
    assert looks[:2] == [0, 4] and len(looks) <= 10  # a meso look every 4 steps, macro between
    assert all(lv <= {"macro", "meso"} for lv in before) and sum(lv == {"macro"} for lv in before) >= 18
    found = [a for a in panel.result.suite.alarms if a.step >= 30 and a.kind == "grad" and a.layer == "2"]
    assert found, panel.result.suite.alarms  # the quiet fault, found in its layer
    assert "grad 2" in panel.level_map.alarms.data["row"]
    assert "first alarm after the fault: vanishing_grad on grad 2" in panel.summary()
    # macro data shows only the pooled line; the looks show every layer, as dots between gaps
    grads = panel.plots["grad"].source.data
    seen = [s for s, v in zip(grads["step"], grads["2"]) if math.isfinite(v)]
    assert 0 in seen and 4 in seen and 1 not in seen


def test_telemetry_panel_offers_every_fault_and_the_layers_it_can_break():
    from torch import nn

    from adaptive_kit.telemetry import FAULT_KINDS
    from adaptive_kit.telemetry.episodes import Workload
    from adaptive_kit.telemetry.faults import QUIET_KINDS
    from widgets.telemetry import TelemetryPanel

    wide = Workload("wide", lambda: nn.Sequential(nn.Linear(64, 96), nn.ReLU(), nn.Linear(96, 10)))
    panel = TelemetryPanel(wide, steps=20)
    kinds = [v for _, v in panel.fault.options]
    assert kinds == ["none", *FAULT_KINDS]
    assert all(label.endswith("(quiet)") == (v in QUIET_KINDS) for label, v in panel.fault.options[1:])
    assert [v for _, v in panel.policy.options] == ["macro", "meso", "micro", "raw", "rule"]
    assert panel.fault_layer.disabled  # "none" breaks no layer
    panel.fault.value = "dead_units"
    assert list(panel.fault_layer.options) == ["(default)", "0", "2"] and not panel.fault_layer.disabled
    panel.fault_layer.value = "2"
    panel.fault.value = "lr_ramp"  # the optimiser's, not a layer's
    assert panel.fault_layer.disabled and panel.fault_layer.value == "(default)"
    assert panel.spec().fault.layer is None and panel.spec().workload is wide
    assert panel.level_map.rows == ["grad 0", "grad 2", "weight 0", "weight 2", "act 0", "act 1", "act 2", "loss"]


def test_cost_ladder_figure_puts_time_and_bytes_side_by_side():
    import pandas as pd
    from bokeh.models import LogAxis

    from widgets.telemetry import cost_ladder_figure

    ladder = pd.DataFrame({"x_step": [1.0, 1.1, 1.2, 1.3, 1.4], "bytes_per_step": [0, 1e3, 2e3, 1e4, 1e5]},
                          index=["off", "macro", "meso", "micro", "raw"])
    fig = cost_ladder_figure(ladder)
    assert [f[0] for f in fig.x_range.factors] == [lv for lv in ladder.index for _ in range(2)]
    assert any(isinstance(a, LogAxis) for a in fig.right)
    tops = [r.data_source.data["top"] for r in fig.renderers if "top" in r.data_source.data]  # bars, not the key
    assert list(tops[0]) == list(ladder["x_step"]) and max(tops[1]) == 1e5


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
