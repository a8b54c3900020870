"""Drift detectors against river and by their own consistency, alarm scoring, the federated data
sets, and the stream loop that re-partitions on drift."""
import math

import numpy as np
import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st
from river import drift as river_drift
from scipy import stats

from adaptive_kit.datasets import statsmodels_frame
from adaptive_kit.federated import data
from adaptive_kit.federated.drift import ADWIN, KSDrift, PageHinkley, follow_stream, score_alarms
from adaptive_kit.federated.subsets import choose_granularity, n_parts

BATCH = 100


def loss_like(seed, before=2000, after=1000, shift=0.3, level=0.5, scale=0.2):
    """A per-row loss: ``before`` values around ``level``, then ``after`` values ``shift`` higher."""
    rng = np.random.default_rng(seed)
    return np.concatenate([rng.normal(level, scale, before), rng.normal(level + shift, scale, after)])


def alarms(det, values, size):
    """The end positions of the pieces of ``size`` on which ``det`` fired."""
    return [i + len(values[i:i + size]) for i in range(0, len(values), size) if det.update(values[i:i + size])]


def river_alarms(det, values):
    out = []
    for i, v in enumerate(values):
        det.update(float(v))
        if det.drift_detected:
            out.append(i + 1)
    return out


DETECTORS = {"page_hinkley": PageHinkley, "adwin": ADWIN}
RIVER = {"page_hinkley": river_drift.PageHinkley, "adwin": river_drift.ADWIN}


# --- Page-Hinkley and ADWIN: river is the engine ------------------------------------------------

@settings(max_examples=25, deadline=None)
@given(name=st.sampled_from(sorted(DETECTORS)), seed=st.integers(0, 10_000), size=st.integers(1, 300),
       shift=st.sampled_from([-1.0, -0.3, 0.0, 0.4, 1.0]))
