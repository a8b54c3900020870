"""Telemetry collector against oracles: batched_stats of tensors captured by hand, numpy block
means and strides, Arrow IPC sizes; and stats.combine_stats against batched_stats of the union."""
from __future__ import annotations

import math

import numpy as np
import pyarrow as pa
import pytest
import torch
import torch.nn.functional as F
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from torch import nn

import adaptive_kit.stats as stats_module
import adaptive_kit.telemetry.collector as collector_module
from adaptive_kit.anomaly import Alarm
from adaptive_kit.records import MemorySink
from adaptive_kit.stats import SAMPLE, SMALL, STAT_INDEX, STAT_NAMES, batched_stats, combine_stats
from adaptive_kit.telemetry import (
    KINDS,
    LEVELS,
    TELEMETRY_SCHEMA,
    StepRecord,
    Telemetry,
    TelemetryConfig,
)
from adaptive_kit.training import mlp


def make_mlp() -> nn.Module:
    torch.manual_seed(0)
    return mlp([64, 32, 16, 10])  # Linear "0", ReLU "1", Linear "2", ReLU "3", Linear "4"


def make_cnn() -> nn.Module:
    torch.manual_seed(0)
    # "0" Unflatten (no parameters: not an activation layer), "1" conv, "2" ReLU, "3" Flatten, "4" Linear
    return nn.Sequential(nn.Unflatten(1, (1, 8, 8)), nn.Conv2d(1, 4, 3, padding=1), nn.ReLU(),
                         nn.Flatten(), nn.Linear(4 * 8 * 8, 10))


MODELS = {"mlp": make_mlp, "cnn": make_cnn}


def batch(seed: int = 0, n: int = 32) -> tuple[torch.Tensor, torch.Tensor]:
    g = torch.Generator().manual_seed(seed)
    return torch.randn(n, 64, generator=g), torch.randint(0, 10, (n,), generator=g)


class Probe:
    """Our own forward hooks: the oracle's copy of every activation of the last forward."""

    def __init__(self, model: nn.Module, names: list[str]) -> None:
        self.acts: dict[str, torch.Tensor] = {}
        self.handles = [model.get_submodule(n).register_forward_hook(
            lambda m, i, o, n=n: self.acts.__setitem__(n, o.detach().clone())) for n in names]

    def remove(self) -> None:
        for h in self.handles:
            h.remove()


def run_step(tel: Telemetry, model: nn.Module, step: int, seed: int | None = None, inside=None,
             log_loss: bool = True) -> torch.Tensor:
    x, y = batch(step if seed is None else seed)
    with tel.step(step):
        loss = F.cross_entropy(model(x), y)
        if log_loss:
            tel.log_loss(loss)
        model.zero_grad(set_to_none=True)
        loss.backward()
        if inside is not None:
            inside()
    return loss.detach()


def tensors_of(model: nn.Module, probe: Probe, kind: str, layer: str) -> list[torch.Tensor]:
    if kind == "act":
        return [probe.acts[layer]]
    params = list(model.get_submodule(layer).parameters(recurse=False))
    return [p.grad.clone() for p in params] if kind == "grad" else [p.detach().clone() for p in params]


def flat(ts: list[torch.Tensor]) -> torch.Tensor:
    return torch.cat([t.reshape(-1).float() for t in ts])


def rows_by_key(b: pa.RecordBatch) -> dict[tuple[str, str], dict]:
    """The batch's tensor rows by (kind, layer); the loss row is left out (see loss_rows)."""
    return {(r["kind"], r["layer"]): r for r in b.to_pylist() if r["kind"] != "loss"}


def loss_rows(record: StepRecord) -> list[dict]:
    return [r for b in record.batches.values() for r in b.to_pylist() if r["kind"] == "loss"]


def stat_vector(row: dict) -> np.ndarray:
    return np.array([row[n] for n in STAT_NAMES], dtype=np.float64)


def exact_row(v: np.ndarray) -> np.ndarray:
    """The 8 statistics of float64 values, numpy."""
    fin = v[np.isfinite(v)]
    row = np.array([v.size, np.nan, np.nan, np.nan, np.nan, math.sqrt(float((fin * fin).sum())),
                    v.size - fin.size, np.nan])
    if fin.size:
        row[1:5] = fin.mean(), fin.std(), fin.min(), fin.max()
    if v.size:
        row[7] = np.mean(v == 0)
    return row


