"""The live-swarm panel, driven headless: tick rounds, read its sources, move its controls."""
import math
from collections import Counter

import numpy as np
import pandas as pd
import pytest
from jupyter_bokeh.widgets import BokehModel

from adaptive_kit.datasets import digits
from adaptive_kit.records import MemorySink
from adaptive_kit.swarm import Goals, OptimiserConfig, Swarm, SwarmConfig, allocate
from widgets import SwarmPanel
from widgets.swarm import (
    ALARM_COLOR,
    METRICS,
    NAN_COLOR,
    best_so_far,
    layer_dash,
    lineage_figure,
    palette_colors,
    sparse_edges,
)

MEMBERS, STEPS = 6, 5
PBT = OptimiserConfig()  # the default optimiser: exploit every 2 rounds after 2


@pytest.fixture(scope="module")
def data():
    return digits()


@pytest.fixture
def make(data):
    """A fresh swarm and its panel (redrawing on every tick unless told otherwise); closed after the test."""
    made = []

    def build(members: int = MEMBERS, optimiser: OptimiserConfig = PBT, **kwargs) -> SwarmPanel:
        swarm = Swarm(data, SwarmConfig(members=members, steps_per_round=STEPS, seed=0, optimiser=optimiser))
        made.append(swarm)
        return SwarmPanel(swarm, **({"min_interval_s": 0.0} | kwargs))

    yield build
    for swarm in made:
        swarm.close()


def _fitness(swarm: Swarm, goals: Goals) -> np.ndarray:
    """The swarm's fitness under other goals (its own, put back)."""
    kept, swarm.goals = swarm.goals, goals
    try:
        return swarm.fitness()
    finally:
        swarm.goals = kept


def test_panel_builds_its_views_before_any_round(make):
    panel = make()
    for widget in (panel.top_widget, panel.bottom_widget):
        assert isinstance(widget, BokehModel)
    for fig in (panel.graph_fig, panel.heat_fig, panel.traj_fig, panel.res_fig, panel.steps_fig):
        assert fig.renderers
    nodes = panel.node_source.data
    assert nodes["member"] == list(range(MEMBERS)) and panel.graph.number_of_nodes() == MEMBERS
    assert nodes["arch"] == [m.spec.arch for m in panel.swarm.members]
    assert all(math.isnan(v) for v in nodes["value"]) and set(nodes["color"]) == {NAN_COLOR}
    assert panel.heat_source.data["member"] == [] and panel.redraws == 1 and panel.ages == []
    assert "round <b>0</b>" in panel.status.value and f"{MEMBERS} active" in panel.status.value


def test_heatmap_and_nodes_hold_what_the_bus_carried(make):
    panel = make()
    for _ in range(3):
        assert panel.tick()
    hist = panel.swarm.history()
    heat = panel.heat_source.data
    assert heat["member"] == hist["member"].tolist() and heat["round"] == hist["round"].tolist()
    for m in METRICS:
        np.testing.assert_allclose(heat[m], hist[m].astype(float), equal_nan=True, err_msg=m)
    assert heat["status"] == hist["status"].tolist()
    # each cell carries when its report was made (a browser measures data age with it)
    np.testing.assert_allclose(heat["time"], panel.collector.frame("swarm")["time"])
    assert panel.heat_source.name == "swarm_heat"
    last = hist[hist["round"] == hist["round"].max()].set_index("member").sort_index()
    np.testing.assert_allclose(panel.node_source.data["value"], last["val_acc"])
    lo, hi = hist["val_acc"].min(), hist["val_acc"].max()
    assert (panel.mapper.low, panel.mapper.high) == pytest.approx((lo, hi))
    assert panel.node_source.data["color"] == palette_colors(last["val_acc"], lo, hi)
    # one redraw per tick, each with the age of the newest report it drew
    assert panel.redraws == 4 and len(panel.ages) == 3 and all(0 <= a < 5 for a in panel.ages)
    # resources: cumulative compute per member and the steps allotted next round
    res = panel.res_source.data
    np.testing.assert_allclose(res["compute"], hist.groupby("member")["compute_s"].sum().to_numpy())
    assert res["steps_next"] == panel.swarm.table()["steps_next"].tolist()
    assert res["steps_last"] == last["steps"].tolist() and res["n_params"] == last["n_params"].tolist()


