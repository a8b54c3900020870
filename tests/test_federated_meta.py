"""The federated meta-learner: clients, local steps against hand-written gradients, the server
loop (best model, step halving, failures) and gloo ranks against one process."""
import pickle

import pytest
import torch

from adaptive_kit.federated import data, meta, ordinal
from adaptive_kit.federated.meta import (
    FederatedConfig,
    MetaModel,
    adapt,
    evaluate,
    make_clients,
    train,
)

# a small, learnable problem: 4 regimes of unequal size, 3 ordered classes
FAST = {"rounds": 6, "local_steps": 3, "local_lr": 0.1, "server_lr": 0.1}


@pytest.fixture(scope="module")
def clients():
    d, regime = data.mixture(n=800, regimes=4, classes=3, separation=2.0, seed=0)
    return make_clients(d.x, d.y, regime)


def start(c, cfg):
    """The model ``train`` starts from."""
    p = ordinal.init_params(c.features, c.classes)
    steps = (torch.eye(p.numel(), dtype=p.dtype) if cfg.method == "metacurv" else torch.ones_like(p)) * cfg.local_lr
    return MetaModel(p, steps)


def val_loss(model, c):
    """What the server tracks: mean validation loss after one adaptation step."""
    return float(evaluate(model, c, (1,), split="val")[1]["loss"].mean())


def rows(c, split, i):
    m = c.mask[split][i].bool()
    return c.x[split][i][m], c.y[split][i][m]


# --- clients ---------------------------------------------------------------------------------

def test_make_clients_splits_each_part_disjointly_and_completely():
    g = torch.Generator().manual_seed(0)
    n = 103
    x = torch.cat([torch.arange(n, dtype=torch.float32)[:, None], torch.randn(n, 2, generator=g)], 1)
    y = torch.arange(n) % 3
    labels = torch.randint(0, 4, (n,), generator=g)
    c = make_clients(x, y, labels, val_fraction=0.2, test_fraction=0.3, seed=1)
    sizes = torch.bincount(labels)
    assert c.n == 4 and c.classes == 3 and c.features == 3 and torch.equal(c.ids, torch.arange(4))
    for s in meta.SPLITS:
        assert c.x[s].dtype == torch.float64 and c.y[s].dtype == torch.long
        assert c.x[s].shape == (4, int(c.mask[s].sum(1).max()), 3)
        assert c.y[s].shape == c.mask[s].shape == c.x[s].shape[:2]
        # real rows first, padding (zeros) after
        m = c.mask[s]
        assert torch.equal(m, (torch.arange(m.shape[1]) < m.sum(1, keepdim=True)).double())
        assert (c.x[s][m == 0] == 0).all() and (c.y[s][m == 0] == 0).all()
    for p in range(4):
        ids = {s: rows(c, s, p)[0][:, 0].long().tolist() for s in meta.SPLITS}
        every = ids["train"] + ids["val"] + ids["test"]
        assert len(every) == len(set(every))  # disjoint
        assert sorted(every) == (labels == p).nonzero()[:, 0].tolist()  # covering the part
        assert len(ids["val"]) == max(1, round(int(sizes[p]) * 0.2))
        assert len(ids["test"]) == max(1, round(int(sizes[p]) * 0.3))
        for s in meta.SPLITS:  # labels travel with their rows
            xs, ys = rows(c, s, p)
            assert torch.equal(ys, y[xs[:, 0].long()])
    assert torch.equal(c.sizes, c.mask["train"].sum(1))
    again = make_clients(x, y, labels, val_fraction=0.2, test_fraction=0.3, seed=1)
    other = make_clients(x, y, labels, val_fraction=0.2, test_fraction=0.3, seed=2)
    assert torch.equal(again.x["val"], c.x["val"]) and not torch.equal(other.x["val"], c.x["val"])


def test_subset_keeps_the_chosen_clients_and_their_ids(clients):
    sub = clients.subset([3, 1])
    assert sub.ids.tolist() == [3, 1] and sub.n == 2
    for s in meta.SPLITS:
        assert torch.equal(sub.x[s][0], clients.x[s][3]) and torch.equal(sub.mask[s][1], clients.mask[s][1])