def tensor_oracle(t: torch.Tensor, level: str) -> np.ndarray:
    """What the collector documents for one CPU tensor at ``level``: exact counts, norm, mean
    and std (macro: the sample's mean above SAMPLE entries); above SMALL entries the extremes
    (unless collector.EXTREMA) and zero_frac of the evenly strided sample of SAMPLE entries."""
    v = t.detach().double().reshape(-1).numpy()
    row = exact_row(v)
    n = v.size
    if n <= SMALL or row[STAT_INDEX["nonfinite"]]:
        return row
    smp = v[::math.ceil(n / SAMPLE)] if n > SAMPLE else v
    if not collector_module.EXTREMA:
        row[STAT_INDEX["min"]], row[STAT_INDEX["max"]] = smp.min(), smp.max()
    row[STAT_INDEX["zero_frac"]] = np.mean(smp == 0)
    if level == "macro" and smp.size < n:
        m, sq = smp.mean(), float((v * v).sum()) / n
        var = sq - m * m
        row[STAT_INDEX["mean"]] = m
        row[STAT_INDEX["std"]] = math.sqrt(var if var >= sq / 16 else smp.var())
    return row


def level_oracle(ts: list[torch.Tensor], level: str) -> np.ndarray:
    """The row the collector sends for tensors pooled at ``level`` (combine_stats is tested below)."""
    rows = torch.tensor(np.stack([tensor_oracle(t, level) for t in ts]))
    return combine_stats(rows, torch.zeros(len(ts), dtype=torch.int64), 1)[0].numpy()


def assert_row(got: np.ndarray, exp: np.ndarray, msg: str = "") -> None:
    """Counts exact; moments to float32 accumulation (1e-5 of the largest magnitude)."""
    scale = max(1.0, float(np.nanmax(np.abs(exp[[3, 4]])))) if np.isfinite(exp[[3, 4]]).any() else 1.0
    for name in ("count", "nonfinite"):
        assert got[STAT_INDEX[name]] == exp[STAT_INDEX[name]], f"{name}: {msg}"
    np.testing.assert_allclose(got, exp, rtol=1e-5, atol=1e-6 * scale, equal_nan=True, err_msg=msg)


def triples(record: StepRecord) -> set[tuple[str, str, str]]:
    return {(r["kind"], r["layer"], r["level"]) for b in record.batches.values() for r in b.to_pylist()
            if r["kind"] != "loss"}


def expected_triples(tel: Telemetry) -> set[tuple[str, str, str]]:
    return {(k, "*", "macro") if lv == "macro" else (k, n, lv)
            for (k, n), lv in tel.plan.items() if lv != "off"}


def hook_count(model: nn.Module) -> int:
    return sum(len(m._forward_hooks) for m in model.modules())


class StreamSink(MemorySink):
    """A MemorySink that also keeps the stream name each batch was written under."""

    def __init__(self) -> None:
        super().__init__("test")
        self.streams: list[str] = []

    def _send(self, b: pa.RecordBatch, meta: dict[str, str]) -> int:
        self.streams.append(meta["stream"])
        return super()._send(b, meta)


# ---------------------------------------------------------------------------- attaching
@pytest.mark.parametrize("name", sorted(MODELS))
def test_layers_found_on_mlp_and_cnn(name):
    model = MODELS[name]()
    tel = Telemetry(model)
    assert tel.param_layers == (["0", "2", "4"] if name == "mlp" else ["1", "4"])
    assert tel.layers["act"] == (["0", "1", "2", "3", "4"] if name == "mlp" else ["1", "2", "4"])
    assert tel.relu_layers == (["1", "3"] if name == "mlp" else ["2"])
    assert set(tel.plan.values()) == {"meso"}
    assert hook_count(model) == len(tel.layers["act"])
    tel.close()
    assert hook_count(model) == 0


