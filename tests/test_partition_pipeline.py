"""Partition plans run for real: fx stages, and pipelined training over gloo against one process."""
from __future__ import annotations

import functools
import os
import pickle
import socket
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from torch import nn

from adaptive_kit.partition.graph import model_graph, trace
from adaptive_kit.partition.models import GPT, Inception, ResMLP, TwoTower, uneven_mlp
from adaptive_kit.partition.pipeline import PipelineSpec, reference_run, run_pipeline
from adaptive_kit.partition.plan import is_valid_pipeline, partition_graph
from adaptive_kit.partition.stages import run_stages, stage_modules, stage_parameters

ROOT = Path(__file__).resolve().parents[1]
TORCHRUN_VARS = ("RANK", "WORLD_SIZE", "LOCAL_RANK", "LOCAL_WORLD_SIZE", "MASTER_ADDR",
                 "MASTER_PORT", "TORCHELASTIC_RUN_ID", "GROUP_RANK", "ROLE_RANK")
MLP = functools.partial(uneven_mlp, [8, 32, 16, 4])
SMALL_GPT = functools.partial(GPT, vocab=64, d=16, layers=2, heads=2, seq_len=8)
RES_MLP = functools.partial(ResMLP, d=16, blocks=3, hidden=32, out=4)


def models() -> dict[str, tuple[nn.Module, torch.Tensor]]:
    torch.manual_seed(0)
    return {
        "mlp": (MLP(), torch.randn(4, 8)),
        "resmlp": (RES_MLP(), torch.randn(4, 64)),
        "inception": (Inception(channels=4, blocks=2, classes=4), torch.randn(2, 3, 8, 8)),
        "two-tower": (TwoTower(d=8, deep=3, shallow=2, out=4), torch.randn(4, 64)),
        "gpt": (SMALL_GPT(), torch.randint(0, 64, (3, 8))),
    }


MODELS = models()


def node_names(gm) -> list[str]:
    return [n.name for n in gm.graph.nodes if n.op not in ("placeholder", "output")]


def cut_plan(names: list[str], *starts: str) -> dict[str, int]:
    """Contiguous stages of ``names``: a new stage begins at each of ``starts``."""
    return {n: sum(i >= names.index(s) for s in starts) for i, n in enumerate(names)}


def merged_state(results: list[dict]) -> dict[str, torch.Tensor]:
    state: dict[str, torch.Tensor] = {}
    for r in results:
        assert not set(state) & set(r["state"]), "a parameter on two ranks"
        state.update(r["state"])
    return state


def assert_matches_reference(results: list[dict], spec: PipelineSpec) -> None:
    ref = reference_run(spec)
    assert results[0]["losses"] == pytest.approx(ref["losses"], abs=1e-5)
    state = merged_state(results)
    assert set(state) == set(ref["state"])
    for name, value in ref["state"].items():
        torch.testing.assert_close(state[name], value, atol=1e-5, rtol=0, msg=name)


# --- stage modules -----------------------------------------------------------------------------

@pytest.mark.parametrize("name", list(MODELS))
def test_stages_of_partition_graph_plans_compose_to_the_model_exactly(name):
    model, x = MODELS[name]
    gm = trace(model)
    g = model_graph(gm, x, reps=0)
    expected = gm(x)
    for k in (1, 2, 3, 4):
        plan = partition_graph(g, k, cost="flops")
        assert is_valid_pipeline(g, plan.stage_of)
        stages = stage_modules(gm, plan.stage_of, k)
        assert len(stages) == k
        assert torch.equal(run_stages(stages, x), expected)
        names = stage_parameters(gm, plan.stage_of, k)
        used = [n for ns in names for n in ns]
        assert sorted(used) == sorted(n for n, _ in gm.named_parameters())  # each once
        for stage, ns in zip(stages, names):
            assert sorted(n for n, _ in stage.named_parameters()) == sorted(ns)


