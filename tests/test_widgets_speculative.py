"""The speculative-training panel, driven headless through its widget attributes."""
import math

import numpy as np
import pytest
import traitlets

from adaptive_kit import speculative as sp
from widgets import SpeculativePanel
from widgets.speculative import (
    LiveHeatmap,
    loss_vs_bytes,
    reconciliation_bars,
    region_heatmap,
    time_to_target_bars,
)

K, STEPS = 3, 30


@pytest.fixture(scope="module")
def panel() -> SpeculativePanel:
    panel = SpeculativePanel(workers=8, steps=100)
    panel.workers.value = K
    panel.steps.value = STEPS
    panel.reconcile.value = 0.2
    panel.hurt.value = 2.5
    panel.period.value = 4
    panel.run_button.click()
    return panel


def finite(values) -> list[float]:
    return [v for v in values if not math.isnan(v)]


def test_run_trains_ours_and_both_anchors_with_the_controls(panel):
    assert list(panel.results) == ["ours", "DDP", "local SGD"] and panel.runs == 1
    assert panel.task.workers == K
    for r in panel.results.values():
        assert r.workers == K and len(r.history) == STEPS
    ours = panel.configs()["ours"]
    assert ours.reconcile_threshold == 0.2 and ours.period == 4 and ours.manager.hurt == 2.5
    assert panel.configs()["local SGD"].period == 4
    assert not panel.run_button.disabled and "DDP" in panel.status.value


def test_heatmap_has_one_cell_per_region_and_step_in_unit_range(panel):
    ours = panel.results["ours"]
    data = panel.heatmap.source.data
    regions = ours.regions
    assert panel.heatmap.regions == regions
    assert len(data["p"]) == len(regions) * STEPS
    assert all(0.0 <= v <= 1.0 for v in data["p"])
    assert sorted(set(data["step"])) == list(range(STEPS))
    assert set(data["state"]) <= {sp.FULL, sp.HYBRID, sp.GLOBAL}
    # streamed live, cell for cell what the run recorded
    np.testing.assert_allclose(np.asarray(data["p"]).reshape(STEPS, len(regions)), ours.p)
    assert data["region"][: len(regions)] == regions


def test_loss_curves_of_all_three_methods_and_rollback_markers(panel):
    data = panel.loss_plot.source.data
    assert data["step"] == list(range(STEPS))
    for name, r in panel.results.items():
        assert finite(data[name]) == pytest.approx(r.history["loss"].tolist(), rel=1e-6)
        evals = r.evals["test_loss"].tolist()
        assert finite(panel.test_plot.source.data[name]) == pytest.approx(evals, rel=1e-6)
    h = panel.results["ours"].history
    assert panel.rollback_source.data["step"] == h.loc[h["rollbacks"] > 0, "step"].tolist()


def test_bytes_view_matches_the_runs(panel):
    data = panel.bytes_source.data
    assert data["method"] == ["ours", "DDP", "local SGD"]
    for i, r in enumerate(panel.results.values()):
        sent = r.bytes_per_worker()
        assert data["payload"][i] == pytest.approx(sent["payload"] / 1e6)
        assert data["control"][i] == pytest.approx(sent["control"] / 1e6)
    assert panel.bytes_ratio() == pytest.approx(
        panel.results["ours"].bytes_per_worker()["total"] / panel.results["DDP"].bytes_per_worker()["total"])


def test_network_profile_replans_ours_and_reprices_the_anchors(panel):
    results, runs = dict(panel.results), panel.runs
    panel.network.value = "lan"
    lan = list(panel.time_source.data["seconds"])
    lan_ours = panel.results["ours"]
    assert panel.configs()["ours"].network == "lan" and panel.runs == runs + 1
    panel.network.value = "wan"
    wan = list(panel.time_source.data["seconds"])
    assert panel.runs == runs + 2 and panel.configs()["ours"].network == "wan"
    # the anchors do not depend on the network: re-priced, not retrained
    assert all(panel.results[k] is r for k, r in results.items() if k != "ours")
    assert all(b > a for a, b in zip(lan[1:], wan[1:])), (lan, wan)  # every run sends something
    # the regions react: planned for LAN, a layer may take the global gradient every step; for WAN never
    assert (panel.results["ours"].p > 0).all() and lan_ours.p.shape == panel.results["ours"].p.shape
    assert np.array_equal(np.asarray(panel.heatmap.source.data["p"]).reshape(panel.results["ours"].p.shape),
                          panel.results["ours"].p)
    assert "wan" in panel.time_fig.title.text and "simulated s (wan)" in panel.table.value
    timed = sp.with_shared_compute(panel.results)
    assert wan == pytest.approx([r.simulated_time("wan")[-1] for r in timed.values()])
    table = panel.summary("datacentre")
    assert table.loc["DDP", "bytes vs DDP"] == 1.0
    assert table.loc["DDP", "s to target"] <= table.loc["DDP", "simulated s (datacentre)"]