def _nearest(sim: np.ndarray, t: float, k: int) -> set[tuple[int, int]]:
    """Brute force: each member's k most similar others (ties: lower index) at similarity >= t."""
    n, out = len(sim), set()
    for a in range(n):
        others = sorted((b for b in range(n) if b != a), key=lambda b: (-sim[a, b], b))[:k]
        out |= {(min(a, b), max(a, b)) for b in others if sim[a, b] >= t}
    return out


def test_the_threshold_moves_edges_and_relayouts_only_when_they_change(make):
    panel = make(members=8)
    sim = panel.swarm.config.similarity.matrix([m.spec for m in panel.swarm.members])
    np.testing.assert_allclose(panel.similarity, sim)
    off = sim[np.triu_indices(8, 1)]
    counts = []
    for t in (0.0, float(np.median(off)), 1.0):
        panel.threshold.value = t
        expected = _nearest(sim, t, 3)
        assert panel.edges == expected and set(panel.graph.edges) == expected
        assert len(panel.edge_source.data["x0"]) == len(expected) == panel.graph.number_of_edges()
        counts.append(len(expected))
    assert 8 * 3 / 2 <= counts[0] <= 8 * 3 and counts[0] >= counts[1] >= counts[2]
    layouts, xy = panel.layouts, list(panel.node_source.data["x"])
    panel.threshold.value = 0.999  # no pair between 0.999 and 1: the same edges, the same layout
    assert panel.layouts == layouts and panel.node_source.data["x"] == xy
    panel.threshold.value = 0.0
    assert panel.layouts == layouts + 1 and panel.node_source.data["x"] != xy
    a, b = next(iter(sorted(panel.edges)))
    i = panel.edge_source.data["x0"].index(panel.positions[a][0])
    assert panel.edge_source.data["x1"][i] == panel.positions[b][0]  # edges end on their nodes


def test_the_metric_dropdown_recolours_nodes_and_heatmap(make):
    panel = make()
    for _ in range(3):
        panel.tick()
    hist = panel.swarm.history()
    last = hist[hist["round"] == hist["round"].max()].set_index("member").sort_index()
    before = list(panel.node_source.data["color"])
    for metric in ("val_loss", "lr", "steps"):
        panel.metric.value = metric
        values = last[metric].astype(float).to_numpy()
        lo, hi = hist[metric].min(), hist[metric].max()
        np.testing.assert_allclose(panel.node_source.data["value"], values)
        assert (panel.mapper.low, panel.mapper.high) == pytest.approx((lo, hi if hi > lo else panel.mapper.high))
        assert panel.node_source.data["color"] == palette_colors(values, panel.mapper.low, panel.mapper.high)
        assert panel.heat_renderer.glyph.fill_color.field == metric  # the heatmap switches field, no data resent
        assert metric in panel.heat_fig.title.text and panel.color_bar.title == metric
    panel.metric.value = "val_loss"
    assert panel.node_source.data["color"] != before
    # a bigger node for a bigger value
    v, size = np.array(panel.node_source.data["value"]), np.array(panel.node_source.data["size"])
    assert size[np.argmax(v)] > size[np.argmin(v)]