# ---------------------------------------------------------------------------- meso
@pytest.mark.parametrize("name", sorted(MODELS))
def test_meso_rows_equal_batched_stats_of_the_same_tensors(name):
    model = MODELS[name]()
    sink = StreamSink()
    tel = Telemetry(model, "meso", sink=sink, rank=3)
    probe = Probe(model, tel.layers["act"])
    loss = run_step(tel, model, 7)
    rec = tel.records[-1]
    assert rec.step == 7 and list(rec.batches) == ["meso"]
    assert rec.loss == pytest.approx(float(loss), rel=1e-7)
    b = rec.batches["meso"]
    assert b.schema.equals(TELEMETRY_SCHEMA)
    assert set(b.column("step").to_pylist()) == {7} and set(b.column("rank").to_pylist()) == {3}
    rows = rows_by_key(b)
    assert set(rows) == set(tel.plan)
    for (kind, layer), row in rows.items():
        assert row["level"] == "meso" and row["values"] is None
        ts = tensors_of(model, probe, kind, layer)
        assert_row(stat_vector(row), level_oracle(ts, "meso"), f"{kind}/{layer}")
        exact = batched_stats([ts])[0].numpy()  # count, mean, std, norm, nonfinite: exact
        for name in ("count", "mean", "std", "norm", "nonfinite"):
            j = STAT_INDEX[name]
            np.testing.assert_allclose(row[name], exact[j], rtol=2e-5, atol=1e-7, err_msg=f"{kind}/{layer} {name}")
    assert loss_rows(rec) == [{**loss_rows(rec)[0], "kind": "loss", "layer": "*", "level": "meso", "count": 1,
                               "nonfinite": 0, "std": 0.0, "values": None}]
    assert loss_rows(rec)[0]["mean"] == rec.loss == loss_rows(rec)[0]["max"]
    assert sink.streams == ["telemetry"]
    probe.remove()
    tel.close()


def test_without_log_loss_the_record_has_no_loss():
    model = make_mlp()
    tel = Telemetry(model, "macro")
    run_step(tel, model, 0, log_loss=False)
    assert tel.records[-1].loss is None
    tel.close()


# ---------------------------------------------------------------------------- macro
@pytest.mark.parametrize("name", sorted(MODELS))
def test_macro_rows_equal_stats_of_the_concatenation_of_all_layers(name):
    model = MODELS[name]()
    tel = Telemetry(model, "macro")
    probe = Probe(model, tel.layers["act"])
    run_step(tel, model, 0)
    rec = tel.records[-1]
    assert list(rec.batches) == ["macro"]
    rows = rows_by_key(rec.batches["macro"])
    assert set(rows) == {(k, "*") for k in KINDS}
    for kind in KINDS:
        ts = [t for layer in tel.layers[kind] for t in tensors_of(model, probe, kind, layer)]
        union = flat(ts)
        exact = batched_stats([union])[0].numpy()
        row = rows[(kind, "*")]
        assert row["level"] == "macro" and row["values"] is None
        assert_row(stat_vector(row), level_oracle(ts, "macro"), kind)
        # exact at macro whatever the tensors' sizes: counts and norm
        assert row["count"] == union.numel() and row["nonfinite"] == exact[6] == 0
        assert row["norm"] == pytest.approx(exact[5], rel=2e-5)
        if all(t.numel() <= SMALL for t in ts):  # every statistic exact: the union's
            np.testing.assert_allclose(stat_vector(row), exact, rtol=2e-5, atol=1e-6, err_msg=kind)
            assert row["min"] == exact[3] and row["max"] == exact[4]
    probe.remove()
    tel.close()


def test_macro_pools_only_the_layers_at_macro_and_meso_rows_stay_apart():
    model = make_mlp()
    tel = Telemetry(model, {"grad": "macro", "weight": "off", "act": "off"})
    tel.set_levels("meso", kind="grad", layers=["4"])
    probe = Probe(model, [])
    run_step(tel, model, 0)
    rec = tel.records[-1]
    assert sorted(rec.batches) == ["macro", "meso"]
    assert triples(rec) == {("grad", "*", "macro"), ("grad", "4", "meso")}
    pooled = flat(tensors_of(model, probe, "grad", "0") + tensors_of(model, probe, "grad", "2"))
    np.testing.assert_allclose(stat_vector(rec.batches["macro"].to_pylist()[0]),
                               batched_stats([pooled])[0].numpy(), rtol=2e-5, atol=1e-7)
    tel.close()