def test_priced_runs_share_one_compute_time(panel):
    timed = sp.with_shared_compute(panel.results)
    assert len({r.compute_s for r in timed.values()}) == 1
    assert next(iter(timed.values())).compute_s == min(r.compute_s for r in panel.results.values())
    assert all(timed[k].history is r.history for k, r in panel.results.items())  # no copies, no retraining


def test_same_controls_same_run():
    a = SpeculativePanel(workers=2, steps=10)
    a.run()
    b = SpeculativePanel(workers=2, steps=10)
    b.run_button.click()
    for name in a.results:
        assert a.results[name].history["loss"].tolist() == b.results[name].history["loss"].tolist()
    assert a.heatmap.source.data["p"] == b.heatmap.source.data["p"]


def test_widgets_clamp_out_of_range_values():
    panel = SpeculativePanel(workers=4, steps=20)
    panel.workers.value = 0
    assert panel.workers.value == 2  # K >= 2: one worker has nobody to synchronise with
    panel.workers.value = 10_000
    assert panel.workers.value == panel.workers.max
    panel.alpha.value = 0.0
    assert panel.alpha.value == pytest.approx(0.01)
    panel.alpha.value = 1e9
    assert panel.alpha.value == pytest.approx(100.0)
    for slider in (panel.reconcile, panel.hurt, panel.loosen):
        slider.value = -3.0
        assert slider.value == slider.min
        slider.value = 70.0
        assert slider.value == slider.max
    panel.steps.value = 1
    assert panel.steps.value == 10
    panel.period.value = 0
    assert panel.period.value == 1
    ours = panel.configs()["ours"]  # whatever the sliders hold is a valid configuration
    assert ours.reconcile_threshold == 5.0 and ours.period == 1 and ours.manager.loosen < ours.manager.hurt


def test_widgets_reject_unknown_choices_and_bad_arguments():
    panel = SpeculativePanel(workers=2, steps=10)
    with pytest.raises(traitlets.TraitError):
        panel.network.value = "moon"
    assert panel.network.value == "wan"
    with pytest.raises(ValueError, match="task='cifar'"):
        SpeculativePanel("cifar")
    with pytest.raises(ValueError, match="lr"):
        SpeculativePanel(lr=-1.0)
    with pytest.raises(RuntimeError, match="Run"):
        panel.summary()
    panel.redraw_time()  # nothing to redraw yet: a no-op, not an error
    assert panel.time_source.data["seconds"] == []


def test_live_heatmap_throttles_and_checks_its_input():
    heat = LiveHeatmap(["a", "b"], min_interval_s=3600)  # only the first push draws
    for step in range(20):
        heat.push(step, np.array([0.0, step / 19]))
    assert heat.redraws == 1 and len(heat.source.data["p"]) == 2
    heat.flush()
    assert heat.redraws == 2 and len(heat.source.data["p"]) == 40
    assert heat.source.data["state"][:2] == [sp.GLOBAL, sp.GLOBAL]
    assert heat.source.data["state"][-2:] == [sp.GLOBAL, sp.FULL]
    assert heat.source.data["state"][3] == sp.HYBRID
    with pytest.raises(ValueError, match="3 values for 2 regions"):
        heat.push(20, np.zeros(3))
    heat.clear()
    assert heat.source.data["p"] == []
    with pytest.raises(ValueError, match="min_interval_s"):
        LiveHeatmap(min_interval_s=-1)


def test_static_figures(panel):
    ours = panel.results["ours"]
    fig = region_heatmap(ours.p, ours.regions)
    assert len(fig.renderers[0].data_source.data["p"]) == ours.p.size
    with pytest.raises(ValueError, match="regions"):
        region_heatmap(ours.p, ours.regions[:-1])
    assert len(loss_vs_bytes(panel.results).renderers) == 2 * len(panel.results)
    bars = time_to_target_bars(sp.with_shared_compute(panel.results), target=0.0)  # nobody reaches zero loss
    assert bars.renderers[0].data_source.data["t"] == [] and "never reached" in bars.title.text
    kept, recomputed = ours.tagged_outputs()
    assert kept + recomputed == int(ours.history["tagged"].sum()) * K
    assert recomputed == int(ours.history["recomputes"].sum())
    assert reconciliation_bars(ours).renderers[0].data_source.data["y"] == [kept, recomputed]


def test_a_failed_run_reports_and_leaves_the_panel_usable(monkeypatch):
    import widgets.speculative as ws

    panel = SpeculativePanel(workers=2, steps=10)
    calls, train = [], sp.train

    def failing(task, config, train_config, **kwargs):
        calls.append(kwargs["method"])
        if kwargs["method"] == "DDP":
            raise FloatingPointError("step 3: every worker's grad is non-finite")
        return train(task, config, train_config, **kwargs)

    monkeypatch.setattr(ws.sp, "train", failing)
    with pytest.raises(FloatingPointError):  # run() raises; a click would log it instead
        panel.run()
    assert calls == ["ours", "DDP"]
    assert "DDP failed" in panel.status.value and "non-finite" in panel.status.value
    assert not panel.run_button.disabled and panel.results == {} and panel.runs == 0
    panel.network.value = "lan"  # nothing to re-price: no error
