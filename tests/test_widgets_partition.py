"""The predictive-partitioning panel, driven headless through its widget attributes."""
import math

import networkx as nx
import numpy as np
import pandas as pd
import pytest
import torch
import traitlets
from hypothesis import given, settings
from hypothesis import strategies as st

from adaptive_kit.partition import compare_plans, emulate, simulate, stage_loads
from adaptive_kit.partition.graph import model_graph
from adaptive_kit.partition.models import GPT, uneven_mlp
from adaptive_kit.partition.plan import is_valid_pipeline
from adaptive_kit.partition.profile import CostModel, profile_batch
from widgets import PartitionPanel
from widgets.partition import (
    METHODS,
    METIS,
    OURS,
    STAGE_COLORS,
    LiveLoads,
    forecast_figure,
    gantt_data,
    gantt_figure,
    graph_figure,
    layered_layout,
    load_bars,
    schedule_of,
    throughput_figure,
)

K, WINDOWS = 4, 24


def tiny_models():
    torch.manual_seed(0)
    return {"gpt": (GPT(vocab=2048, d=32, layers=2, heads=2, seq_len=16), torch.randint(0, 2048, (4, 16))),
            "mlp": (uneven_mlp([64, 256, 512, 256, 128, 10]), torch.randn(16, 64))}


MODELS = tiny_models()


def make_panel(**kwargs) -> PartitionPanel:
    kwargs = {"k": K, "windows": WINDOWS, "reps": 1, "bound_time_s": 1.0, "min_interval_s": 3600} | kwargs
    return PartitionPanel(MODELS, model="gpt", **kwargs)


@pytest.fixture(scope="module")
def panel() -> PartitionPanel:
    return make_panel()


def node_data(panel: PartitionPanel) -> dict:
    return panel.graph_renderer.node_renderer.data_source.data


def mlp_graph():
    """The MLP's graph with calibrated ``cost_s`` (5 Linear layers)."""
    module, x = MODELS["mlp"]
    g = model_graph(module, x, reps=1)
    CostModel.fit(g, profile_batch(x)).annotate(g)
    return g


def finite(values) -> list[float]:
    return [v for v in values if not math.isnan(v)]


def test_panel_builds_and_draws_the_plan_and_the_anchors(panel):
    g, plan = panel.model_plan.graph, panel.model_plan.plan
    data = node_data(panel)
    assert sorted(data["index"]) == sorted(g.nodes) and set(data["stage"]) == set(range(K))
    assert all(plan.stage_of[v] == s for v, s in zip(data["index"], data["stage"]))
    assert data["color"] == [STAGE_COLORS[s] for s in data["stage"]]
    edges = panel.graph_renderer.edge_renderer.data_source.data
    assert len(edges["start"]) == g.number_of_edges()
    assert set(panel.graph_renderer.layout_provider.graph_layout) == set(g.nodes)
    # every method's stages side by side, in milliseconds of the loads compared
    comp = panel.comparison
    assert list(comp.loads) == list(METHODS), comp.errors
    bars = panel.bars_source.data
    assert bars["x"] == [(m, str(j)) for m in METHODS for j in range(K)]
    np.testing.assert_allclose(bars["ms"], np.concatenate([comp.loads[m] for m in METHODS]) * 1e3)
    np.testing.assert_allclose(comp.loads[OURS], plan.stage_s, rtol=1e-9)
    total = sum(d["cost_s"] for _, d in g.nodes(data=True))
    for method, stage_of in comp.plans.items():
        assert is_valid_pipeline(g, stage_of), method
        assert comp.loads[method].sum() == pytest.approx(total)
    # the MILP bound is below every valid plan's bottleneck, and drawn
    assert panel.bound_span.visible and panel.bound_span.location == pytest.approx(comp.bound.lower_s * 1e3)
    assert all(b >= comp.bound.lower_s * (1 - 1e-6) for b in comp.bottlenecks().values())
    table = panel.summary()
    assert table.loc[OURS, "× ours"] == 1.0 and (table["× lower bound"] >= 1 - 1e-6).all()
    assert "window 0/" in panel.status.value and panel.windows_run == 0


