"""How the swarm groups members: one vmap per architecture group of at least ``vmap_min`` members,
a plain module per member otherwise; both match per-member torch.optim.SGD training."""
import dataclasses

import numpy as np
import pytest
import torch
from torch import nn

from adaptive_kit.datasets import digits
from adaptive_kit.swarm import RANDOM_SEARCH, Layer, MemberSpec, Swarm, SwarmConfig, build_model


@pytest.fixture(scope="module")
def data():
    return digits(seed=0)


A, B, C = (Layer("linear", 16),), (Layer("linear", 8, "tanh"), Layer("linear", 8)), (Layer("conv", 2),)


def specs_of(layers, lrs=(0.05, 0.1, 0.02), batch_size=16):
    return [MemberSpec(layers, lr=lr, momentum=0.1 * i, weight_decay=1e-4 * i, batch_size=batch_size)
            for i, lr in enumerate(lrs)]


def config(n, **kw):
    return SwarmConfig(members=n, steps_per_round=7, seed=3, eval_rows=128, optimiser=RANDOM_SEARCH,
                       image_shape=(1, 8, 8), **kw)


def ids(groups):
    return sorted(sorted(m.id for m in g) for g in groups)


def test_groups_split_by_architecture_batch_size_and_vmap_min(data):
    specs = specs_of(A) + specs_of(B, (0.1, 0.2)) + specs_of(A, (0.3,), batch_size=8) + specs_of(C, (0.1,))
    with Swarm(data, config(len(specs), vmap_min=2), specs=specs) as swarm:
        assert ids(swarm.groups(swarm.members)) == [[0, 1, 2], [3, 4], [5], [6]]
    with Swarm(data, config(len(specs), vmap_min=3), specs=specs) as swarm:
        assert ids(swarm.groups(swarm.members)) == [[0, 1, 2], [3], [4], [5], [6]]
    with Swarm(data, config(len(specs), batched=False), specs=specs) as swarm:
        assert ids(swarm.groups(swarm.members)) == [[i] for i in range(7)]


def test_by_default_every_pair_of_one_architecture_trains_batched(data):
    specs = specs_of(A, (0.1, 0.2)) + specs_of(B, (0.1,)) + specs_of(C, (0.1, 0.2, 0.3))
    with Swarm(data, config(6), specs=specs, device="cpu") as swarm:
        assert ids(swarm.groups(swarm.members)) == [[0, 1], [2], [3, 4, 5]]


@pytest.mark.parametrize("kw", [{"vmap_min": 1}, {"vmap_min": 2.0}, {"vmap_min": True}, {"vmap_min": None}])
def test_vmap_min_is_checked(kw):
    with pytest.raises(ValueError, match="vmap_min"):
        SwarmConfig(**kw)


def test_a_group_of_one_takes_the_plain_module_path(data, monkeypatch):
    specs = specs_of(A, (0.1, 0.2)) + specs_of(B, (0.1,))
    with Swarm(data, config(3, vmap_min=2), specs=specs) as swarm:
        calls = {"one": [], "batched": []}
        one, batched = swarm._steps_one, swarm._steps_batched
        monkeypatch.setattr(swarm, "_steps_one", lambda m, idx: calls["one"].append(m.id) or one(m, idx))
        monkeypatch.setattr(swarm, "_steps_batched",
                            lambda ms, n, idx: calls["batched"].append([m.id for m in ms]) or batched(ms, n, idx))
        swarm.run(2, progress=False)
        assert calls == {"one": [2, 2], "batched": [[0, 1], [0, 1]]}
        # the lone member's weights are its module's parameters, trained in place
        net = swarm._nets[2][1]
        assert all(w.data_ptr() == p.data_ptr() for w, p in zip(swarm.members[2].params.values(), net.parameters()))