def test_batches_give_rivers_alarms_row_for_row(name, seed, size, shift):
    values = np.random.default_rng(seed).normal(0, 1, 1500)
    values[700:] += shift
    theirs = river_alarms(RIVER[name](), values)
    det, ours = DETECTORS[name](), []
    for start in range(0, len(values), size):
        if det.update(values[start:start + size]):
            ours.append(start + det.fired_at + 1)
        else:
            assert det.fired_at is None
    # per batch the first of river's alarms in it, at the row where river raised it
    firsts = sorted({(a - 1) // size: a for a in reversed(theirs)}.values())
    assert ours == firsts


@pytest.mark.parametrize("name", DETECTORS)
@pytest.mark.parametrize("seed", [0, 1])
def test_detectors_fire_within_a_few_batches_of_a_mean_shift(name, seed):
    fired = alarms(DETECTORS[name](), loss_like(seed), BATCH)
    assert fired, name
    # the change is at 2000: the first alarm falls in one of the three batches that follow it
    assert 2000 < fired[0] <= 2000 + 3 * BATCH
    assert all(a > 2000 for a in fired)


@pytest.mark.parametrize("name", DETECTORS)
@pytest.mark.parametrize("seed", [10, 11])
def test_detectors_stay_quiet_on_a_stationary_stream(name, seed):
    values = np.random.default_rng(seed).normal(0.5, 0.2, 20_000)
    assert alarms(DETECTORS[name](), values, BATCH) == []


def test_page_hinkley_is_two_sided_by_default():
    # a fall then a rise: the default catches both; one-sided tests catch only their own direction
    rng = np.random.default_rng(12)
    values = np.concatenate([rng.normal(1.0, 0.2, 600), rng.normal(0.4, 0.2, 600), rng.normal(1.2, 0.2, 600)])
    both = alarms(PageHinkley(), values, 1)
    assert len(both) == 2 and 600 < both[0] <= 700 and 1200 < both[1] <= 1300
    assert alarms(PageHinkley(mode="up"), values[:1200], 1) == []
    assert alarms(PageHinkley(mode="down"), values[:1200], 1) == both[:1]


def unit_streams(shift, streams=20, before=2000, after=2000):
    """``streams`` unit-variance streams whose mean moves by ``shift`` sigma after ``before`` values."""
    for seed in range(streams):
        rng = np.random.default_rng(100 + seed)
        yield np.concatenate([rng.normal(0, 1, before), rng.normal(shift, 1, after)])


def test_adwin_finds_a_quarter_sigma_shift_on_most_streams_without_false_alarms():
    found = [alarms(ADWIN(), v, 50) for v in unit_streams(0.25)]
    hits = [f for f in found if f and f[0] > 2000]
    assert len(hits) >= 18 and all(f[0] > 2000 for f in found if f)


def test_page_hinkley_detects_a_fall_of_one_sigma_on_every_stream():
    firsts = [next(a for a in alarms(PageHinkley(threshold=100), v, 50) if a > 2000) - 2000
              for v in unit_streams(-1.0)]
    assert len(firsts) == 20 and np.mean(firsts) < 300


def test_adwin_drops_the_window_before_the_change():
    det = ADWIN()
    values = loss_like(8, 1000, 300, shift=1.0)
    assert alarms(det, values, BATCH)
    assert det.width < 300 + BATCH  # only rows near and after the change are kept
    assert det.mean == pytest.approx(1.5, abs=0.1)
    det.reset()
    assert det.width == 0 and math.isnan(det.mean)


@pytest.mark.parametrize("det", [PageHinkley(), ADWIN()], ids=["page_hinkley", "adwin"])
def test_non_finite_values_are_named_by_position(det):
    with pytest.raises(ValueError, match="non-finite values \\(first at position 3\\)"):
        det.update([0.1, 0.2, 0.3, float("nan"), float("inf")])


@pytest.mark.parametrize("det", [PageHinkley(), ADWIN()], ids=["page_hinkley", "adwin"])
def test_empty_batches_change_nothing(det):
    assert det.update([]) is False and det.fired_at is None


@pytest.mark.parametrize("make, shown", [
    (lambda: PageHinkley(delta=-0.1), "delta"), (lambda: PageHinkley(threshold=0), "threshold"),
    (lambda: PageHinkley(min_samples=0), "min_samples"), (lambda: PageHinkley(delta=float("nan")), "delta"),
    (lambda: PageHinkley(alpha=1.5), "alpha"), (lambda: PageHinkley(mode="sideways"), "mode"),
    (lambda: ADWIN(delta=0), "delta"), (lambda: ADWIN(delta=1.0), "delta"), (lambda: ADWIN(min_side=0), "min_side"),
    (lambda: ADWIN(clock=0), "clock"), (lambda: ADWIN(clock=2.5), "clock"), (lambda: ADWIN(grace_period=True), "grace_period"),
    (lambda: KSDrift(alpha=0), "alpha"), (lambda: KSDrift(alpha=1.5), "alpha"), (lambda: KSDrift(reference_rows=0), "reference_rows"),
])
def test_bad_detector_arguments_raise_naming_the_argument(make, shown):
    with pytest.raises(ValueError, match=f"^{shown} must be"):
        make()


# --- KS --------------------------------------------------------------------------------------

def test_ks_takes_the_first_batch_as_reference_and_fires_on_a_shifted_feature():
    rng = np.random.default_rng(0)
    det = KSDrift(alpha=1e-3)
    first = rng.normal(size=(200, 4))
    assert det.update(first) is False
    np.testing.assert_array_equal(det.reference, first)
    moved = rng.normal(size=(200, 4))
    moved[:, 2] += 1.0
    assert det.update(moved) is True
    p = stats.ks_2samp(first, moved, axis=0).pvalue
    assert det.last_p == pytest.approx(p.min() * 4)  # Bonferroni over the 4 features
    assert det.last_p < 1e-3


def test_ks_rarely_fires_on_batches_from_the_reference_distribution():
    rng = np.random.default_rng(1)
    det = KSDrift(alpha=1e-3, reference=rng.normal(size=(500, 4)))
    false_alarms = sum(det.update(rng.normal(size=(200, 4))) for _ in range(50))
    assert false_alarms <= 2
    det.reset()  # no reference: the next batch becomes it
    assert det.reference is None and det.update(rng.normal(3, 1, size=(50, 4))) is False


def test_ks_moves_its_reference_after_an_alarm_instead_of_firing_on_every_batch():
    rng = np.random.default_rng(2)
    det = KSDrift(alpha=1e-3, reference=rng.normal(size=(500, 3)))
    fired = [det.update(rng.normal(size=(50, 3)) + (1.0 if b >= 10 else 0.0)) for b in range(40)]
    assert fired[10] and sum(fired) == 1  # one alarm at the change, none for the 29 batches after
    # the reference restarted with the alarm batch and grew with the quiet batches to 500 rows
    assert len(det.reference) == 500 and det.reference.mean() == pytest.approx(1.0, abs=0.15)


@pytest.mark.parametrize("batch, shown", [(np.zeros(10), r"\(rows, features\) batch, got shape \(10,\)"),
                                          (np.array([[0.0, np.nan]]), "non-finite values \\(first at row 0, column 1\\)")])
def test_ks_rejects_a_bad_batch(batch, shown):
    with pytest.raises(ValueError, match=shown):
        KSDrift().update(batch)


# --- scoring ---------------------------------------------------------------------------------

def test_score_alarms_on_hand_made_cases():
    s = score_alarms([23, 22, 50], changes=[20, 45], horizon=5)
    assert s["delays"] == [2, None]  # 50 is outside [45, 50)
    assert (s["missed"], s["false_alarms"], s["mean_delay"]) == (1, 2, 2.0)
    s = score_alarms([10, 30, 31, 62], changes=[30, 60], horizon=3)
    assert s["delays"] == [0, 2] and s["missed"] == 0 and s["false_alarms"] == 2 and s["mean_delay"] == 1.0
    s = score_alarms([], changes=[5], horizon=10)
    assert s["delays"] == [None] and s["missed"] == 1 and s["false_alarms"] == 0 and math.isnan(s["mean_delay"])
    assert score_alarms([3, 4], changes=[], horizon=10)["false_alarms"] == 2


# --- data ------------------------------------------------------------------------------------

def test_fair_is_standardised_with_five_ordered_classes():
    d = data.fair()
    assert d.x.shape == (6366, 8) and d.y.shape == (6366,) and d.classes == 5
    assert d.x.dtype == torch.float32 and d.y.dtype == torch.int64 and len(d.features) == 8
    torch.testing.assert_close(d.x.mean(0), torch.zeros(8), atol=1e-5, rtol=0)
    torch.testing.assert_close(d.x.std(0, unbiased=False), torch.ones(8), atol=1e-5, rtol=0)
    raw = statsmodels_frame("fair")
    assert torch.equal(d.y, torch.tensor(raw.rate_marriage.to_numpy().astype(int) - 1))
    assert torch.unique(d.y).tolist() == [0, 1, 2, 3, 4]


def test_randhie_bins_outpatient_visits_into_four_classes():
    d = data.randhie()
    assert d.x.shape == (20190, 9) and d.classes == 4 and d.levels == ["0", "1-2", "3-5", "6+"]
    visits = statsmodels_frame("randhie").mdvis.to_numpy()
    expected = (visits >= 1).astype(int) + (visits >= 3) + (visits >= 6)
    assert torch.equal(d.y, torch.tensor(expected))
    assert torch.bincount(d.y).min() > 1000  # every bin is populated


def test_mixture_has_regimes_of_unequal_shares():
    d, regime = data.mixture(n=8000, regimes=4, classes=3, seed=0)
    assert d.x.shape == (8000, 4) and d.classes == 3 and regime.shape == (8000,)
    share = torch.bincount(regime, minlength=4).double() / 8000
    np.testing.assert_allclose(share.numpy(), data.MIXTURE_WEIGHTS, atol=0.02)
    assert (torch.bincount(d.y).double() / 8000 - 1 / 3).abs().max() < 0.01  # balanced classes


@pytest.fixture(scope="module")
def stream():
    return data.drifting_stream(batches=40, changes=(20,), seed=0)


def shares_of(regime, regimes=4):
    return (torch.bincount(regime.reshape(-1), minlength=regimes).double() / regime.numel()).numpy()


def test_drifting_stream_shapes_and_shares(stream):
    assert stream.x.shape == (40, 200, 4) and stream.y.shape == stream.regime.shape == (40, 200)
    assert stream.changes == [20]
    np.testing.assert_allclose(shares_of(stream.regime[:20]), data.MIXTURE_WEIGHTS, atol=0.03)
    np.testing.assert_allclose(shares_of(stream.regime[20:]), (0.1, 0.1, 0.2, 0.6), atol=0.03)


def regime_means(s, segment):
    x, r = s.x[segment].reshape(-1, s.x.shape[-1]), s.regime[segment].reshape(-1)
    return torch.stack([x[r == k].mean(0) for k in range(4)])


def test_drifting_stream_keeps_or_redraws_the_regimes():
    same = data.drifting_stream(batches=20, batch=200, changes=(10,), new_regimes=False, seed=3)
    # the same regimes in new shares: each regime's mean stays (unit noise, >= 200 rows a regime)
    torch.testing.assert_close(regime_means(same, slice(0, 10)), regime_means(same, slice(10, 20)), atol=0.25, rtol=0)
    new = data.drifting_stream(batches=20, batch=200, changes=(10,), new_regimes=True, seed=3)
    moved = (regime_means(new, slice(0, 10)) - regime_means(new, slice(10, 20))).norm(dim=1)
    assert moved.min() > 1.0  # separation 4: new centres are far from the old ones


def test_drifting_stream_with_several_changes():
    s = data.drifting_stream(batches=30, batch=100, changes=(10, 20),
                             shares=((1, 0, 0, 0), (0, 1, 0, 0), (0, 0, 0, 1)), new_regimes=False)
    assert (s.regime[:10] == 0).all() and (s.regime[10:20] == 1).all() and (s.regime[20:] == 3).all()


@pytest.mark.parametrize("kwargs, message", [
    ({"changes": (10, 20)}, "shares needs len\\(changes\\) \\+ 1 = 3 entries, got 2"),
    ({"changes": (0,)}, "changes must be increasing batch numbers in \\(0, 40\\)"),
    ({"changes": (40,)}, "in \\(0, 40\\), got \\[40\\]"),
    ({"changes": (20, 10), "shares": ((1, 1, 1, 1),) * 3}, "increasing"),
    ({"changes": (10, 10), "shares": ((1, 1, 1, 1),) * 3}, "increasing"),
])
def test_drifting_stream_rejects_bad_changes(kwargs, message):
    with pytest.raises(ValueError, match=message):
        data.drifting_stream(batches=40, batch=10, **kwargs)


# --- the stream loop -------------------------------------------------------------------------

@pytest.fixture(scope="module")
def followed(stream):
    return follow_stream(stream.x, stream.y, warmup=5, refit_batches=5)


def test_follow_stream_alarms_right_after_the_change(followed):
    every = sorted(b for fired in followed.alarms.values() for b in fired)
    assert set(followed.alarms) == {"page_hinkley", "adwin", "ks"}
    assert every and all(b >= 20 for b in every)  # nothing in the first segment
    assert 20 <= every[0] <= 22
    assert any(followed.alarms[k] and followed.alarms[k][0] <= 22 for k in ("page_hinkley", "adwin"))


def test_follow_stream_repartitions_on_the_alarm_and_once_more_after(followed):
    first_alarm = min(b for fired in followed.alarms.values() for b in fired)
    made = [b for b, _ in followed.partitions]
    assert made[0] == 5  # the warm-up partition
    assert first_alarm in made and first_alarm + 5 in made  # and the rebuild on post-alarm rows
    log = followed.log
    assert sorted(log.loc[log.repartitioned, "batch"]) == made[1:]
    for b, part in followed.partitions:
        assert part.labels.numel() == 5 * 200  # always the last refit_batches (= warm-up) batches
        if b > 5:
            assert log.loc[log.batch == b, "parts"].item() == part.parts


def test_follow_stream_log_has_one_row_per_batch_after_warmup(followed):
    log = followed.log
    assert list(log.columns) == ["batch", "loss", "error", "alarm", "repartitioned", "parts", "largest_share"]
    assert log.batch.tolist() == list(range(5, 40))
    assert log.loss.gt(0).all() and log.error.between(0, 1).all() and log.largest_share.between(0, 1).all()
    alarmed = log.loc[log.alarm != "", "batch"].tolist()
    assert alarmed == sorted({b for fired in followed.alarms.values() for b in fired})
    # the models fit the first segment: the loss jumps at the change and recovers after the refits
    assert log.loss[log.batch == 20].item() > 1.5 * log.loss[log.batch < 20].mean()
    assert log.loss[log.batch >= 30].mean() < log.loss[log.batch == 20].item()


def test_follow_stream_only_repartitions_on_its_trigger(stream):
    run = follow_stream(stream.x[:25], stream.y[:25], detectors={"adwin": ADWIN()}, trigger=[])
    assert run.alarms["adwin"] and [b for b, _ in run.partitions] == [5]
    assert not run.log.repartitioned.any()


def test_follow_stream_chooses_the_granularity_when_asked():
    s = data.drifting_stream(batches=12, batch=100, changes=(6,), seed=0)
    run = follow_stream(s.x, s.y, granularity="auto", warmup=3, refit_batches=3, min_size=50)
    chosen, _ = choose_granularity(s.x[:3].reshape(-1, 4), s.y[:3].reshape(-1), 50)
    assert run.partitions[0][1].parts == n_parts(300, chosen, 50) > 1  # regimes: more than one part
    assert run.log.parts.iloc[0] == run.partitions[0][1].parts
    assert min(b for fired in run.alarms.values() for b in fired) == 6


def test_follow_stream_names_an_unknown_granularity():
    with pytest.raises(ValueError, match="granularity"):
        follow_stream(torch.randn(10, 8, 2), torch.randint(0, 2, (10, 8)), granularity="fine")


@pytest.mark.parametrize("kwargs, message", [
    ({"x": torch.zeros(10, 4), "y": torch.zeros(10, dtype=torch.long)}, "x must be \\(batches, batch, d\\)"),
    ({"y": torch.zeros(10, 7, dtype=torch.long)}, "y \\(batches, batch\\); got \\(10, 8, 2\\), \\(10, 7\\)"),
    ({"warmup": 0}, "warmup must be in \\[1, 9\\]"),
    ({"warmup": 10}, "warmup must be in \\[1, 9\\]"),
    ({"refit_batches": 0}, "refit_batches >= 1"),
])
def test_follow_stream_rejects_bad_shapes_and_windows(kwargs, message):
    args = {"x": torch.randn(10, 8, 2), "y": torch.randint(0, 2, (10, 8))} | kwargs
    x, y = args.pop("x"), args.pop("y")
    with pytest.raises(ValueError, match=message):
        follow_stream(x, y, **args)


def test_anes96_has_seven_ordered_party_identifications():
    d = data.anes96()
    assert d.x.shape == (944, 8) and d.classes == 7 and d.levels[0] == "strong Dem" and d.levels[-1] == "strong Rep"
    assert torch.bincount(d.y).tolist() == [200, 180, 108, 37, 94, 150, 175]
    assert torch.allclose(d.x.mean(0), torch.zeros(8), atol=1e-5) and torch.allclose(d.x.std(0), torch.ones(8), atol=1e-2)