def test_changing_k_replans_and_recolours_the_graph():
    panel = make_panel()
    before = list(node_data(panel)["stage"])
    source = panel.graph_renderer.node_renderer.data_source
    panel.k.value = 3
    data = node_data(panel)
    assert panel.graph_renderer.node_renderer.data_source is source  # the same source, new data
    assert set(data["stage"]) == {0, 1, 2} and data["stage"] != before
    assert len(panel.model_plan.plan.stage_s) == 3 and panel.pipe.k == 3
    assert all(panel.model_plan.plan.stage_of[v] == s for v, s in zip(data["index"], data["stage"]))
    assert data["color"] == [STAGE_COLORS[s] for s in data["stage"]]
    assert len(panel.bars_source.data["x"]) == 3 * len(panel.comparison.loads)
    assert list(panel.slow_device.options) == [0, 1, 2] and panel.slow_device.value == 1
    assert set(panel.gantt_source.data["stage"]) == {0, 1, 2}
    assert [g.visible for g in panel.loads_plot.glyphs[2]] == [True] * 4
    assert not any(g.visible for g in panel.loads_plot.glyphs[3])
    first = panel.model_plan
    panel.k.value = K
    panel.k.value = 3
    assert panel.model_plan is first  # planned once per model and k
    panel.model.value = "mlp"
    assert "mlp" in panel.graph_fig.title.text
    assert sorted(node_data(panel)["index"]) == sorted(panel.model_plan.graph.nodes)


def test_slowdown_slows_the_emulated_device_and_the_controller_repartitions():
    panel = make_panel()
    # the busiest stage: plans come from measured node times, so on a loaded machine a stage may
    # hold little work, and slowing it would rightly change nothing
    busy = int(np.argmax(stage_loads(panel.model_plan.graph, panel.model_plan.plan.stage_of, K)))
    panel.slow_device.value = busy
    panel.slowdown.value = 2.0
    np.testing.assert_allclose(panel.pipe.speeds, [0.5 if j == busy else 1.0 for j in range(K)])
    frame = panel.step(8)
    assert len(frame) == 8 and panel.windows_run == 8 and panel.play.value == 8
    fired = frame.index[frame["repartition"]].tolist()
    assert fired and fired[0] <= 3, frame[["reason", "deviation"]]
    last = frame.iloc[-1]
    assert last["throughput"] >= 0.9 * last["optimum"]
    # the live views hold what the pipeline and its controller recorded
    live = panel.throughput_plot.source.data
    assert live["window"] == list(range(8))
    assert live["throughput"] == pytest.approx(frame["throughput"].tolist())
    assert live["optimum"] == pytest.approx(frame["optimum"].tolist())
    assert panel.repartition_source.data["window"] == fired
    h = panel.pipe.controller.history()
    loads = panel.loads_plot.source.data
    assert loads["window"] == list(range(8))
    other = (busy + 1) % K
    assert loads[f"load{busy}"] == pytest.approx(h.loc[h.device == busy, "load"].tolist())
    assert np.mean(loads[f"load{busy}"]) > 1.6 and np.mean(loads[f"load{other}"]) < 1.25
    # the forecast drawn at window w is the one the controller made at w - 1
    assert finite(loads[f"forecast{busy}"]) == pytest.approx(h.loc[h.device == busy, "forecast"].tolist()[:-1])
    # the graph and the Gantt chart now show the plan in force
    plan = panel.pipe.controller.plan
    assert all(plan.stage_of[v] == s for v, s in zip(node_data(panel)["index"], node_data(panel)["stage"]))
    assert "re-partitions 1" in panel.status.value or "re-partitions 2" in panel.status.value
    # the slow stage was given less work
    loads0 = stage_loads(panel.model_plan.graph, panel.model_plan.plan.stage_of, K)
    loads1 = stage_loads(panel.model_plan.graph, plan.stage_of, K)
    assert loads1[busy] < loads0[busy]


