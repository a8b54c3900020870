"""The small MLP, its training config and the plain training loop."""
from __future__ import annotations

import math
import re

import numpy as np
import pytest
import torch
from torch import nn

from adaptive_kit.datasets import Split, digits
from adaptive_kit.training import TrainConfig, TrainResult, accuracy, mlp, train_classifier


@pytest.fixture(scope="module")
def data() -> Split:
    return digits()


def fresh_model(seed: int = 0) -> nn.Module:
    torch.manual_seed(seed)
    return mlp([64, 32, 10])


# --- mlp -------------------------------------------------------------------------------------

def test_mlp_layers():
    m = mlp([64, 32, 16, 10])
    kinds = [type(layer) for layer in m]
    assert kinds == [nn.Linear, nn.ReLU, nn.Linear, nn.ReLU, nn.Linear]  # no activation at the end
    assert [(layer.in_features, layer.out_features) for layer in m if isinstance(layer, nn.Linear)] == [
        (64, 32), (32, 16), (16, 10)]
    assert m(torch.zeros(5, 64)).shape == (5, 10)
    assert sum(p.numel() for p in m.parameters()) == 64 * 32 + 32 + 32 * 16 + 16 + 16 * 10 + 10

    single = mlp((3, 2), activation=nn.Tanh)
    assert [type(layer) for layer in single] == [nn.Linear]
    tanh = mlp([3, 4, 2], activation=nn.Tanh)
    assert isinstance(tanh[1], nn.Tanh)
    assert mlp([np.int64(4), 2])(torch.zeros(1, 4)).shape == (1, 2)


@pytest.mark.parametrize("sizes", [[64], [], [64, 0, 10], [64, -3], [64, 2.5, 10], [True, 4],
                                   [64, "8"]])
def test_mlp_rejects_bad_sizes(sizes):
    with pytest.raises(ValueError, match=re.escape(f"mlp(sizes={list(sizes)!r}): need at least two sizes")):
        mlp(sizes)


# --- TrainConfig -----------------------------------------------------------------------------

def test_train_config_defaults_are_valid():
    c = TrainConfig()
    assert (c.lr, c.momentum, c.batch_size, c.steps, c.seed) == (0.1, 0.9, 64, 200, 0)
    with pytest.raises(AttributeError):
        c.lr = 1.0  # frozen


@pytest.mark.parametrize(
    ("kwargs", "pattern"),
    [
        ({"lr": 0}, r"TrainConfig.lr must be a finite number (> 0|in \(0, inf\]), got 0"),
        ({"lr": -0.1}, r"TrainConfig.lr must be a finite number (> 0|in \(0, inf\]), got -0.1"),
        ({"lr": math.nan}, r"TrainConfig.lr must be a finite number (> 0|in \(0, inf\]), got nan"),
        ({"momentum": 1.0}, r"TrainConfig.momentum must be a finite number in \[0, 1\), got 1.0"),
        ({"momentum": -0.5}, r"TrainConfig.momentum must be a finite number in \[0, 1\), got -0.5"),
        ({"batch_size": 0}, r"TrainConfig.batch_size must be an int >= 1, got 0"),
        ({"batch_size": 8.0}, r"TrainConfig.batch_size must be an int >= 1, got 8.0"),
        ({"steps": True}, r"TrainConfig.steps must be an int >= 1, got True"),
        ({"steps": -5}, r"TrainConfig.steps must be an int >= 1, got -5"),
    ],
)
def test_train_config_rejects_bad_values(kwargs, pattern):
    with pytest.raises(ValueError, match=pattern):
        TrainConfig(**kwargs)


# --- training --------------------------------------------------------------------------------

def test_train_classifier_learns_digits(data):
    model = fresh_model(0)
    before = accuracy(model, data.x_test, data.y_test)
    result = train_classifier(model, data, TrainConfig(steps=150, seed=0), progress=False)
    assert isinstance(result, TrainResult)
    assert result.steps_run == 150
    assert result.losses.shape == (150,) and result.losses.dtype == np.float32
    assert np.isfinite(result.losses).all()
    assert result.losses[:20].mean() > 1.5  # about ln(10) = 2.3 at the start
    assert result.losses[-20:].mean() < 0.5 * result.losses[:20].mean()
    assert before < 0.3
    assert result.test_accuracy > 0.85
    # the reported accuracy is the model's accuracy on the test split, and eval mode was undone
    assert result.test_accuracy == pytest.approx(accuracy(model, data.x_test, data.y_test))
    assert model.training


def test_train_classifier_is_deterministic(data):
    cfg = TrainConfig(steps=40, seed=3)
    a = train_classifier(fresh_model(1), data, cfg, progress=False)
    b = train_classifier(fresh_model(1), data, cfg, progress=False)
    np.testing.assert_array_equal(a.losses, b.losses)
    assert a.test_accuracy == b.test_accuracy
    # another batch order (same initial weights) gives another run
    c = train_classifier(fresh_model(1), data, TrainConfig(steps=40, seed=4), progress=False)
    assert not np.array_equal(a.losses, c.losses)
    assert a.losses[0] != c.losses[0] or a.losses[1] != c.losses[1]


def test_on_step_sees_every_step_and_can_stop(data):
    seen = []

    def on_step(step, loss, model):
        assert isinstance(loss, torch.Tensor) and loss.dim() == 0
        assert isinstance(model, nn.Module)
        seen.append((step, float(loss)))
        return False if step == 9 else None

    result = train_classifier(fresh_model(2), data, TrainConfig(steps=100), on_step=on_step,
                              progress=False)
    assert result.steps_run == 10
    assert [s for s, _ in seen] == list(range(10))
    assert result.losses.shape == (10,)
    np.testing.assert_allclose(result.losses, [v for _, v in seen])
    assert 0.0 <= result.test_accuracy <= 1.0

    # returning True or None keeps going
    result = train_classifier(fresh_model(2), data, TrainConfig(steps=5), on_step=lambda *a: True,
                              progress=False)
    assert result.steps_run == 5


def test_early_stop_matches_a_shorter_run(data):
    """Stopping after k steps leaves the same model as a run of k steps."""
    stopped = train_classifier(fresh_model(5), data, TrainConfig(steps=50, seed=1),
                               on_step=lambda step, loss, m: step < 11, progress=False)
    short = train_classifier(fresh_model(5), data, TrainConfig(steps=12, seed=1), progress=False)
    assert stopped.steps_run == 12
    np.testing.assert_array_equal(stopped.losses, short.losses)
    assert stopped.test_accuracy == short.test_accuracy


def test_accuracy_against_argmax_oracle(data):
    model = fresh_model(0)
    model.eval()
    with torch.no_grad():
        expected = (model(data.x_test).argmax(1) == data.y_test).double().mean().item()
    assert accuracy(model, data.x_test, data.y_test) == pytest.approx(expected)
    assert not model.training  # restored to what it was