def plain_sgd(swarm, init, gens, steps):
    """Each member trained alone by torch.optim.SGD from ``init`` on the batches of its generator."""
    out = []
    for m, params, g in zip(swarm.members, init, gens):
        net = build_model(m.spec, swarm.n_features, swarm.n_classes, swarm.config.image_shape)
        net.load_state_dict(params)
        opt = torch.optim.SGD(net.parameters(), lr=m.spec.lr, momentum=m.spec.momentum,
                              weight_decay=m.spec.weight_decay)
        for _ in range(steps):
            idx = torch.randint(0, len(swarm.x), (m.spec.batch_size,), generator=g)
            loss = nn.functional.cross_entropy(net(swarm.x[idx]), swarm.y[idx])
            opt.zero_grad()
            loss.backward()
            opt.step()
        out.append({k: p.detach() for k, p in net.named_parameters()})
    return out


@pytest.mark.parametrize("vmap_min", [2, 5])  # 2: A's three members in one vmap; 5: every member alone
def test_grouped_training_matches_per_member_torch_sgd(data, vmap_min):
    specs = specs_of(A) + specs_of(C, (0.1,)) + specs_of(B, (0.2,))
    with Swarm(data, config(len(specs), vmap_min=vmap_min), specs=specs) as swarm:
        init = [{k: v.clone() for k, v in m.params.items()} for m in swarm.members]
        gens = []
        for m in swarm.members:
            g = torch.Generator()
            g.set_state(m.gen.get_state())
            gens.append(g)
        swarm.run(3, progress=False)
        assert [m.steps for m in swarm.members] == [21] * len(specs)
        for m, ref in zip(swarm.members, plain_sgd(swarm, init, gens, 21)):
            for k, v in ref.items():
                torch.testing.assert_close(m.params[k], v, atol=1e-5, rtol=1e-4)


def test_a_member_moving_between_paths_keeps_its_weights(data):
    specs = specs_of(A, (0.1, 0.2))
    with Swarm(data, config(2, vmap_min=2), specs=specs) as a, \
            Swarm(data, config(2, vmap_min=2), specs=specs) as b:
        a.run(1, progress=False)
        b.run(1, progress=False)
        b.config = dataclasses.replace(b.config, vmap_min=3)  # b's next round: member by member
        a.run(1, progress=False)
        b.run(1, progress=False)
        for ma, mb in zip(a.members, b.members):
            for k in ma.params:
                torch.testing.assert_close(ma.params[k], mb.params[k], atol=1e-5, rtol=1e-4)
                torch.testing.assert_close(ma.buf[k], mb.buf[k], atol=1e-5, rtol=1e-4)
        b.config = dataclasses.replace(b.config, vmap_min=2)  # and back into one vmap
        a.run(1, progress=False)
        b.run(1, progress=False)
        for ma, mb in zip(a.members, b.members):
            for k in ma.params:
                torch.testing.assert_close(ma.params[k], mb.params[k], atol=1e-5, rtol=1e-4)


# --- devices and host synchronisation ---------------------------------------------------------------

def test_grouped_training_matches_torch_sgd_on_each_device(data, devices):
    specs = specs_of(A) + specs_of(B, (0.2,))
    with Swarm(data, config(4, vmap_min=2), specs=specs, device=devices) as swarm:
        assert swarm.x.device.type == devices and all(
            p.device.type == devices for m in swarm.members for p in m.params.values())
        init = [{k: v.cpu().clone() for k, v in m.params.items()} for m in swarm.members]
        gens = [torch.Generator().set_state(m.gen.get_state()) for m in swarm.members]
        swarm.run(2, progress=False)
        with Swarm(data, config(4, vmap_min=2), specs=specs, device="cpu") as ref:
            for m, ref_params in zip(swarm.members, plain_sgd(ref, init, gens, 14)):
                for k, v in ref_params.items():
                    torch.testing.assert_close(m.params[k].cpu(), v, atol=1e-4, rtol=1e-3)
        assert swarm.history()["device"].str.startswith(devices).all()


HOST_READS = ("item", "cpu", "tolist", "numpy", "__bool__", "__int__", "__float__")


def count_host_reads(monkeypatch) -> dict[str, int]:
    """Counts the calls of every Tensor method that reads a value back to the host."""
    counts = dict.fromkeys(HOST_READS, 0)
    for name in HOST_READS:
        orig = getattr(torch.Tensor, name)

        def counted(self, *a, _name=name, _orig=orig, **kw):
            counts[_name] += 1
            return _orig(self, *a, **kw)

        monkeypatch.setattr(torch.Tensor, name, counted)
    return counts