def test_selecting_members_draws_their_weight_statistics(make):
    panel = make()
    panel.tick()
    panel.select([1, 4])
    assert panel.selected == [1, 4] and list(panel.node_source.selected.indices) == [1, 4]
    stats = panel.collector.frame("stats")
    mine = stats[stats["rank"].isin([1, 4])].sort_values(["rank", "layer", "step"])
    pts = panel.traj_points.data
    assert len(pts["step"]) == len(mine) and sorted(pts["value"]) == pytest.approx(sorted(mine["norm"]))
    layers = {m: panel.swarm.layer_names(panel.swarm.members[m].spec) for m in (1, 4)}
    keys = list(zip(panel.traj_source.data["member"], panel.traj_source.data["layer"]))
    assert sorted(keys) == sorted((m, la) for m in (1, 4) for la in layers[m])
    assert panel.traj_source.data["dash"] == [layer_dash(la) for _, la in keys]
    for _ in range(2):  # new rows are streamed onto the selected members' lines
        panel.tick()
    stats = panel.collector.frame("stats")
    for (m, layer), xs, ys in zip(keys, panel.traj_source.data["xs"], panel.traj_source.data["ys"]):
        rows = stats[(stats["rank"] == m) & (stats["layer"] == layer)].sort_values("step")
        assert xs == rows["step"].astype(float).tolist() and ys == pytest.approx(rows["norm"].tolist())
    assert len(panel.traj_points.data["step"]) == int(stats["rank"].isin([1, 4]).sum())
    panel.stat.value = "std"
    assert sorted(panel.traj_points.data["value"]) == pytest.approx(
        sorted(stats[stats["rank"].isin([1, 4])]["std"]))
    panel.node_source.selected.indices = [2]  # what a tap in the browser does
    assert panel.selected == [2] and set(panel.traj_source.data["member"]) == {2}
    panel.selected = []
    assert panel.traj_points.data["step"] == [] and "none" in panel.traj_fig.title.text
    with pytest.raises(ValueError, match=r"members \[9\]"):
        panel.select([9])


def test_goal_sliders_set_the_goals_and_the_next_allocation(make):
    panel = make()
    for _ in range(2):
        panel.tick()
    swarm = panel.swarm
    panel.goal["efficiency"].value = 1.0
    panel.goal["accuracy"].value = 0.2
    assert swarm.goals == Goals(accuracy=0.2, efficiency=1.0)
    active = np.array([m.active for m in swarm.members])
    expected = allocate(swarm.fitness(), STEPS * int(active.sum()), active, swarm.optimiser)
    accuracy_only = allocate(_fitness(swarm, Goals()), STEPS * int(active.sum()),
                             active, swarm.optimiser)
    assert not np.array_equal(expected, accuracy_only)  # the goals change who gets the steps
    panel.tick()
    hist = swarm.history()
    assert hist[hist["round"] == hist["round"].max()]["steps"].tolist() == expected.tolist()
    # all weights 0: a message in the status line, the goals kept, nothing raised
    for g in panel.goal.values():
        g.value = 0.0
    assert swarm.goals == Goals(accuracy=0.0, efficiency=1.0)
    assert "goals not changed" in panel.status.value
    panel.goal["loss"].value = 0.5
    assert swarm.goals == Goals(accuracy=0.0, loss=0.5, efficiency=0.0) and "not changed" not in panel.status.value


def test_optimiser_controls_set_the_policy(make):
    panel = make()
    panel.tick()
    panel.allocation.value = "equal"
    panel.perturb.value = "grid"
    panel.mutation.value = 0.5
    panel.breed.value = 0.0
    panel.temperature.value = 1.0
    pol = panel.swarm.optimiser
    assert (pol.allocation, pol.perturb, pol.mutation_rate, pol.breed_rate) == ("equal", "grid", 0.5, 0.0)
    assert pol.temperature == pytest.approx(1.0) and pol.exploit_every == OptimiserConfig().exploit_every
    panel.tick()
    hist = panel.swarm.history()
    assert set(hist[hist["round"] == 1]["steps"]) == {STEPS}  # equal shares


def test_pause_makes_tick_a_no_op(make):
    panel = make()
    panel.tick()
    panel.pause.value = True
    assert panel.swarm.paused
    rounds, redraws, cells = panel.swarm.round, panel.redraws, len(panel.heat_source.data["round"])
    assert panel.tick() is False
    panel.step_button.click()
    assert (panel.swarm.round, panel.redraws, len(panel.heat_source.data["round"])) == (rounds, redraws, cells)
    assert "paused" in panel.status.value
    panel.pause.value = False
    assert panel.tick() and panel.swarm.round == rounds + 1
    panel.step_button.click()  # one round, drawn at once
    assert panel.swarm.round == rounds + 2 and max(panel.heat_source.data["round"]) == rounds + 1