# ---------------------------------------------------------------------------- raw and micro
def test_raw_under_the_cap_sends_every_value():
    model = make_mlp()
    tel = Telemetry(model, "raw", config=TelemetryConfig(raw_cap=10**6))
    probe = Probe(model, tel.layers["act"])
    run_step(tel, model, 0)
    rows = rows_by_key(tel.records[-1].batches["raw"])
    assert set(rows) == set(tel.plan)
    for (kind, layer), row in rows.items():
        expected = flat(tensors_of(model, probe, kind, layer)).numpy()
        assert row["count"] == expected.size
        np.testing.assert_array_equal(np.asarray(row["values"], dtype=np.float32), expected)
        # raw rows carry the layer's statistics too, as meso computes them
        assert_row(stat_vector(row), level_oracle(tensors_of(model, probe, kind, layer), "raw"))
    probe.remove()
    tel.close()


@pytest.mark.parametrize("cap", [1, 7, 100, 1000])
def test_raw_above_the_cap_is_an_even_stride_with_the_true_count(cap):
    model = make_mlp()
    tel = Telemetry(model, "raw", config=TelemetryConfig(raw_cap=cap))
    probe = Probe(model, tel.layers["act"])
    run_step(tel, model, 0)
    rows = rows_by_key(tel.records[-1].batches["raw"])
    strided = 0
    for (kind, layer), row in rows.items():
        full = flat(tensors_of(model, probe, kind, layer)).numpy()
        n = full.size
        expected = full[::math.ceil(n / cap)] if n > cap else full
        strided += n > cap
        assert row["count"] == n
        assert len(row["values"]) <= cap
        np.testing.assert_array_equal(np.asarray(row["values"], dtype=np.float32), expected)
    assert strided > 0
    probe.remove()
    tel.close()


def block_means(x: np.ndarray, window: int) -> np.ndarray:
    """Numpy oracle: means of consecutive blocks of ``window`` entries, the last one shorter."""
    return np.array([x[i:i + window].astype(np.float64).mean() for i in range(0, x.size, window)])


@pytest.mark.parametrize("window, cap", [(1, 10**6), (7, 10**6), (16, 10**6), (4, 50)])
def test_micro_sends_block_means_of_window_consecutive_entries(window, cap):
    model = make_mlp()
    tel = Telemetry(model, "micro", config=TelemetryConfig(window=window, raw_cap=cap))
    probe = Probe(model, tel.layers["act"])
    run_step(tel, model, 0)
    rows = rows_by_key(tel.records[-1].batches["micro"])
    assert set(rows) == set(tel.plan)
    for (kind, layer), row in rows.items():
        full = flat(tensors_of(model, probe, kind, layer)).numpy()
        means = block_means(full, window)
        expected = means[::math.ceil(means.size / cap)] if means.size > cap else means
        assert row["count"] == full.size  # the true number of entries, not of means
        assert row["level"] == "micro"
        np.testing.assert_allclose(np.asarray(row["values"], dtype=np.float64), expected,
                                   rtol=1e-5, atol=1e-6, err_msg=f"{kind}/{layer}")
    probe.remove()
    tel.close()


# ---------------------------------------------------------------------------- batches and bytes
def test_one_batch_per_level_in_use_and_bytes_match_the_sink():
    model = make_mlp()
    sink = StreamSink()
    tel = Telemetry(model, {"grad": "meso", "weight": "macro", "act": "raw"}, sink=sink)
    for step in range(3):
        run_step(tel, model, step)
    tel.close()
    assert len(tel.records) == 3
    for rec in tel.records:
        assert sorted(rec.batches) == ["macro", "meso", "raw"]
        assert all(b.schema.equals(TELEMETRY_SCHEMA) for b in rec.batches.values())
        assert rec.bytes == {lv: pa.ipc.get_record_batch_size(b) for lv, b in rec.batches.items()}
    assert len(sink.batches) == 9 and sink.streams == ["telemetry"] * 9
    sent = {lv: sum(pa.ipc.get_record_batch_size(b) for b in sink.batches
                    if b.column("level")[0].as_py() == lv) for lv in LEVELS[1:]}
    assert tel.bytes == sent
    assert tel.bytes["micro"] == 0 and tel.bytes["raw"] > tel.bytes["meso"] > tel.bytes["macro"] > 0
    assert sink.bytes == sum(tel.bytes.values())
    assert sink.rows == sum(b.num_rows for b in sink.batches) == 3 * (3 + 1 + 5 + 1)  # + the loss
    for rec in tel.records:  # the loss rides in the coarsest batch of statistics of the step
        assert [(r["kind"], r["level"]) for r in loss_rows(rec)] == [("loss", "macro")]


