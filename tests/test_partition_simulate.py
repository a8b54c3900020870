"""The pipeline schedule simulator against closed forms and its own dependency rules."""
import numpy as np
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from adaptive_kit.partition import simulate
from adaptive_kit.partition.simulate import stage_order


@pytest.mark.parametrize("schedule", ["gpipe", "1f1b"])
@pytest.mark.parametrize(("k", "micro"), [(1, 1), (1, 5), (2, 1), (3, 4), (4, 8), (5, 2)])
def test_uniform_stages_match_the_closed_form(schedule, k, micro):
    f, b = 0.5, 1.25
    sim = simulate([f] * k, [b] * k, micro=micro, schedule=schedule)
    assert sim.makespan_s == pytest.approx((micro + k - 1) * (f + b))
    assert sim.bubble == pytest.approx((k - 1) / (micro + k - 1))
    assert sim.throughput(64) == pytest.approx(64 / sim.makespan_s)
    assert len(sim.events) == 2 * k * micro


def test_backward_defaults_to_twice_the_forward():
    assert simulate([1.0, 1.0], micro=3).makespan_s == pytest.approx((3 + 1) * 3.0)


@pytest.mark.parametrize("schedule", ["gpipe", "1f1b"])
def test_one_slow_stage_dominates(schedule):
    f = np.array([1.0, 1.0, 3.0, 1.0])
    micro = 8
    sim = simulate(f, micro=micro, schedule=schedule)
    assert sim.makespan_s >= micro * (f[2] + 2 * f[2])
    # and the fast stages wait: the bubble is larger than for uniform stages
    assert sim.bubble > (4 - 1) / (micro + 4 - 1)
    busy = sim.events.assign(d=sim.events.end_s - sim.events.start_s).groupby("stage").d.sum()
    assert busy[2] == pytest.approx(micro * 9.0)


@pytest.mark.parametrize("schedule", ["gpipe", "1f1b"])
def test_links_add_latency(schedule):
    k, micro, f, b, link = 4, 6, 1.0, 2.0, 0.5
    base = simulate([f] * k, [b] * k, micro=micro, schedule=schedule).makespan_s
    sim = simulate([f] * k, [b] * k, micro=micro, schedule=schedule, link_s=link)
    # the last stage cannot start before (k-1) forward hops and must send its last gradient
    # back over k - 1 hops: a lower bound for any schedule, met exactly by GPipe
    bound = (micro + k - 1) * (f + b) + 2 * (k - 1) * link
    assert sim.makespan_s >= bound - 1e-9 and sim.makespan_s > base
    if schedule == "gpipe":
        assert sim.makespan_s == pytest.approx(bound)
    per_link = simulate([f] * k, [b] * k, micro=micro, schedule=schedule, link_s=[link, 0, 0])
    assert base < per_link.makespan_s < sim.makespan_s


def test_update_runs_after_each_stage_last_backward():
    sim = simulate([1.0, 1.0], [2.0, 2.0], micro=2, schedule="gpipe", update_s=[0.5, 0.25])
    ev = sim.events
    upd = ev[ev.kind == "U"].set_index("stage")
    last_b = ev[ev.kind == "B"].groupby("stage").end_s.max()
    assert upd.start_s.to_dict() == last_b.to_dict()
    assert sim.makespan_s == pytest.approx(max(last_b[0] + 0.5, last_b[1] + 0.25))
    assert sim.makespan_s == pytest.approx((2 + 1) * 3.0 + 0.5)


@st.composite
def pipelines(draw):
    k = draw(st.integers(1, 5))
    times = st.floats(0.01, 5, allow_nan=False)
    f = draw(st.lists(times, min_size=k, max_size=k))
    b = draw(st.lists(times, min_size=k, max_size=k))
    link = draw(st.lists(st.floats(0, 2), min_size=k - 1, max_size=k - 1))
    return f, b, link, draw(st.integers(1, 8)), draw(st.sampled_from(["gpipe", "1f1b"]))


