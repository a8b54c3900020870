"""The federated meta-learning panel, driven headless through its widget attributes."""
import math

import pytest
import torch
from jupyter_bokeh.widgets import BokehModel

from adaptive_kit import federated as fed
from adaptive_kit.federated import adaptive_partition, data
from widgets import FederatedPanel
from widgets.federated import BASELINE, DETECTORS, STEPS, method_mae_figure, part_colors

ROWS, MIN_SIZE, ROUNDS = 800, 40, 4
BATCHES, CHANGE, WARMUP = 20, 10, 4


def make_panel(**kwargs) -> FederatedPanel:
    dataset = data.mixture(n=ROWS, seed=0)[0]
    stream = data.drifting_stream(batches=BATCHES, batch=100, changes=(CHANGE,), seed=0)
    kwargs = {"min_size": MIN_SIZE, "rounds": ROUNDS, "warmup": WARMUP, "max_points": 500,
              "min_interval_s": 3600} | kwargs
    return FederatedPanel(dataset, stream, **kwargs)


@pytest.fixture(scope="module")
def panel() -> FederatedPanel:
    return make_panel()


def distinct(values) -> int:
    return len(set(values))


def test_panel_builds_three_views_with_their_plots(panel):
    assert panel.tabs.titles == ("Partition", "Personalisation", "Drift")
    assert list(panel.tabs.children) == [panel.partition_tab.view, panel.personal_tab.view, panel.drift_tab.view]
    for widget in (panel.partition_tab.partition_widget, panel.personal_tab.mae_widget, panel.personal_tab.val_plot.widget, panel.drift_tab.stream_widget,
                   panel.drift_tab.window_widget):
        assert isinstance(widget, BokehModel)
    for fig in (panel.partition_tab.ours_fig, panel.partition_tab.kmeans_fig, panel.partition_tab.sizes_fig, panel.personal_tab.mae_fig, panel.drift_tab.loss_fig,
                panel.drift_tab.parts_fig, panel.drift_tab.window_fig):
        assert fig.renderers
    # the scatters draw the sampled rows, coloured by the partition shown and by k-means
    pts = panel.partition_tab.points_source.data
    assert len(pts["x"]) == 500 and pts["x"] == panel.data.x[panel.partition_tab.shown, 0].tolist()
    assert pts["part"] == panel.partition.labels[panel.partition_tab.shown].tolist()
    assert pts["color"] == part_colors(pts["part"], panel.partition.parts)
    assert sum(panel.partition_tab.sizes_source.data["ours"]) == sum(panel.partition_tab.sizes_source.data["kmeans"]) == ROWS
    assert panel.partition_tab.mean_span.location == pytest.approx(ROWS / panel.partition.parts)
    assert "mixture" in panel.status.value and "800 rows" in panel.status.value


def test_granularity_slider_repartitions_and_recolours():
    panel = make_panel()
    source = panel.partition_tab.points_source
    counts, titles = [], []
    for g in (0.0, 0.3, 0.6, 1.0):
        panel.partition_tab.granularity.value = g
        counts.append(distinct(source.data["part"]))
        titles.append(panel.partition_tab.sizes_fig.title.text)
        assert distinct(source.data["kmeans"]) == panel.partition.parts == panel.partition_tab.parts
        assert len(panel.partition_tab.sizes_source.data["rank"]) == panel.partition.parts
    assert panel.partition_tab.points_source is source  # the same source, new data
    assert counts[0] == 1 and counts == sorted(counts) and len(set(counts)) == 4, counts
    assert len(set(titles)) > 1 and "largest ÷ mean" in titles[-1]
    # the panel's once-computed profile gives the partition the package computes on its own
    fresh = adaptive_partition(panel.data.x, panel.data.y, 1.0, MIN_SIZE, max_parts=panel.partition_tab.max_parts)
    assert torch.equal(panel.partition.labels, fresh.labels)
    # the balance bound holds
    assert max(panel.partition_tab.sizes_source.data["ours"]) <= math.floor(1.1 * ROWS / panel.partition.parts)
    first = panel.partition
    panel.partition_tab.granularity.value = 0.5
    panel.partition_tab.granularity.value = 1.0
    assert panel.partition is first  # cached per parts and minimum size
    panel.partition_tab.min_size.value = 200  # larger parts: at most 800 // 200 of them
    assert panel.partition.parts == 4 and distinct(source.data["part"]) == 4


def test_feature_dropdowns_move_the_points_not_the_colours():
    panel = make_panel()
    colors = list(panel.partition_tab.points_source.data["color"])
    panel.partition_tab.x_feature.value, panel.partition_tab.y_feature.value = 2, 3
    pts = panel.partition_tab.points_source.data
    assert pts["x"] == panel.data.x[panel.partition_tab.shown, 2].tolist() and pts["y"] == panel.data.x[panel.partition_tab.shown, 3].tolist()
    assert pts["color"] == colors and panel.partition_tab.ours_fig.xaxis.axis_label == "x2"