@pytest.mark.parametrize("kwargs, message", [
    ({"val_fraction": 0.0}, "val_fraction must be in \\(0, 1\\), got 0.0"),
    ({"test_fraction": 1.0}, "test_fraction must be in \\(0, 1\\), got 1.0"),
    ({"val_fraction": 0.5, "test_fraction": 0.5}, "val_fraction \\+ test_fraction must be < 1"),
])
def test_make_clients_rejects_bad_fractions(kwargs, message):
    x, y = torch.randn(30, 2), torch.arange(30) % 2
    with pytest.raises(ValueError, match=message):
        make_clients(x, y, torch.arange(30) % 3, **kwargs)


def test_make_clients_names_nan_rows_and_tiny_parts_and_mismatches():
    x, y = torch.randn(30, 2), torch.arange(30) % 2
    bad = x.clone()
    bad[11, 1] = float("nan")
    with pytest.raises(ValueError, match="row 11, column 1"):
        make_clients(bad, y, torch.zeros(30, dtype=torch.long))
    labels = torch.zeros(30, dtype=torch.long)
    labels[[4, 9]] = 1
    with pytest.raises(ValueError, match="part 1 has 2 row\\(s\\); a client needs at least 3"):
        make_clients(x, y, labels)
    with pytest.raises(ValueError, match="same rows, got 30, 30, 29"):
        make_clients(x, y, labels[:29])
    with pytest.raises(ValueError, match="single class"):
        make_clients(x, torch.zeros(30, dtype=torch.long), torch.arange(30) % 3)


# --- local steps -----------------------------------------------------------------------------

def hand_gradient(p, c, i, l2, anchor=None, mu=0.0):
    """The gradient of client i's train objective by autograd on its real rows only."""
    x, y = rows(c, "train", i)
    q = p.detach().clone().requires_grad_(True)
    loss = ordinal.nll(q, x, y, c.classes) + l2 * (q[: c.features] ** 2).sum()
    if anchor is not None:
        loss = loss + 0.5 * mu * ((q - anchor) ** 2).sum()
    loss.backward()
    return q.grad


def test_adapt_with_no_steps_returns_the_start(clients):
    p = ordinal.init_params(clients.features, clients.classes) + 0.1
    out = adapt(p, clients, 0, 0.5)
    assert out.shape == (clients.n, p.numel()) and torch.equal(out, p.expand(clients.n, -1))
    per = torch.randn(clients.n, p.numel(), dtype=torch.float64)
    assert torch.equal(adapt(per, clients, 0, 0.5), per)


def test_adapt_with_a_scalar_lr_is_a_plain_gradient_step(clients):
    p = ordinal.init_params(clients.features, clients.classes, clients.y["train"][0])
    out = adapt(p, clients, 1, 0.3, l2=1e-2)
    for i in range(clients.n):
        torch.testing.assert_close(out[i], p - 0.3 * hand_gradient(p, clients, i, 1e-2), atol=1e-12, rtol=0)
    two = adapt(p, clients, 2, 0.3, l2=1e-2)
    again = adapt(out, clients, 1, 0.3, l2=1e-2)  # steps compose, per client
    torch.testing.assert_close(two, again, atol=1e-12, rtol=0)


def test_adapt_with_a_vector_or_matrix_lr(clients):
    p = ordinal.init_params(clients.features, clients.classes) + 0.05
    k = p.numel()
    g = torch.Generator().manual_seed(0)
    vec = torch.rand(k, generator=g, dtype=torch.float64)
    mat = torch.rand(k, k, generator=g, dtype=torch.float64) * 0.2
    by_vec, by_mat = adapt(p, clients, 1, vec), adapt(p, clients, 1, mat)
    for i in range(clients.n):
        gi = hand_gradient(p, clients, i, 1e-4)
        torch.testing.assert_close(by_vec[i], p - vec * gi, atol=1e-12, rtol=0)
        torch.testing.assert_close(by_mat[i], p - mat @ gi, atol=1e-12, rtol=0)
    # a diagonal matrix is the vector step
    torch.testing.assert_close(adapt(p, clients, 2, torch.diag(vec)), adapt(p, clients, 2, vec), atol=1e-12, rtol=0)