@pytest.mark.parametrize("vmap_min", [2, 5])
def test_host_reads_per_round_do_not_grow_with_steps(data, monkeypatch, vmap_min):
    """No .item(), .cpu() or truth test per step: a round of 12 steps reads back from the device
    as often as a round of 3."""
    reads = {}
    for steps in (3, 12):
        specs = specs_of(A) + specs_of(B, (0.2,))
        cfg = dataclasses.replace(config(4, vmap_min=vmap_min), steps_per_round=steps)
        with Swarm(data, cfg, specs=specs) as swarm:
            swarm.step()
            with monkeypatch.context() as mp:
                counts = count_host_reads(mp)
                swarm.step()
            reads[steps] = dict(counts)
    assert reads[3] == reads[12]
    assert reads[3]["cpu"] > 0  # the counting works: the evaluation reads its metrics back once a round


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")
@pytest.mark.parametrize("vmap_min", [2, 5])
def test_cuda_synchronisations_per_round_do_not_grow_with_steps(data, vmap_min):
    """torch.cuda.set_sync_debug_mode counts every synchronising call; a round of 12 steps makes
    as many as a round of 3 (its batches go over in one copy, its losses come back in one)."""
    import warnings

    syncs = {}
    for steps in (3, 12):
        cfg = dataclasses.replace(config(4, vmap_min=vmap_min), steps_per_round=steps)
        with Swarm(data, cfg, specs=specs_of(A) + specs_of(B, (0.2,)), device="cuda") as swarm:
            swarm.step()
            torch.cuda.synchronize()
            with warnings.catch_warnings(record=True) as caught:
                warnings.simplefilter("always")
                torch.cuda.set_sync_debug_mode("warn")
                try:
                    ms = swarm.members
                    idx = torch.randint(0, len(swarm.x), (steps, 16), device="cuda")
                    swarm._steps_one(ms[3], idx)
                    if vmap_min == 2:
                        swarm._steps_batched(ms[:3], np.full(3, steps), idx[None].expand(3, -1, -1))
                finally:
                    torch.cuda.set_sync_debug_mode("default")
            syncs[steps] = sum("synchroniz" in str(w.message) for w in caught)
    assert syncs[3] == syncs[12], syncs


@pytest.mark.parametrize("layers", [A, B, (Layer("conv", 3, "gelu"), Layer("linear", 8, "tanh")), C])
def test_stacked_logits_equal_vmap_over_the_members(layers):
    from functools import partial

    from torch.func import vmap

    from adaptive_kit.swarm.steps import _logits, _stacked_logits

    torch.manual_seed(0)
    nets = [build_model(MemberSpec(layers), 64, 10, (1, 8, 8)) for _ in range(3)]
    params = {k: torch.stack([dict(n.named_parameters())[k].detach() for n in nets]) for k, _ in
              nets[0].named_parameters()}
    x = torch.randn(3, 5, 64)  # (G, B, F)
    want = vmap(partial(_logits, nets[0]))(params, x)
    torch.testing.assert_close(_stacked_logits(nets[0], params, x), want, atol=1e-5, rtol=1e-5)
    torch.testing.assert_close(want[1], nets[1](x[1]), atol=1e-5, rtol=1e-5)


def test_layers_the_stacked_path_does_not_know_go_through_vmap(data, monkeypatch):
    import adaptive_kit.swarm.steps as steps

    specs = specs_of(A) + specs_of(C, (0.1, 0.2))
    with Swarm(data, config(5), specs=specs) as a:
        a.run(2, progress=False)
    monkeypatch.setattr(steps, "BATCHABLE", ())
    with Swarm(data, config(5), specs=specs) as b:
        b.run(2, progress=False)
    for ma, mb in zip(a.members, b.members):
        assert ma.val_acc == pytest.approx(mb.val_acc, abs=1e-6)
        for k in ma.params:
            torch.testing.assert_close(ma.params[k], mb.params[k], atol=1e-5, rtol=1e-4)