@pytest.mark.parametrize("levels, where", [
    ("raw", "macro"), ("micro", "macro"), ("meso", "meso"), ("macro", "macro"), ("off", "macro"),
    ({"grad": "raw", "weight": "meso", "act": "off"}, "meso"),
    ({"grad": "raw", "weight": "meso", "act": "macro"}, "macro"),
])
def test_the_loss_row_is_in_the_sink_among_rows_of_statistics(levels, where):
    model = make_mlp()
    sink = MemorySink("t")
    tel = Telemetry(model, levels, sink=sink)
    losses = [float(run_step(tel, model, step)) for step in range(2)]
    run_step(tel, model, 2, log_loss=False)
    tel.close()
    frame = sink.to_pandas()  # one table: the loss rows share the telemetry schema
    rows = frame[frame.kind == "loss"]
    assert list(rows.step) == [0, 1] and set(rows.level) == {where} and set(rows.layer) == {"*"}
    np.testing.assert_allclose(rows["mean"], losses, rtol=1e-6)
    assert list(rows["count"]) == [1, 1] and list(rows["nonfinite"]) == [0, 0]
    assert rows["values"].isna().all() and (rows["std"] == 0).all()
    assert [r.loss is None for r in tel.records] == [False, False, True]
    assert tel.bytes == {lv: sum(r.bytes.get(lv, 0) for r in tel.records) for lv in LEVELS[1:]}


def test_a_non_finite_loss_is_counted_in_its_row():
    model = make_mlp()
    tel = Telemetry(model, "meso")
    with tel.step(0):
        tel.log_loss(torch.tensor(math.nan))
    tel.close()
    (row,) = loss_rows(tel.records[-1])
    assert row["nonfinite"] == 1 and row["count"] == 1 and math.isnan(row["mean"]) and row["norm"] == 0
    assert math.isnan(tel.records[-1].loss)


# ---------------------------------------------------------------------------- changing levels
def test_set_levels_between_steps_takes_effect_next_step_without_new_hooks():
    model = make_mlp()
    tel = Telemetry(model, "meso")
    hooks = hook_count(model)
    root_hooks = len(model._forward_hooks)
    changes = [
        lambda: None,
        lambda: tel.set_levels("macro"),
        lambda: tel.set_levels("raw", kind="grad"),
        lambda: tel.set_levels("micro", kind="act", layers=["1", "3"]),
        lambda: tel.set_levels({"weight": "off", ("grad", "0"): "meso", ("act", "1"): "macro"}),
        lambda: tel.set_levels("off"),
        lambda: tel.set_levels({"act": "meso"}),
    ]
    for step, change in enumerate(changes):
        change()
        plan = dict(tel.plan)
        run_step(tel, model, step)
        rec = tel.records[-1]
        assert rec.step == step
        assert triples(rec) == expected_triples(tel), f"step {step}: {plan}"
        assert hook_count(model) == hooks and len(model._forward_hooks) == root_hooks
    # everything off: only the logged loss is sent, alone in a macro batch
    assert list(tel.records[5].batches) == ["macro"] and triples(tel.records[5]) == set()
    assert [r["kind"] for r in loss_rows(tel.records[5])] == ["loss"]
    assert tel.level("grad", "0") == "off" and tel.level("act", "3") == "meso"
    tel.close()


def test_bad_levels_leave_the_plan_unchanged():
    model = make_mlp()
    tel = Telemetry(model, "meso")
    before = dict(tel.plan)
    for call in (lambda: tel.set_levels("fine"), lambda: tel.set_levels("raw", kind="grads"),
                 lambda: tel.set_levels("raw", kind="grad", layers=["0", "nope"])):
        with pytest.raises(ValueError):
            call()
        assert tel.plan == before
    tel.close()


def test_every_collects_only_multiples_of_every():
    model = make_mlp()
    sink = MemorySink("t")
    tel = Telemetry(model, "meso", config=TelemetryConfig(every=3), sink=sink)
    for step in range(8):
        run_step(tel, model, step)
    tel.close()
    assert [r.step for r in tel.records] == [0, 3, 6]
    assert tel.steps_collected == 3
    assert sorted({s for b in sink.batches for s in b.column("step").to_pylist()}) == [0, 3, 6]