def test_adapt_prox_term_pulls_towards_the_anchor(clients):
    p = ordinal.init_params(clients.features, clients.classes) + 0.2
    anchor = torch.zeros_like(p)
    out = adapt(p, clients, 1, 0.5, prox=(anchor, 2.0))
    for i in range(clients.n):
        torch.testing.assert_close(out[i], p - 0.5 * hand_gradient(p, clients, i, 1e-4, anchor, 2.0), atol=1e-12, rtol=0)


def test_evaluate_reports_per_client_metrics_in_range_and_matching_a_direct_count(clients):
    p = ordinal.fit(torch.cat([rows(clients, "train", i)[0] for i in range(clients.n)]),
                    torch.cat([rows(clients, "train", i)[1] for i in range(clients.n)])).params
    ev = evaluate(p, clients, steps=(0, 2), lr=0.1)
    assert set(ev) == {0, 2}
    for s in ev:
        for key in ("accuracy", "mae", "loss"):
            assert ev[s][key].shape == (clients.n,) and torch.isfinite(ev[s][key]).all()
        assert ((ev[s]["accuracy"] >= 0) & (ev[s]["accuracy"] <= 1)).all()
        assert ((ev[s]["mae"] >= 0) & (ev[s]["mae"] <= clients.classes - 1)).all()
        assert (ev[s]["loss"] > 0).all()
    for i in range(clients.n):  # step 0 is the global model on the unpadded test rows
        x, y = rows(clients, "test", i)
        acc = (ordinal.predict(p, x, clients.classes) == y).double().mean()
        assert float(ev[0]["accuracy"][i]) == pytest.approx(float(acc), abs=1e-12)
        assert float(ev[0]["mae"][i]) == pytest.approx(ordinal.mae(p, x, y, clients.classes), abs=1e-6)
        assert float(ev[0]["loss"][i]) == pytest.approx(float(ordinal.nll(p, x, y, clients.classes)), abs=1e-12)


def test_guarded_adaptation_never_leaves_a_client_worse_on_validation_than_its_start(clients):
    # a step far too large: plain adaptation ruins clients, the guard keeps each one's best iterate
    start_params = ordinal.init_params(clients.features, clients.classes) + 0.3
    plain = evaluate(start_params, clients, (0, 1, 5), lr=50.0, split="val")
    kept = evaluate(start_params, clients, (0, 1, 5), lr=50.0, split="val", guard=True)
    assert (plain[5]["loss"] > plain[0]["loss"]).any()
    for s in (1, 5):
        assert (kept[s]["loss"] <= kept[0]["loss"] + 1e-12).all()
        assert (kept[s]["loss"] <= plain[s]["loss"] + 1e-12).all()
    assert (kept[5]["loss"] <= kept[1]["loss"] + 1e-12).all()  # "at most 5 steps" includes 1
    # with a sensible step the guard changes nothing where every step helps
    fine = evaluate(start_params, clients, (0, 1), lr=0.05, split="val")
    fine_kept = evaluate(start_params, clients, (0, 1), lr=0.05, split="val", guard=True)
    helped = fine[1]["loss"] < fine[0]["loss"]
    assert torch.allclose(fine[1]["mae"][helped], fine_kept[1]["mae"][helped])


def test_damped_newton_adaptation_converges_to_each_clients_own_fit(clients):
    # an L-BFGS fit per client is the oracle: Newton steps with a tiny damping reach it
    alone = meta.local_only(clients, l2=1e-4)
    start_params = ordinal.init_params(clients.features, clients.classes)
    p = adapt(start_params, clients, 15, 1.0, 1e-4, newton=1e-8)
    assert torch.allclose(p, alone, atol=1e-4)
    # a large damping is a small gradient step: lr / damping
    big = adapt(start_params, clients, 1, 1.0, 1e-4, newton=1e4)
    grad_step = adapt(start_params, clients, 1, 1e-4, 1e-4)
    assert torch.allclose(big, grad_step, atol=1e-6)
    with pytest.raises(ValueError, match="newton damping must be > 0"):
        adapt(start_params, clients, 1, 1.0, newton=0.0)