@settings(max_examples=60, deadline=None)
@given(pipelines())
def test_events_respect_every_dependency(case):
    f, b, link, micro, schedule = case
    k = len(f)
    sim = simulate(f, b, micro=micro, schedule=schedule, link_s=link)
    ev = sim.events
    assert len(ev) == 2 * k * micro
    assert not ev.duplicated(["stage", "micro", "kind"]).any()
    assert set(zip(ev.stage, ev.micro, ev.kind)) == {(j, m, x) for j in range(k) for m in range(micro)
                                                     for x in "FB"}
    end = {(x, j, m): e for j, m, x, e in zip(ev.stage, ev.micro, ev.kind, ev.end_s)}
    ready = []
    for j, m, x in zip(ev.stage, ev.micro, ev.kind):
        if x == "F" and j > 0:
            ready.append(end["F", j - 1, m] + link[j - 1])  # activations over the link
        elif x == "B" and j < k - 1:
            ready.append(end["B", j + 1, m] + link[j])  # the gradient back over the link
        elif x == "B":
            ready.append(end["F", j, m])  # the last stage turns around
        else:
            ready.append(0.0)
    ev = ev.assign(ready=ready)
    durations = np.where(ev.kind == "F", np.take(f, ev.stage), np.take(b, ev.stage))
    np.testing.assert_allclose(ev.end_s - ev.start_s, durations, rtol=1e-9)
    for j in range(k):  # one operation at a time, in the schedule's order, as soon as possible
        ops = ev[ev.stage == j].sort_values("start_s")
        assert list(zip(ops.kind, ops.micro)) == stage_order(schedule, j, k, micro)
        free = np.concatenate([[0.0], ops.end_s.to_numpy()[:-1]])
        np.testing.assert_allclose(ops.start_s, np.maximum(free, ops.ready), rtol=1e-12, atol=1e-12)
    assert sim.makespan_s == pytest.approx(ev.end_s.max())
    busy = (ev.end_s - ev.start_s).sum()
    assert sim.bubble == pytest.approx(1 - busy / (k * sim.makespan_s))
    assert 0 <= sim.bubble < 1


def in_flight(sim, j):
    """The most forward activations stage j holds (forwards done minus backwards done)."""
    ops = sim.events[sim.events.stage == j].sort_values("start_s")
    held = np.cumsum(np.where(ops.kind == "F", 1, -1))
    return int(held.max())


@settings(max_examples=40, deadline=None)
@given(pipelines())
def test_1f1b_bounds_activations_in_flight(case):
    f, b, link, micro, _ = case
    k = len(f)
    one = simulate(f, b, micro=micro, schedule="1f1b", link_s=link)
    gpipe = simulate(f, b, micro=micro, schedule="gpipe", link_s=link)
    for j in range(k):
        assert in_flight(one, j) == min(k - j, micro)
        assert in_flight(gpipe, j) == micro


def test_stage_order_of_1f1b():
    assert stage_order("1f1b", 0, 3, 4) == [("F", 0), ("F", 1), ("F", 2), ("B", 0), ("F", 3), ("B", 1),
                                            ("B", 2), ("B", 3)]
    assert stage_order("1f1b", 2, 3, 2) == [("F", 0), ("B", 0), ("F", 1), ("B", 1)]
    assert stage_order("gpipe", 1, 3, 2) == [("F", 0), ("F", 1), ("B", 0), ("B", 1)]


@pytest.mark.parametrize(("kwargs", "match"), [
    (dict(forward_s=[]), "one entry per stage, got none"),
    (dict(forward_s=[1, -1]), "forward_s must be finite and >= 0"),
    (dict(forward_s=[1, float("inf")]), "forward_s must be finite"),
    (dict(forward_s=[1, 1], backward_s=[1]), "backward_s must have 2 entries"),
    (dict(forward_s=[1, 1, 1], link_s=[1.0]), "link_s must have 2 entries"),
    (dict(forward_s=[1, 1], link_s=-1.0), "link_s must be finite and >= 0"),
    (dict(forward_s=[1, 1], update_s=[1, 2, 3]), "update_s must have 2 entries"),
    (dict(forward_s=[1], micro=0), "micro must be an int >= 1, got 0"),
    (dict(forward_s=[1], micro=2.0), "micro must be an int >= 1, got 2.0"),
    (dict(forward_s=[1], micro=True), "got True"),
    (dict(forward_s=[1], schedule="zb"), "schedule must be one of .*got 'zb'"),
])
def test_bad_input_raises(kwargs, match):
    with pytest.raises(ValueError, match=match):
        simulate(**kwargs)