# ---------------------------------------------------------------------------- close and flush
def test_records_wait_for_their_copies_and_close_flushes_and_removes_hooks(monkeypatch):
    monkeypatch.setattr(stats_module.HostCopy, "ready", lambda self: False)  # copies in flight
    model = make_mlp()
    sink = MemorySink("t")
    tel = Telemetry(model, "meso", sink=sink)
    run_step(tel, model, 0)
    assert tel.records == [] and sink.batches == []  # never waits for the step just queued
    run_step(tel, model, 1)
    assert [r.step for r in tel.records] == [0]  # the older step materialises a step later
    tel.close()
    assert [r.step for r in tel.records] == [0, 1]
    assert len(sink.batches) == 2
    assert hook_count(model) == 0
    assert all(len(m._forward_hooks) == 0 for m in model.modules())


def test_context_manager_closes():
    model = make_cnn()
    with Telemetry(model, "raw") as tel:
        run_step(tel, model, 0)
        assert hook_count(model) == 3
    assert hook_count(model) == 0
    assert len(tel.records) == 1


# ---------------------------------------------------------------------------- bad input
@pytest.mark.parametrize("make, needle", [
    (lambda m: Telemetry(m, "fine"), "'fine'"),
    (lambda m: Telemetry(m, {"gradient": "meso"}), "'gradient'"),
    (lambda m: Telemetry(m, {"grad": "coarse"}), "'coarse'"),
    (lambda m: Telemetry(m, {("act", "9"): "raw"}), "'9'"),
    (lambda m: Telemetry(m).set_levels("raw", kind="grad", layers=["nope"]), "'nope'"),
    (lambda m: Telemetry(m).set_levels("raw", kind="grad", layers=["1"]), "'1'"),  # a ReLU: no grads
    (lambda m: Telemetry(m, act_layers=["1", "missing"]), "'missing'"),
    (lambda m: Telemetry(nn.ReLU()), "no parameters"),
    (lambda m: Telemetry(nn.Sequential(nn.ReLU(), nn.Flatten())), "no parameters"),
])
def test_bad_input_raises_naming_the_value(make, needle):
    model = make_mlp()
    with pytest.raises(ValueError, match=needle):
        make(model)


@pytest.mark.parametrize("field", ["window", "raw_cap", "every"])
@pytest.mark.parametrize("value", [0, -1, 2.0, True])
def test_config_rejects_bad_values_naming_the_field(field, value):
    with pytest.raises(ValueError, match=rf"TelemetryConfig\.{field}.*{value!r}"):
        TelemetryConfig(**{field: value})


def test_unknown_level_does_not_leave_hooks_behind():
    model = make_mlp()
    with pytest.raises(ValueError):
        Telemetry(model, "fine")
    assert hook_count(model) == 0


# ---------------------------------------------------------------------------- robustness
def test_nonfinite_gradients_are_counted_and_never_crash():
    model = make_mlp()
    tel = Telemetry(model, {"grad": "meso", "weight": "off", "act": "off"})
    probe = Probe(model, [])

    def poison():
        g = model[0].weight.grad
        g[0, :3] = math.nan
        g[1, 0] = math.inf
        g[2, 0] = -math.inf

    run_step(tel, model, 0, inside=poison)
    row = rows_by_key(tel.records[-1].batches["meso"])[("grad", "0")]
    assert row["nonfinite"] == 5
    assert all(math.isfinite(row[n]) for n in ("mean", "std", "min", "max", "norm"))
    oracle = batched_stats([tensors_of(model, probe, "grad", "0")])[0].numpy()
    np.testing.assert_allclose(stat_vector(row), oracle, rtol=1e-6)
    for level in ("macro", "raw", "micro"):  # every level survives the same step
        tel.set_levels(level, kind="grad")
        run_step(tel, model, 1, inside=poison)
        b = tel.records[-1].batches[level]
        if level == "macro":
            assert b.to_pylist()[0]["nonfinite"] == 5
        else:
            row = rows_by_key(b)[("grad", "0")]
            v = np.asarray(row["values"], dtype=np.float64)
            assert (~np.isfinite(v)).sum() == (5 if level == "raw" else 3)  # 3 blocks hold one
            assert row["nonfinite"] == 5
    tel.close()