def test_no_slowdown_no_repartition_and_play_is_bounded():
    panel = make_panel()
    panel.play.value = 5  # what a tick of the browser's Play does
    assert panel.windows_run == 5
    panel.play.value = WINDOWS + 10  # beyond the bound: clamped by the widget
    assert panel.windows_run == WINDOWS and panel.play.value == WINDOWS
    assert panel.step(3).empty and panel.windows_run == WINDOWS
    assert not panel.pipe.frame()["repartition"].any()
    assert panel.repartition_source.data["window"] == []
    panel.reset_button.click()
    assert panel.windows_run == 0 and panel.play.value == 0
    assert panel.throughput_plot.source.data["window"] == [] and panel.loads_plot.source.data["window"] == []


def test_gantt_is_simulate_of_the_plan_in_force_at_the_current_speeds(panel):
    def expected():
        g, plan = panel.model_plan.graph, panel.pipe.controller.plan
        stage_s = np.zeros(K)
        for v, j in plan.stage_of.items():
            stage_s[j] += g.nodes[v]["cost_s"]
        stage_s /= panel.pipe.speeds
        m = panel.micro.value
        return simulate(stage_s / m / 3, 2 * stage_s / m / 3, micro=m, schedule=panel.schedule.value)

    for schedule, micro, slowdown in (("1f1b", 8, 1.0), ("gpipe", 8, 1.0), ("gpipe", 4, 3.0), ("1f1b", 6, 1.0)):
        panel.schedule.value, panel.micro.value, panel.slowdown.value = schedule, micro, slowdown
        sim = expected()
        data = panel.gantt_source.data
        ev = sim.events
        assert data["stage"] == ev["stage"].tolist() and data["micro"] == ev["micro"].tolist()
        assert data["kind"] == ev["kind"].tolist()
        np.testing.assert_allclose(data["start"], ev["start_s"] * 1e3)
        np.testing.assert_allclose(data["end"], ev["end_s"] * 1e3)
        assert panel.simulation.makespan_s == pytest.approx(sim.makespan_s)
        assert len(ev) == 2 * K * micro and f"{sim.makespan_s * 1e3:.2f} ms" in panel.gantt_fig.title.text
    assert panel.pipe.micro == 6  # micro-batches restart the pipeline with the new count


def test_live_loads_throttles_shifts_the_forecast_and_checks_rows():
    pipe = emulate(mlp_graph(), 2, 6, slowdown={1: (2, 2.0)})
    h = pipe.controller.history()
    live = LiveLoads(2, min_interval_s=3600)  # only the first push draws
    for wdw in range(6):
        live.push(h[h.window == wdw])
    assert live.redraws == 1 and live.source.data["window"] == [0.0]
    live.flush()
    assert live.redraws == 2 and live.source.data["window"] == list(range(6))
    d1 = h[h.device == 1]
    assert live.source.data["load1"] == pytest.approx(d1["load"].tolist())
    assert live.source.data["assumed1"] == pytest.approx(d1["assumed"].tolist())
    assert math.isnan(live.source.data["forecast1"][0])
    assert live.source.data["forecast1"][1:] == pytest.approx(d1["forecast"].tolist()[:-1])
    assert all(math.isnan(v) for v in live.source.data["load5"])  # no device 5 at k = 2
    with pytest.raises(ValueError, match="one window"):
        live.push(h)
    live.clear()
    assert live.source.data["window"] == []
    with pytest.raises(ValueError, match="min_interval_s"):
        LiveLoads(2, min_interval_s=-1)


def test_compare_plans_reports_what_fails():
    g = mlp_graph()  # 5 Linear layers
    comp = compare_plans(g, 4, bound_time_s=1.0)
    assert set(comp.loads) == set(METHODS) and comp.errors == {}
    assert isinstance(comp.metis_cyclic, bool)
    assert comp.bottlenecks()[OURS] <= min(comp.bottlenecks().values()) * (1 + 1e-9)
    more = compare_plans(g, 6)  # more stages than layers: the layer-based anchors refuse
    assert {"equal layers", "parameter balanced", "GPipe balance"} <= set(more.errors)
    assert OURS in more.loads and METIS in more.loads and more.bound is None
    assert "6" in more.errors["equal layers"]