def test_local_only_is_each_client_fitted_alone(clients):
    alone = meta.local_only(clients)
    assert alone.shape == (clients.n, clients.features + clients.classes - 1)
    for i in range(clients.n):
        x, y = rows(clients, "train", i)
        fit = ordinal.fit(x, y, clients.classes, l2=1e-4, max_iter=100)
        torch.testing.assert_close(alone[i], fit.params, atol=1e-6, rtol=0)
    # the converged fit is at least as good on its own train rows as a few gradient steps
    steps = adapt(ordinal.init_params(clients.features, clients.classes), clients, 20, 0.1)
    for i in range(clients.n):
        x, y = rows(clients, "train", i)
        assert ordinal.nll(alone[i], x, y, clients.classes) <= ordinal.nll(steps[i], x, y, clients.classes)


# --- the server loop -------------------------------------------------------------------------

@pytest.mark.parametrize("method", meta.METHODS)
def test_every_method_improves_validation_loss(clients, method):
    cfg = FederatedConfig(method=method, **FAST)
    result = train(clients, cfg)
    before, after = val_loss(start(clients, cfg), clients), val_loss(result.model, clients)
    assert after < before - 1e-3, (method, before, after)
    assert torch.isfinite(result.model.params).all() and not result.failed
    p = result.model.params.numel()
    sent = p + (p if method == "metasgd" else p * p if method == "metacurv" else 0)
    assert result.bytes_per_client == 2 * 8 * sent * (1 if method == "oneshot" else cfg.rounds)
    if method == "oneshot":
        assert result.history == []
    else:
        assert len(result.history) == cfg.rounds
        assert after == pytest.approx(result.history[-1]["best_val_loss"], abs=1e-12)
    if method == "metasgd":  # learns its own positive step sizes
        assert (result.model.steps > 0).all() and not torch.allclose(result.model.steps, start(clients, cfg).steps)


def test_fedavg_with_one_client_and_one_round_is_local_training(clients):
    one = clients.subset([2])
    cfg = FederatedConfig(method="fedavg", rounds=1, local_steps=4, local_lr=0.1)
    seen = []
    result = train(one, cfg, on_step=lambda r, model, row: seen.append(model.params.clone()))
    expected = adapt(ordinal.init_params(one.features, one.classes), one, 4, 0.1, cfg.l2)[0]
    torch.testing.assert_close(seen[0], expected, atol=1e-12, rtol=0)
    assert result.best_round == 0  # local training helps its own validation rows here
    torch.testing.assert_close(result.model.params, expected, atol=1e-12, rtol=0)


def test_fedprox_without_the_proximal_term_is_fedavg(clients):
    a = train(clients, FederatedConfig(method="fedavg", **FAST))
    b = train(clients, FederatedConfig(method="fedprox", mu=0.0, **FAST))
    torch.testing.assert_close(a.model.params, b.model.params, atol=1e-12, rtol=0)
    c = train(clients, FederatedConfig(method="fedprox", mu=5.0, **FAST))
    assert not torch.allclose(a.model.params, c.model.params)


@pytest.fixture(scope="module")
def reptile_run(clients):
    """Reptile with a large server step: validation improves, then stalls, so the step halves."""
    cfg = FederatedConfig(method="reptile", rounds=12, local_steps=3, local_lr=0.1, server_lr=0.3, patience=2)
    models = []
    result = train(clients, cfg, on_step=lambda r, model, row: models.append(MetaModel(model.params.clone(), model.steps.clone())))
    return cfg, result, models