def test_on_step_alarms_are_stored_on_the_step_record():
    model = make_mlp()
    seen: list[StepRecord] = []

    def on_record(rec: StepRecord):
        seen.append(rec)
        if rec.step % 2 == 0:
            return [Alarm(rec.step, "test", "grad", "0", "meso", "even step", float(rec.step))]
        return None

    tel = Telemetry(model, "macro", on_step=on_record)
    for step in range(3):
        run_step(tel, model, step)
    tel.close()
    assert [r.step for r in seen] == [0, 1, 2]
    assert [[a.step for a in r.alarms] for r in tel.records] == [[0], [], [2]]
    assert tel.records[0].alarms[0].detector == "test"


def test_explicit_act_layers_and_inplace_relu():
    # Linear "0" -> ReLU(inplace=True) "1": the in-place ReLU must not rewrite layer 0's record
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(64, 16), nn.ReLU(inplace=True), nn.Linear(16, 10))
    tel = Telemetry(model, {"grad": "off", "weight": "off", "act": "meso"}, act_layers=["0", "1"])
    assert tel.layers["act"] == ["0", "1"] and tel.relu_layers == ["1"]
    x, _ = batch(0)
    with torch.no_grad():
        pre = model[0](x)
    with tel.step(0):
        model(x).sum().backward()
    rows = rows_by_key(tel.records[-1].batches["meso"])
    assert set(rows) == {("act", "0"), ("act", "1")}
    np.testing.assert_allclose(stat_vector(rows[("act", "0")]), batched_stats([pre])[0].numpy(), rtol=1e-5)
    np.testing.assert_allclose(stat_vector(rows[("act", "1")]),
                               batched_stats([pre.clamp(min=0)])[0].numpy(), rtol=1e-5)
    assert rows[("act", "0")]["min"] < 0
    tel.close()


def test_forward_outside_a_step_is_not_captured():
    model = make_mlp()
    tel = Telemetry(model, "raw")
    model(batch(1)[0])  # e.g. an evaluation pass between steps
    assert tel._acts == {}
    tel.close()


# ---------------------------------------------------------------------------- combine_stats
SETTINGS = settings(max_examples=80, deadline=None,
                    suppress_health_check=[HealthCheck.too_slow, HealthCheck.data_too_large])
ENTRY = st.one_of(st.floats(-1e3, 1e3, allow_nan=False, allow_infinity=False),
                  st.sampled_from([0.0, -0.0, math.nan, math.inf, -math.inf]))


@st.composite
def layers_and_groups(draw):
    n_groups = draw(st.integers(1, 4))
    layers = draw(st.lists(st.lists(ENTRY, max_size=40), min_size=1, max_size=6))
    group = draw(st.lists(st.integers(0, n_groups - 1), min_size=len(layers), max_size=len(layers)))
    return layers, group, n_groups


@SETTINGS
@given(layers_and_groups())
def test_combine_stats_equals_batched_stats_of_the_union(case):
    layers, group, n_groups = case
    tensors = [torch.tensor(v, dtype=torch.float64) for v in layers]
    pooled = combine_stats(batched_stats(tensors), torch.tensor(group), n_groups)
    assert pooled.shape == (n_groups, len(STAT_NAMES)) and pooled.dtype == torch.float64
    for g in range(n_groups):
        members = [t for t, gi in zip(tensors, group) if gi == g]
        union = torch.cat(members) if members else torch.empty(0, dtype=torch.float64)
        oracle = batched_stats([union])[0].numpy()
        scale = max([1.0] + [abs(x) for x in union.tolist() if math.isfinite(x)])
        np.testing.assert_allclose(pooled[g].numpy(), oracle, rtol=1e-9, atol=1e-9 * scale,
                                   equal_nan=True, err_msg=f"group {g}")


def test_combine_stats_of_float32_rows_and_empty_groups():
    torch.manual_seed(0)
    tensors = [torch.randn(300) * 5 + 2, torch.zeros(10), torch.empty(0), torch.randn(1000)]
    pooled = combine_stats(batched_stats(tensors), torch.tensor([0, 0, 2, 0]), 3)
    np.testing.assert_allclose(pooled[0].numpy(),
                               batched_stats([torch.cat([tensors[0], tensors[1], tensors[3]])])[0].numpy(),
                               rtol=1e-5)
    for g in (1, 2):  # no rows, or only an empty layer: as batched_stats of an empty tensor
        np.testing.assert_array_equal(pooled[g].numpy(), batched_stats([torch.empty(0)])[0].numpy())
    assert pooled[1, 0] == 0 and math.isnan(pooled[1, 1]) and pooled[1, 5] == 0