def test_static_figures():
    g = mlp_graph()
    comp = compare_plans(g, 3)
    fig = graph_figure(g, comp.plans[OURS])
    nodes = fig.renderers[0].node_renderer.data_source.data
    assert len(nodes["index"]) == g.number_of_nodes() and max(nodes["size"]) == pytest.approx(22)
    bars, src, span = load_bars(comp.loads, bound=0.001)
    assert len(src.data["x"]) == 3 * len(comp.loads) and span.location == pytest.approx(1.0)
    sim = schedule_of([0.003, 0.006, 0.003], 4, "gpipe")
    assert sim.makespan_s == pytest.approx(simulate([0.00025, 0.0005, 0.00025], micro=4, schedule="gpipe").makespan_s)
    _, gsrc = gantt_figure(sim.events)
    assert gsrc.data == gantt_data(sim.events) and set(gsrc.data["kind"]) == {"F", "B"}
    pipe = emulate(g, 3, 8, slowdown={0: (2, 2.0)})
    tf = throughput_figure(pipe.frame())
    assert len(tf.renderers) == 3
    ff = forecast_figure(pipe.controller.history())
    assert len(ff.renderers) == 3 * 3
    assert not any(np.isinf(np.asarray(r.data_source.data.get("y1", []), dtype=float)).any()
                   for r in ff.renderers)


@settings(max_examples=30, deadline=None)
@given(st.integers(2, 30), st.floats(0.05, 0.5), st.integers(0, 1000))
def test_layered_layout_puts_every_edge_forward_and_no_two_nodes_together(n, p, seed):
    dag = nx.gnp_random_graph(n, p, seed=seed, directed=True)
    dag = nx.DiGraph([(u, v) for u, v in dag.edges if u < v])
    dag.add_nodes_from(range(n))
    pos = layered_layout(dag)
    assert set(pos) == set(dag.nodes)
    assert all(pos[u][0] < pos[v][0] for u, v in dag.edges)
    assert len(set(pos.values())) == n
    for x in {xy[0] for xy in pos.values()}:  # each generation centred on y = 0
        assert sum(xy[1] for xy in pos.values() if xy[0] == x) == pytest.approx(0.0)


def test_bad_arguments_and_clamped_controls():
    with pytest.raises(ValueError, match="model='bert'"):
        PartitionPanel(MODELS, model="bert")
    with pytest.raises(ValueError, match="k=9"):
        PartitionPanel(MODELS, model="gpt", k=9)
    with pytest.raises(ValueError, match="schedule='zb'"):
        PartitionPanel(MODELS, model="gpt", schedule="zb")
    with pytest.raises(ValueError, match="windows=0"):
        PartitionPanel(MODELS, model="gpt", windows=0)
    with pytest.raises(ValueError, match="models"):
        PartitionPanel({})
    panel = make_panel()
    panel.k.value = 99
    assert panel.k.value == 8 and len(panel.model_plan.plan.stage_s) == 8
    panel.slowdown.value = 0.1
    assert panel.slowdown.value == 1.0 and panel.pipe.speeds.tolist() == [1.0] * 8
    with pytest.raises(traitlets.TraitError):
        panel.schedule.value = "zb"
    with pytest.raises(traitlets.TraitError):
        panel.slow_device.value = 8


def test_a_failed_plan_reports_in_the_status(monkeypatch):
    import widgets.partition as wp

    panel = make_panel()
    plan = panel.model_plan

    def failing(*args, **kwargs):
        raise RuntimeError("cannot trace this")

    monkeypatch.setattr(wp, "plan_model", failing)
    with pytest.raises(RuntimeError, match="cannot trace"):
        panel.k.value = 3
    assert "planning failed" in panel.status.value and "cannot trace" in panel.status.value
    assert panel.model_plan is plan and panel.k.value == K  # the last good plan and its controls stay
    panel.slowdown.value = 2.0  # the panel still works
    assert panel.pipe.speeds.tolist() == [1.0, 0.5, 1.0, 1.0] and len(panel.step(2)) == 2


def test_summary_before_any_plan_is_an_error():
    panel = make_panel()
    assert isinstance(panel.summary(), pd.DataFrame)
    panel.comparison = None
    with pytest.raises(RuntimeError, match="no plan"):
        panel.summary()