def test_redraws_are_throttled_until_flush(make):
    panel = make(min_interval_s=3600.0)
    redraws = panel.redraws
    for _ in range(3):
        assert panel.tick()
    assert panel.redraws == redraws and panel.heat_source.data["round"] == []
    panel.flush()
    assert panel.redraws == redraws + 1 and sorted(set(panel.heat_source.data["round"])) == [0, 1, 2]
    assert len(panel.heat_source.data["round"]) == 3 * MEMBERS and len(panel.ages) == 1
    # the Play drops ticks that arrive while the kernel was busy, then ticks again
    panel.play.interval = 10_000
    panel.play.value = 1
    assert panel.dropped_ticks == 1 and panel.swarm.round == 3
    panel.play.interval = 0
    panel.play.value = 2
    assert panel.swarm.round == 4 and panel.ticks == 4


def test_rounds_per_tick_and_run(make):
    panel = make(rounds_per_tick=2)
    assert panel.run(4) == 4 and panel.ticks == 2 and panel.swarm.round == 4
    assert sorted(set(panel.heat_source.data["round"])) == [0, 1, 2, 3]


def test_a_nan_member_and_a_crash_are_quarantined_and_listed(make):
    panel = make(members=8, optimiser=OptimiserConfig(exploit_every=0))
    panel.tick()
    swarm = panel.swarm
    groups = Counter(m.spec.group_key for m in swarm.members)
    lone = next(m.id for m in swarm.members if groups[m.spec.group_key] == 1 and m.id != 1)
    swarm.inject(1, "nan")
    swarm.inject(lone, "crash")
    panel.tick()
    nodes = panel.node_source.data
    for m in (1, lone):
        assert nodes["status"][m] == "quarantined" and nodes["color"][m] == NAN_COLOR
        assert nodes["line_color"][m] == ALARM_COLOR and nodes["alarms"][m] >= 1
    alarms = panel.heat_alarm_source.data
    assert {(1, 1), (lone, 1)} <= set(zip(alarms["member"], alarms["round"]))
    assert "non-finite weights" in panel.alarms_html.value and "injected crash" in panel.alarms_html.value
    assert "2 quarantined" in panel.status.value
    heat = panel.heat_source.data
    assert [s for m, r, s in zip(heat["member"], heat["round"], heat["status"]) if r == 1 and m == 1] == ["quarantined"]
    panel.tick()  # the swarm goes on without them: they report no more, the others share all the steps
    steps = panel.swarm.history().query("round == 2").set_index("member")["steps"]
    assert 1 not in steps.index and lone not in steps.index and steps.sum() == STEPS * 6
    assert panel.node_source.data["status"][1] == "quarantined"


def test_palette_colors_follow_bokehs_linear_rule():
    pal = ("a", "b", "c", "d")
    got = palette_colors([0.0, 0.24, 0.25, 0.5, 0.99, 1.0, 2.0, -1.0, math.nan], 0.0, 1.0, pal, "nan")
    assert got == ["a", "a", "b", "c", "d", "d", "d", "a", "nan"]
    assert [layer_dash(la) for la in ("out", "h0", "h1")] == ["solid", "dashed", "dotted"]


def test_bad_arguments_are_named(make, data):
    for kwargs, match in (({"metric": "accuracy"}, "metric='accuracy'"), ({"stat": "max"}, "stat='max'"),
                          ({"threshold": 1.5}, "threshold=1.5"), ({"rounds_per_tick": 0}, "rounds_per_tick=0"),
                          ({"min_interval_s": -1.0}, "min_interval_s=-1.0"), ({"max_points": 0}, "max_points=0")):
        with pytest.raises(ValueError, match=match):
            make(**kwargs)
    with Swarm(data, SwarmConfig(members=2, steps_per_round=2), sink=MemorySink()) as swarm:
        assert swarm.collector is None  # it reports to another sink
        with pytest.raises(ValueError, match="collector="):
            SwarmPanel(swarm)


