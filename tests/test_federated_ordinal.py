"""Ordinal logistic regression in torch against statsmodels' OrderedModel."""
import numpy as np
import pytest
import torch
from statsmodels.miscmodels.ordinal_model import OrderedModel

from adaptive_kit.datasets import statsmodels_frame
from adaptive_kit.federated import ordinal


@pytest.fixture(scope="module")
def fair():
    d = statsmodels_frame("fair")
    y = (d.rate_marriage.astype(int) - 1).to_numpy()
    x = d[["age", "yrs_married", "children", "religious", "educ"]].to_numpy(float)
    return (x - x.mean(0)) / x.std(0), y


def test_coefficients_and_thresholds_match_ordered_model_on_fair(fair):
    x, y = fair
    ref = OrderedModel(y, x, distr="logit").fit(method="bfgs", disp=False, maxiter=5000, gtol=1e-8)
    ours = ordinal.fit(torch.tensor(x), torch.tensor(y))
    assert ours.classes == 5
    np.testing.assert_allclose(ours.params.numpy(), ref.params, atol=1e-3)
    ref_thresholds = ref.model.transform_threshold_params(ref.params)[1:-1]
    np.testing.assert_allclose(ours.thresholds.numpy(), ref_thresholds, atol=1e-3)
    assert ours.nll == pytest.approx(-ref.llf / len(y), abs=1e-8)


def test_binary_is_the_two_class_case_of_logistic_regression():
    g = torch.Generator().manual_seed(0)
    x = torch.randn(500, 3, generator=g, dtype=torch.float64)
    y = (x @ torch.tensor([1.5, -1.0, 0.5], dtype=torch.float64) + 0.3 > torch.randn(500, generator=g, dtype=torch.float64)).long()
    f = ordinal.fit(x, y)
    probs = ordinal.class_probs(f.params, x, 2)
    # P(y=1) = sigmoid(x beta - t0): the logit is linear in x with slope beta
    logit = torch.log(probs[:, 1] / probs[:, 0])
    np.testing.assert_allclose(logit.numpy(), (x @ f.coef - f.thresholds[0]).numpy(), atol=1e-8)
    assert torch.allclose(probs.sum(1), torch.ones(500, dtype=torch.float64))
    assert (f.coef[0] > 1.0) and (f.coef[1] < -0.5)


def test_masked_rows_do_not_count():
    x = torch.randn(40, 2, dtype=torch.float64)
    y = torch.randint(0, 3, (40,))
    p = ordinal.init_params(2, 3, y) + 0.1
    w = torch.cat([torch.ones(25), torch.zeros(15)]).double()
    assert ordinal.nll(p, x, y, 3, w) == pytest.approx(float(ordinal.nll(p, x[:25], y[:25], 3)))


@pytest.mark.parametrize("labels, message", [
    ([0, 0, 0], "single class"),
    ([0, 2, 2, 0], "missing \\[1\\]"),
    ([1, 2, 3], "0..J-1"),
    ([0.5, 1.0], "integer"),
])
def test_bad_ordinal_targets_are_named(labels, message):
    with pytest.raises(ValueError, match=message):
        ordinal.check_ordinal(torch.tensor(labels))


def test_nan_features_are_named():
    x = torch.zeros(4, 2, dtype=torch.float64)
    x[2, 1] = float("nan")
    with pytest.raises(ValueError, match="row 2, column 1"):
        ordinal.fit(x, torch.tensor([0, 1, 0, 1]))


def test_median_prediction_is_the_first_class_reaching_half_and_minimises_absolute_error():
    g = torch.Generator().manual_seed(3)
    x = torch.randn(300, 3, generator=g, dtype=torch.float64) * 2
    p = torch.cat([torch.randn(3, generator=g, dtype=torch.float64), torch.tensor([-1.0, 0.0, 0.3], dtype=torch.float64)])
    probs = ordinal.class_probs(p, x, 4).numpy()  # (n, 4)
    first_half = (np.cumsum(probs, axis=1) >= 0.5).argmax(axis=1)
    median = ordinal.predict(p, x, 4, "median")
    np.testing.assert_array_equal(median.numpy(), first_half)
    # the median minimises the expected absolute error over the classes (brute force)
    expected_abs = np.abs(np.arange(4)[None, :, None] - np.arange(4)[None, None, :])  # (1, k, j)
    risk = (expected_abs * probs[:, None, :]).sum(-1)  # (n, k)
    np.testing.assert_allclose(risk[np.arange(300), median.numpy()], risk.min(1), atol=1e-12)
    assert (median.numpy() != ordinal.predict(p, x, 4).numpy()).any()  # mode and median differ somewhere
    np.testing.assert_array_equal(ordinal.predict(p, x, 4, "mode").numpy(), probs.argmax(1))
    assert ordinal.mae(p, x, median, 4) == 0.0