@pytest.mark.parametrize("values, group, needle", [
    (torch.zeros(3, 7), torch.zeros(3, dtype=torch.int64), "values.shape"),
    (torch.zeros(8), torch.zeros(8, dtype=torch.int64), "values.shape"),
    (torch.zeros(2, 3, 8), torch.zeros(2, dtype=torch.int64), "values.shape"),
    (torch.zeros(3, 8), torch.zeros(2, dtype=torch.int64), "group.shape"),
    (torch.zeros(3, 8), torch.zeros(3, 1, dtype=torch.int64), "group.shape"),
])
def test_combine_stats_rejects_bad_shapes(values, group, needle):
    with pytest.raises(ValueError, match=needle):
        combine_stats(values, group, 1)


# ---------------------------------------------------------------------------- exact non-finite counts
class Poison(nn.Module):
    """Writes NaN / Inf into its input at fixed flat positions (off the sampled stride)."""

    def __init__(self, where: dict[int, float]) -> None:
        super().__init__()
        self.where = where

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = x.clone()
        for i, v in self.where.items():
            x.view(-1)[i] = v
        return x


class SideNet(nn.Sequential):
    """Linear "0" -> ReLU "2" -> Linear "3"; "1" poisons a copy of "0"'s output on a side branch
    (its output is not used, so the NaN reaches no gradient)."""

    def __init__(self) -> None:
        super().__init__(nn.Linear(64, 256), Poison({1: math.nan, 3: math.inf}), nn.ReLU(), nn.Linear(256, 10))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        h = self[0](x)
        self[1](h)
        return self[3](self[2](h))


@pytest.mark.parametrize("level", ["macro", "meso", "micro", "raw"])
def test_a_single_nan_anywhere_is_counted_exactly_at_every_level(level):
    torch.manual_seed(0)
    # grad of "0".weight and the output of "0": 256 x 64 = 16384 and 32 x 256 = 8192 entries, both
    # large (sampled with a stride of 4 and 2): positions 1 and 3 are never in a sample
    model = SideNet()
    assert model[0].weight.numel() > SMALL and 32 * 256 > SMALL
    tel = Telemetry(model, level, config=TelemetryConfig(raw_cap=64), act_layers=["0", "1"])

    def poison_grad():
        model[0].weight.grad.view(-1)[1] = -math.inf

    run_step(tel, model, 0, inside=poison_grad)
    rec = tel.records[-1]
    rows = rows_by_key(rec.batches[level])
    if level == "macro":
        assert rows[("grad", "*")]["nonfinite"] == 1
        assert rows[("act", "*")]["nonfinite"] == 2  # "0" is clean, "1" holds a NaN and an Inf
        assert rows[("weight", "*")]["nonfinite"] == 0
    else:
        assert rows[("grad", "0")]["nonfinite"] == 1 and rows[("grad", "3")]["nonfinite"] == 0
        assert rows[("act", "1")]["nonfinite"] == 2 and rows[("act", "0")]["nonfinite"] == 0
        # the moments of a layer that holds a NaN are exact over its finite entries
        with torch.no_grad():
            out = model[1](model[0](batch(0)[0]))
        np.testing.assert_allclose(stat_vector(rows[("act", "1")]), exact_row(out.double().reshape(-1).numpy()),
                                   rtol=2e-5, atol=1e-6)
    tel.close()


def test_the_device_path_stays_on_the_device():
    # the meta device stands in for an accelerator: nothing may be read on the host before materialise
    cfg = TelemetryConfig(raw_cap=16)
    items = [("grad", "0", "meso", [torch.empty(300, device="meta"), torch.empty(3, device="meta")]),
             ("act", "1", "macro", [torch.empty(5000, device="meta")]),
             ("act", "2", "macro", [torch.empty(7, device="meta")]),
             ("act", "3", "raw", [torch.empty(100, device="meta")]),
             ("weight", "0", "micro", [torch.empty(100, device="meta")])]
    p = collector_module.aggregate(0, items, cfg, torch.empty((), device="meta"))
    assert p.f64.wait().device.type == "meta" and p.f32.wait().device.type == "meta"
    assert p.f64.wait().shape == ((3 + 1) * len(STAT_NAMES) + 1,)  # 3 rows, 1 macro row, the loss
    assert p.f32.wait().shape == (15 + 7,)  # raw: a stride of 7 keeps 15; micro: 7 block means