def test_best_so_far_counts_member_epochs_and_keeps_the_best():
    history = pd.DataFrame({"round": [0, 0, 1, 1, 2], "member": [0, 1, 0, 1, 0], "steps": [10, 10, 15, 5, 20],
                            "batch_size": [32, 32, 32, 32, 16], "val_acc": [0.5, 0.7, 0.6, 0.65, 0.9]})
    got = best_so_far(history, n_train=320)
    assert got["round"].tolist() == [0, 1, 2]
    assert got["member_epochs"].tolist() == pytest.approx([2.0, 4.0, 5.0])  # 640/320, +640/320, +320/320
    assert got["best_val_acc"].tolist() == [0.7, 0.7, 0.9]
    with pytest.raises(ValueError, match="n_train=0"):
        best_so_far(history, n_train=0)


def test_lineage_figure_draws_a_segment_per_parent_and_a_marker_per_event():
    lineage = pd.DataFrame([
        {"round": 0, "member": 2, "kind": "quarantine", "parents": (), "before": "linear32/relu", "after": "",
         "detail": "non-finite weights"},
        {"round": 2, "member": 2, "kind": "exploit", "parents": (0,), "before": "a", "after": "b", "detail": ""},
        {"round": 2, "member": 3, "kind": "breed", "parents": (0, 1), "before": "c", "after": "d", "detail": ""}])
    fig = lineage_figure(lineage, members=4, rounds=3)
    segments, markers = (r.data_source.data for r in fig.renderers[1:3])
    assert list(zip(segments["y0"], segments["y1"])) == [(0, 2), (0, 3), (1, 3)]
    assert markers["kind"] == ["quarantine", "exploit", "breed"] and markers["parents"] == ["-", "0", "0 × 1"]
    assert markers["color"][0] == ALARM_COLOR and len(fig.renderers[0].data_source.data["y0"]) == 4


@pytest.mark.parametrize("n, k", [(16, 3), (64, 3), (256, 4)])
def test_sparse_edges_are_each_members_nearest_and_stay_few(n, k):
    rng = np.random.default_rng(n)
    x = rng.random((n, 5))
    sim = 1 - np.abs(x[:, None, :] - x[None, :, :]).mean(-1)  # symmetric, 1 on the diagonal
    t = float(np.quantile(sim, 0.3))
    edges = sparse_edges(sim, t, k)
    assert edges == _nearest(sim, t, k)
    assert len(edges) <= n * k and all(a < b for a, b in edges)


def test_sparse_edges_reject_bad_input():
    with pytest.raises(ValueError, match="neighbours=0"):
        sparse_edges(np.eye(3), 0.5, 0)
    with pytest.raises(ValueError, match="not square"):
        sparse_edges(np.ones((2, 3)), 0.5, 2)


def test_a_big_swarm_is_drawn_sparse_and_labelled_only_where_selected(make):
    panel = make(members=40)
    panel.tick()
    assert len(panel.edges) <= 40 * 3
    panel.select([2, 5])
    labels = panel.node_source.data["label"]
    assert [i for i, lb in enumerate(labels) if lb] == [2, 5] and labels[2] == "2"


def test_the_vectorised_similarity_matrix_equals_every_pair(data):
    swarm = Swarm(data, SwarmConfig(members=24, steps_per_round=STEPS, seed=3))
    try:
        specs = [m.spec for m in swarm.members]
        sim = swarm.config.similarity
        pairs = np.array([[1.0 if i == j else sim(a, b) for j, b in enumerate(specs)] for i, a in enumerate(specs)])
        cache: dict = {}
        np.testing.assert_allclose(sim.matrix(specs, cache), pairs, atol=1e-12)
        np.testing.assert_allclose(sim.matrix(specs[::-1], cache), pairs[::-1, ::-1], atol=1e-12)  # from the cache
    finally:
        swarm.close()