def test_an_unknown_prediction_rule_raises():
    with pytest.raises(ValueError, match="rule must be 'mode' or 'median', got 'mean'"):
        ordinal.predict(torch.zeros(3, dtype=torch.float64), torch.zeros(2, 2, dtype=torch.float64), 2, "mean")


# one validation of labels, features and steps behind every entry point (adaptive_kit.federated.checks)
BAD_LABELS = [
    (torch.zeros(12, dtype=torch.long), "y has a single class \\(\\[0\\]\\)"),
    (torch.tensor([1, 5, 9] * 4), "y classes must be 0..J-1 without gaps, got \\[1, 5, 9\\]"),
    (torch.tensor([0.0, 1.5, 1.0] * 4), "y must hold integer class indices, got fractional labels \\[1.5\\]"),
    (torch.tensor([-1, 0, 1] * 4), "y classes must be 0..J-1, got negative labels \\[-1\\]"),
    (np.array(["a", "b", "c"] * 4), "y must be numeric, got non-numeric values such as \\['a', 'b', 'c'\\]"),
    (["low", "high", "low"] * 4, "y must be numeric, got non-numeric values such as \\['low', 'high', 'low'\\]"),
    (torch.tensor([0.0, float("nan"), 1.0] * 4), "y has non-finite labels"),
    (torch.zeros(0, dtype=torch.long), "y must be a non-empty 1-d tensor"),
]


def _entry_points():
    from adaptive_kit.federated import drift, meta, profile
    from adaptive_kit.federated import subsets as partition

    x = torch.randn(12, 2)
    return {
        "check_ordinal": lambda y: ordinal.check_ordinal(y),
        "fit": lambda y: ordinal.fit(x[: len(y)], y),
        "profile_data": lambda y: profile.profile_data(x[: len(y)], y, clusters=2, k=2),
        "adaptive_partition": lambda y: partition.adaptive_partition(x[: len(y)], y, 0.5, 2),
        "choose_granularity": lambda y: partition.choose_granularity(x[: len(y)], y, 2),
        "make_clients": lambda y: meta.make_clients(x[: len(y)], y, torch.arange(len(y)) % 2),
        "follow_stream": lambda y: drift.follow_stream(x[: len(y)].reshape(-1, 2, 2) if len(y) else x[:0].view(0, 2, 2),
                                                       np.asarray(y).reshape(-1, 2) if len(y) else torch.zeros(0, 2),
                                                       warmup=1),
    }


@pytest.mark.parametrize("entry", ["check_ordinal", "fit", "profile_data", "adaptive_partition", "choose_granularity",
                                   "make_clients", "follow_stream"])
@pytest.mark.parametrize("labels, message", BAD_LABELS[:6])
def test_every_entry_point_rejects_bad_labels_naming_y_and_the_values(entry, labels, message):
    with pytest.raises(ValueError, match=message):
        _entry_points()[entry](labels)


@pytest.mark.parametrize("labels, message", BAD_LABELS[6:])
def test_non_finite_and_empty_labels_are_named(labels, message):
    with pytest.raises(ValueError, match=message):
        ordinal.check_ordinal(labels)


@pytest.mark.parametrize("entry", ["profile_data", "adaptive_partition", "fit"])
def test_entry_points_name_a_row_count_mismatch(entry):
    from adaptive_kit.federated import profile
    from adaptive_kit.federated import subsets as partition

    x, y = torch.randn(10, 2), torch.arange(9) % 2
    call = {"profile_data": lambda: profile.profile_data(x, y, clusters=2, k=2),
            "adaptive_partition": lambda: partition.adaptive_partition(x, y, 0.5, 2),
            "fit": lambda: ordinal.fit(x, y)}[entry]
    with pytest.raises(ValueError, match="y has 9 rows, x has 10"):
        call()


def test_string_and_infinite_features_are_named():
    from adaptive_kit.federated.checks import check_features

    with pytest.raises(ValueError, match="x must be numeric, got non-numeric values"):
        check_features(np.array([["a", "b"]]))
    x = torch.zeros(3, 2)
    x[1, 0] = float("inf")
    with pytest.raises(ValueError, match="row 1, column 0\\): inf"):
        check_features(x)


@pytest.mark.parametrize("steps, message", [((-1,), "steps must be ints >= 0, got \\[-1\\]"),
                                            ((0, 1.5), "steps must be ints >= 0, got \\[1.5\\]"),
                                            ((), "at least one step count"),
                                            ((True,), "steps must be ints >= 0, got \\[True\\]")])
def test_evaluate_rejects_negative_fractional_and_empty_steps(steps, message):
    from adaptive_kit.federated import meta

    x, y = torch.randn(30, 2), torch.arange(30) % 2
    clients = meta.make_clients(x, y, torch.arange(30) % 2)
    with pytest.raises(ValueError, match=message):
        meta.evaluate(torch.zeros(3, dtype=torch.float64), clients, steps)
    with pytest.raises(ValueError, match="split must be one of"):
        meta.evaluate(torch.zeros(3, dtype=torch.float64), clients, (0,), split="holdout")