def test_the_best_model_on_validation_is_returned(clients, reptile_run):
    cfg, result, models = reptile_run
    init = val_loss(start(clients, cfg), clients)
    losses = [h["val_loss"] for h in result.history]
    best = [h["best_val_loss"] for h in result.history]
    assert all(b2 <= b1 for b1, b2 in zip(best, best[1:]))  # non-increasing
    assert best == pytest.approx([min([init, *losses[: r + 1]]) for r in range(len(losses))], abs=1e-12)
    assert 0 <= result.best_round < cfg.rounds - 1  # it did not keep improving to the end
    assert result.best_round == min(range(len(losses)), key=losses.__getitem__)
    torch.testing.assert_close(result.model.params, models[result.best_round].params, atol=0, rtol=0)
    assert val_loss(result.model, clients) == pytest.approx(min(losses), abs=1e-12)
    for model, loss in zip(models, losses):  # the history is the loss of the model after each round
        assert val_loss(model, clients) == pytest.approx(loss, abs=1e-12)


def test_server_step_halves_after_patience_stale_rounds(clients, reptile_run):
    cfg, result, _ = reptile_run
    best, stale, lr, expected = val_loss(start(clients, cfg), clients), 0, cfg.server_lr, []
    for h in result.history:
        if h["val_loss"] < best - 1e-9:
            best, stale = h["val_loss"], 0
        else:
            stale += 1
            if stale >= cfg.patience:
                lr, stale = lr / 2, 0
        expected.append(lr)
    assert [h["server_lr"] for h in result.history] == expected
    assert min(expected) <= cfg.server_lr / 4  # it halved at least twice in this run


@pytest.mark.parametrize("method", ["fedavg", "metasgd", "metacurv"])
def test_a_failed_client_is_dropped_from_that_round_only(clients, method):
    cfg = FederatedConfig(method=method, rounds=1, local_steps=2, local_lr=0.1, server_lr=0.1)
    after = {}

    def keep(name):
        return lambda r, model, row: after.__setitem__(name, (model.params.clone(), model.steps.clone(), dict(row)))

    faulty = train(clients, cfg, fail={0: [1]}, on_step=keep("faulty"))
    train(clients.subset([0, 2, 3]), cfg, on_step=keep("others"))
    assert faulty.failed == [(0, 1)]
    assert faulty.history[0]["failed"] == 1 and after["others"][2]["failed"] == 0
    torch.testing.assert_close(after["faulty"][0], after["others"][0], atol=1e-12, rtol=0)
    torch.testing.assert_close(after["faulty"][1], after["others"][1], atol=1e-12, rtol=0)
    assert torch.isfinite(faulty.model.params).all() and torch.isfinite(faulty.model.steps).all()
    assert all(torch.isfinite(torch.tensor(h["val_loss"])) for h in faulty.history)


def test_failures_over_several_rounds_are_all_reported_and_training_goes_on(clients):
    cfg = FederatedConfig(method="metasgd", **FAST)
    result = train(clients, cfg, fail={0: [3], 2: [0, 2], 9: [1]})  # round 9 does not exist
    assert result.failed == [(0, 3), (2, 0), (2, 2)]
    assert [h["failed"] for h in result.history] == [1, 0, 2, 0, 0, 0]
    assert torch.isfinite(result.model.params).all()
    assert result.history[-1]["best_val_loss"] < val_loss(start(clients, cfg), clients)


@pytest.mark.parametrize("method", ["fedavg", "reptile", "metacurv"])
def test_all_clients_failing_leaves_the_model_unchanged_that_round(clients, method):
    cfg = FederatedConfig(method=method, rounds=3, local_steps=2, local_lr=0.1, server_lr=0.1)
    seen = []
    result = train(clients, cfg, fail={1: [0, 1, 2, 3]},
                   on_step=lambda r, model, row: seen.append((model.params.clone(), model.steps.clone())))
    assert result.failed == [(1, i) for i in range(4)]
    assert torch.equal(seen[1][0], seen[0][0]) and torch.equal(seen[1][1], seen[0][1])
    assert not torch.equal(seen[2][0], seen[1][0])  # and training resumes
    assert result.history[1]["val_loss"] == result.history[0]["val_loss"]