@settings(max_examples=25, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(name=st.sampled_from(list(MODELS)), data=st.data())
def test_any_cuts_of_the_topological_order_compose_exactly(name, data):
    model, x = MODELS[name]
    gm = trace(model)
    names = node_names(gm)
    k = data.draw(st.integers(1, 5), label="k")
    cuts = data.draw(st.lists(st.integers(1, len(names) - 1), min_size=k - 1, max_size=k - 1,
                              unique=True).map(sorted), label="cuts")
    plan = cut_plan(names, *(names[c] for c in cuts))
    assert torch.equal(run_stages(stage_modules(gm, plan, k), x), gm(x))


def test_stages_share_the_models_weights_and_pass_values_through():
    model, x = MODELS["two-tower"]
    gm = trace(model)
    names = node_names(gm)
    plan = cut_plan(names, "deep_2")  # inside the deep tower: x still feeds the shallow one
    a, b = stage_modules(gm, plan, 2), stage_modules(gm, plan, 2)
    w = gm.get_parameter("shallow.0.weight")
    assert a[1].get_parameter("shallow.0.weight") is w is b[1].get_parameter("shallow.0.weight")
    out0 = a[0](x)
    assert isinstance(out0, tuple) and any(v is x for v in out0)  # the input passes through
    assert len(out0) == len([n for n in a[1].graph.nodes if n.op == "placeholder"])
    with torch.no_grad():
        w.mul_(2)
    assert torch.equal(run_stages(b, x), gm(x))


def test_weights_read_by_get_attr_stay_in_the_stage_that_uses_them():
    gm = trace(MODELS["gpt"][0])
    names = node_names(gm)
    plan = cut_plan(names, "add")  # the plan puts get_attr 'pos' in stage 0, its user in 1
    assert plan["pos"] == 0
    assert "pos" in stage_parameters(gm, plan, 2)[1]
    stages = stage_modules(gm, plan, 2)
    assert [n.op for n in stages[0].graph.nodes if n.name == "pos"] == []
    assert torch.equal(run_stages(stages, MODELS["gpt"][1]), gm(MODELS["gpt"][1]))


class Tied(nn.Module):
    def __init__(self):
        super().__init__()
        self.embed, self.mid, self.head = nn.Embedding(10, 4), nn.Linear(4, 4), nn.Linear(4, 10)
        self.head.weight = self.embed.weight

    def forward(self, ids):
        return self.head(self.mid(self.embed(ids)))


def test_bad_plans_raise_naming_the_problem():
    gm = trace(MLP())
    names = node_names(gm)  # '_0' .. '_4'
    good = cut_plan(names, "_2")
    with pytest.raises(ValueError, match=r"not monotone: edge '_1' \(stage 1\) -> '_2' \(stage 0\)"):
        stage_modules(gm, {**good, "_1": 1, "_2": 0}, 2)
    with pytest.raises(ValueError, match=r"lacks 1 node.*'_3'"):
        stage_modules(gm, {n: s for n, s in good.items() if n != "_3"}, 2)
    with pytest.raises(ValueError, match=r"not in the graph: \['nope'\]"):
        stage_modules(gm, {**good, "nope": 0}, 2)
    with pytest.raises(ValueError, match=r"node '_4' is in stage 2, outside \[0, 2\)"):
        stage_modules(gm, {**good, "_4": 2}, 2)
    with pytest.raises(ValueError, match=r"stage 1 has no node"):
        stage_modules(gm, {**good, "_2": 2, "_3": 2, "_4": 2}, 3)
    with pytest.raises(ValueError, match=r"k must be an int >= 1"):
        stage_modules(gm, good, 0)
    tied = trace(Tied())
    with pytest.raises(ValueError, match=r"parameter 'embed.weight'.*stages \[0, 1\] \(tied weights\)"):
        stage_parameters(tied, {"embed": 0, "mid": 0, "head": 1}, 2)
    assert stage_parameters(tied, {"embed": 0, "mid": 0, "head": 0}, 1)[0][0] == "embed.weight"


# --- the spec ----------------------------------------------------------------------------------

def mlp_spec(**kw) -> PipelineSpec:
    plan = cut_plan(node_names(trace(MLP())), "_2")
    return PipelineSpec(**{"model": MLP, "stage_of": plan, "k": 2, "input_shape": (8,),
                           "steps": 4, **kw})


@pytest.mark.parametrize(("kw", "pattern"), [
    ({"k": 0}, r"PipelineSpec.k must be an int >= 1, got 0"),
    ({"batch": 10, "micro": 4}, r"batch=10 must be a multiple of micro=4"),
    ({"schedule": "zb"}, r"schedule='zb'"),
    ({"schedule": "1f1b", "micro": 1, "batch": 4}, r"micro=1: schedule '1f1b' needs micro >= k=2"),
    ({"lr": 0.0}, r"PipelineSpec.lr must be > 0"),
    ({"momentum": 1.0}, r"PipelineSpec.momentum must be in \[0, 1\)"),
    ({"task": "regress"}, r"task='regress'"),
    ({"input_shape": (0,)}, r"PipelineSpec.input_shape"),
    ({"task": "lm", "input_shape": (2, 3)}, r"task 'lm' takes \(seq_len,\)"),
    ({"compute_s": (0.1,)}, r"PipelineSpec.compute_s must be None or a tuple of k=2"),
    ({"replan": ((9, {}),)}, r"replan step 9 must be in \[0, steps=4\)"),
    ({"replan": ((1, [1]),)}, r"replan entries must be \(step, stage_of dict\)"),
    ({"model": 3}, r"PipelineSpec.model must be a zero-arg callable"),
])
def test_spec_rejects_bad_fields(kw, pattern):
    with pytest.raises(ValueError, match=pattern):
        mlp_spec(**kw)


def test_spec_pickles_and_run_pipeline_checks_the_plan_before_starting():
    spec = mlp_spec(compute_s=(0.0, 0.01), replan=((2, {"a": 0}),))
    loaded = pickle.loads(pickle.dumps(spec))
    assert (loaded.stage_of, loaded.replan, loaded.compute_s) == (spec.stage_of, spec.replan, spec.compute_s)
    assert isinstance(loaded.model(), nn.Sequential)
    with pytest.raises(ValueError, match=r"not monotone"):
        run_pipeline(mlp_spec(stage_of={**spec.stage_of, "_1": 1, "_2": 0}))


# --- pipelined training over gloo (forked workers: no import per worker) -----------------------

@pytest.mark.timeout(120)
@pytest.mark.parametrize("schedule", ["gpipe", "1f1b"])
def test_two_stage_mlp_trains_as_one_process(schedule):
    spec = mlp_spec(schedule=schedule)
    results = run_pipeline(spec, start_method="fork")
    assert [r["stage"] for r in results] == [0, 1]
    assert_matches_reference(results, spec)
    assert results[0]["losses"] == results[1]["losses"]
    assert results[0]["step_s"] == results[1]["step_s"] and len(results[0]["step_s"]) == 4
    # the cut after '_1' (Linear 8->32) moves 32 floats per sample each way
    assert results[0]["sent_bytes"] == [16 * 32 * 4] * 4 == results[1]["sent_bytes"]
    assert results[0]["boundary_bytes"] == [2 * 16 * 32 * 4] * 4


@pytest.mark.timeout(120)
def test_three_stage_branchy_model_trains_as_one_process():
    gm = trace(RES_MLP())
    plan = cut_plan(node_names(gm), "ups_1", "add_2")  # the residual stream passes through
    spec = PipelineSpec(model=RES_MLP, stage_of=plan, k=3, input_shape=(64,), batch=12, micro=3,
                        steps=3, schedule="1f1b")
    assert_matches_reference(run_pipeline(spec, start_method="fork"), spec)


@pytest.mark.timeout(120)
def test_gpt_with_ints_tuples_and_token_ids_crossing_and_a_replan():
    gm = trace(SMALL_GPT())
    names = node_names(gm)
    # stage 0 only forwards the int token ids; the second cut splits block 1 after its
    # qkv split, so shape ints (b, t, d) and a tuple of tensors cross as well
    first = {**cut_plan(names, "embed", "getitem_9"), "pos": 0}
    second = cut_plan(names, "add", "blocks_1_ln2")
    bad = {**second, "embed": 2}
    spec = PipelineSpec(model=SMALL_GPT, stage_of=first, k=3, input_shape=(8,), task="lm",
                        schedule="1f1b", batch=12, micro=3, steps=4,
                        replan=((2, second), (3, bad)))
    results = run_pipeline(spec, start_method="fork")
    assert_matches_reference(results, spec)
    r0 = results[0]
    assert r0["sent_bytes"][:2] == [12 * 8 * 8] * 2  # int64 ids forward, no gradient back
    assert [s for s, _ in r0["plans"]] == [0, 2] and r0["plan"] == second
    (migration,) = r0["migrations"]
    assert migration["step"] == 2 and migration["bytes"] > migration["moved_bytes"] > 0
    (error,) = r0["replan_errors"]
    assert error["step"] == 3 and "not monotone" in error["error"]
    assert all(r["plan"] == second for r in results)


@pytest.mark.timeout(120)
def test_replan_keeps_weights_and_momentum():
    names = node_names(trace(MLP()))
    spec = mlp_spec(steps=5)
    moved = mlp_spec(steps=5, replan=((2, cut_plan(names, "_4")), (4, cut_plan(names, "_1"))))
    plain, replanned = run_pipeline(spec, start_method="fork"), run_pipeline(moved, start_method="fork")
    assert [m["step"] for m in replanned[0]["migrations"]] == [2, 4]
    assert set(replanned[1]["state"]) == {"2.weight", "2.bias", "4.weight", "4.bias"}
    a, b = merged_state(plain), merged_state(replanned)
    assert set(a) == set(b)
    for name in a:
        torch.testing.assert_close(a[name], b[name], atol=1e-6, rtol=0, msg=name)
    assert replanned[0]["losses"] == pytest.approx(plain[0]["losses"], abs=1e-6)


@pytest.mark.timeout(120)
def test_emulated_slow_stage_bounds_the_step():
    micro, slow = 4, 0.06
    spec = mlp_spec(steps=3, micro=micro, compute_s=(0.02, slow))
    results = run_pipeline(spec, start_method="fork")
    assert min(results[0]["step_s"]) >= micro * slow * 0.95
    assert max(results[0]["step_s"]) < micro * slow + 2.0  # and nothing much else
    assert_matches_reference(results, spec)  # sleeping changes no number


# --- the same worker under torchrun ------------------------------------------------------------

def free_port() -> int:
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@pytest.mark.timeout(150)
def test_same_worker_under_torchrun(tmp_path):
    spec = mlp_spec(schedule="1f1b")
    (tmp_path / "spec.pkl").write_bytes(pickle.dumps(spec))
    env = {k: v for k, v in os.environ.items() if k not in TORCHRUN_VARS}
    env["OMP_NUM_THREADS"] = "1"
    env["PYTHONPATH"] = os.pathsep.join(filter(None, [str(ROOT), env.get("PYTHONPATH")]))
    cmd = [sys.executable, "-m", "torch.distributed.run", "--nproc_per_node=2",
           "--master_addr=127.0.0.1", f"--master_port={free_port()}",
           "-m", "adaptive_kit.partition.pipeline", str(tmp_path / "spec.pkl"), "--out", str(tmp_path)]
    proc = subprocess.run(cmd, cwd=ROOT, env=env, capture_output=True, text=True, timeout=120)
    assert proc.returncode == 0, (proc.stdout + proc.stderr)[-3000:]
    results = [torch.load(tmp_path / f"rank{r}.pt") for r in range(2)]
    assert [r["rank"] for r in results] == [0, 1]
    assert_matches_reference(results, spec)