def test_train_fills_finite_mae_bars_for_both_methods(panel):
    with pytest.raises(RuntimeError, match="Train"):
        panel.summary()
    panel.partition_tab.granularity.value = 0.5
    panel.personal_tab.train_button.click()
    assert set(panel.personal_tab.results) == {BASELINE, "metacurv"} and panel.personal_tab.method_trained == "metacurv"
    c = panel.personal_tab.clients
    assert c.n == panel.partition.parts
    bars = panel.personal_tab.mae_source.data
    assert bars["client"] == [str(i) for i in range(c.n)]
    for col in ("alone", *(f"{m}_{s}" for m in (BASELINE, "meta") for s in STEPS)):
        assert len(bars[col]) == c.n and all(math.isfinite(v) and 0 <= v <= 1 for v in bars[col]), col
    # the bars are what fed.evaluate says for each method's model
    ev = fed.evaluate(panel.personal_tab.results["metacurv"].model, c, STEPS, lr=panel.personal_tab.config.local_lr, l2=panel.personal_tab.config.l2)
    assert bars["meta_5"] == pytest.approx(ev[5]["mae"].tolist())
    assert bars["meta"] == bars["meta_1"] and bars[BASELINE] == bars[f"{BASELINE}_1"]  # one step shown
    panel.personal_tab.steps.value = 5
    assert panel.personal_tab.mae_source.data["meta"] == bars["meta_5"] and "after 5 adaptation steps" in panel.personal_tab.mae_fig.title.text
    assert panel.personal_tab.alone_span.visible and panel.personal_tab.alone_span.location == pytest.approx(sum(bars["alone"]) / c.n)
    # a live validation curve per method, one point per round
    live = panel.personal_tab.val_plot.source.data
    assert live["round"] == list(range(ROUNDS)) * 2 and panel.personal_tab.progress.value == 2 * ROUNDS
    assert [h["val_loss"] for h in panel.personal_tab.results[BASELINE].history] == pytest.approx(live[BASELINE][:ROUNDS])
    assert [h["val_loss"] for h in panel.personal_tab.results["metacurv"].history] == pytest.approx(live["meta"][ROUNDS:])
    table = panel.summary()
    assert list(table.index) == ["FedAvg", "Meta-Curvature", "alone"]
    assert "done" in panel.personal_tab.train_status.value and not panel.personal_tab.train_button.disabled


def test_the_method_dropdown_picks_the_meta_learner():
    panel = make_panel(rounds=2)
    panel.personal_tab.method.value = "metasgd"
    panel.train()
    assert set(panel.personal_tab.results) == {BASELINE, "metasgd"}
    assert panel.personal_tab.mae_fig.legend.items[1].label.value == "Meta-SGD"
    assert "Meta-SGD" in panel.personal_tab.val_plot.figure.title.text


def test_a_failed_training_reports_in_the_status(monkeypatch):
    panel = make_panel(rounds=2)

    def failing(*args, **kwargs):
        raise RuntimeError("diverged")

    monkeypatch.setattr(fed, "train", failing)
    with pytest.raises(RuntimeError, match="diverged"):
        panel.train()
    assert "failed" in panel.personal_tab.train_status.value and "diverged" in panel.personal_tab.train_status.value
    assert not panel.personal_tab.train_button.disabled and panel.personal_tab.results == {}


def test_drift_view_draws_losses_alarms_and_scrubs_partitions(panel):
    with pytest.raises(RuntimeError, match="Run stream"):
        panel.drift_tab.in_force(WARMUP)
    panel.drift_tab.run_stream_button.click()
    run = panel.drift_tab.stream_run
    assert run is not None
    loss = panel.drift_tab.loss_source.data
    assert loss["batch"] == list(range(WARMUP, BATCHES))  # one row per batch after warmup
    assert loss["loss"] == pytest.approx(run.log["loss"].tolist())
    alarms = panel.drift_tab.alarm_source.data
    assert set(alarms["detector"]) <= set(DETECTORS)
    assert any(CHANGE <= b <= CHANGE + 2 for b in alarms["batch"]), alarms
    assert len(run.partitions) >= 2 and panel.drift_tab.rebuild_source.data["batch"]  # the partition was rebuilt
    assert [s.location for s in panel.drift_tab.change_spans] == [CHANGE]
    # scrubbing: before the alarm the warmup's partition routes the window, after it a rebuilt one
    rebuilt_at = run.partitions[1][0]
    panel.drift_tab.batch.value = rebuilt_at
    assert panel.drift_tab.in_force(rebuilt_at)[0] == WARMUP and f"made at batch {WARMUP}" in panel.drift_tab.window_fig.title.text
    before = list(panel.drift_tab.window_source.data["color"])
    panel.drift_tab.batch.value = rebuilt_at + 1
    made, part = panel.drift_tab.in_force(rebuilt_at + 1)
    assert made == rebuilt_at and panel.drift_tab.cursor.location == rebuilt_at + 1
    window = panel.stream.x[rebuilt_at + 2 - panel.drift_tab.refit_batches: rebuilt_at + 2].reshape(-1, 4)
    assert panel.drift_tab.window_source.data["part"] == part.assign(window).tolist()
    assert panel.drift_tab.window_source.data["color"] != before


def test_bad_arguments_are_named():
    dataset = data.mixture(n=200, seed=0)[0]
    for kwargs, match in (({"granularity": 1.5}, "granularity=1.5"), ({"min_size": 0}, "min_size=0"),
                          ({"min_size": 500}, "min_size=500"), ({"method": "fedavg"}, "method='fedavg'"),
                          ({"rounds": 0}, "rounds=0"), ({"max_points": 0}, "max_points=0"),
                          ({"warmup": 30}, "warmup=30")):
        with pytest.raises(ValueError, match=match):
            FederatedPanel(dataset, **kwargs)


def test_method_mae_figure_groups_methods_by_steps():
    summaries = {"fedavg": {"mae_0": 0.5, "mae_1": 0.3, "mae_5": 0.3},
                 "metacurv": {"mae_0": 0.5, "mae_1": 0.25, "mae_5": 0.2}}
    fig = method_mae_figure(summaries, alone=0.15)
    assert list(fig.x_range.factors) == [(n, f"{s} steps") for n in ("FedAvg", "Meta-Curvature") for s in STEPS]
    src = fig.renderers[0].data_source.data
    assert src["mae"] == [0.5, 0.3, 0.3, 0.5, 0.25, 0.2] and "0.150" in fig.title.text