def test_oneshot_drops_a_failed_client_from_the_average(clients):
    cfg = FederatedConfig(method="oneshot", rounds=2, local_steps=3, local_lr=0.1)
    faulty = train(clients, cfg, fail={0: [2]})
    others = train(clients.subset([0, 1, 3]), cfg)
    assert faulty.failed == [(0, 2)]
    torch.testing.assert_close(faulty.model.params, others.model.params, atol=1e-12, rtol=0)
    local = adapt(ordinal.init_params(clients.features, clients.classes), clients, 6, 0.1, cfg.l2)
    w = clients.sizes[[0, 1, 3]]
    torch.testing.assert_close(faulty.model.params, (local[[0, 1, 3]] * w[:, None]).sum(0) / w.sum(), atol=1e-12, rtol=0)


@pytest.mark.parametrize("field, value, message", [
    ("method", "fedsgd", "method must be one of"),
    ("rounds", 0, "rounds must be an int >= 1, got 0"),
    ("rounds", True, "rounds must be an int >= 1, got True"),
    ("rounds", 2.0, "rounds must be an int >= 1, got 2.0"),
    ("local_steps", -1, "local_steps must be an int >= 1"),
    ("patience", 0, "patience must be an int >= 1, got 0"),
    ("local_lr", 0.0, "local_lr must be a finite number > 0, got 0.0"),
    ("local_lr", float("inf"), "local_lr must be a finite number > 0, got inf"),
    ("server_lr", -0.1, "server_lr must be a finite number > 0"),
    ("mu", -1.0, "mu must be a finite number >= 0, got -1.0"),
    ("mu", float("nan"), "mu must be a finite number >= 0, got nan"),
    ("l2", "0.1", "l2 must be a finite number >= 0"),
])
def test_meta_config_names_the_bad_field(field, value, message):
    with pytest.raises(ValueError, match=message):
        FederatedConfig(**{field: value})


def test_train_distributed_refuses_more_ranks_than_clients(clients):
    with pytest.raises(ValueError, match="world_size 5 exceeds the 4 clients"):
        meta.train_distributed(clients, FederatedConfig(rounds=1), world_size=5)


# --- clients as gloo ranks -------------------------------------------------------------------

DIST_FAIL = {1: [4]}


@pytest.fixture(scope="module")
def distributed_runs():
    """Six clients on two ranks, three rounds, a failure in round 1: Meta-Curvature through the
    spawned workers (the default, importing ``meta._worker`` by name), FedAvg forked (fast)."""
    d, regime = data.mixture(n=600, regimes=6, classes=3, separation=2.0, regime_weights=None, seed=1)
    c = make_clients(d.x, d.y, regime)
    out = {}
    for method, start_method in (("metacurv", "spawn"), ("fedavg", "fork")):
        cfg = FederatedConfig(method=method, rounds=3, local_steps=2, local_lr=0.1, server_lr=0.1, patience=1)
        out[method] = (meta.train_distributed(c, cfg, world_size=2, fail=DIST_FAIL, timeout_s=100,
                                              start_method=start_method),
                       train(c, cfg, fail=DIST_FAIL))
    return out


@pytest.mark.timeout(120)
@pytest.mark.parametrize("method", ["metacurv", "fedavg"])
def test_clients_as_ranks_equal_one_process(distributed_runs, method):
    ranks, one = distributed_runs[method]
    torch.testing.assert_close(ranks.model.params, one.model.params, atol=1e-10, rtol=0)
    torch.testing.assert_close(ranks.model.steps, one.model.steps, atol=1e-10, rtol=0)
    assert ranks.failed == one.failed == [(1, 4)]
    assert ranks.bytes_per_client == one.bytes_per_client > 0
    assert ranks.best_round == one.best_round
    assert len(ranks.history) == len(one.history) == 3
    for a, b in zip(ranks.history, one.history):
        assert a["val_loss"] == pytest.approx(b["val_loss"], abs=1e-10)
        assert (a["server_lr"], a["failed"]) == (b["server_lr"], b["failed"])
    pickle.dumps(ranks)  # the result came back by value
