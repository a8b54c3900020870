"""Federated meta-learning over adaptive partitions against the baselines users reach for:
statsmodels' OrderedModel, kd-tree / k-means / random partitions, FedAvg / FedProx / one-shot
averaging, Ditto, and river's ADWIN and Page-Hinkley (the engine of ``drift.ADWIN`` and
``drift.PageHinkley``: the comparison checks that batches lose nothing).

(a) OrderedModel agreement: ``ordinal.fit`` against statsmodels ``OrderedModel(y, x,
    distr="logit").fit(method="bfgs", gtol=1e-8)`` on ``fair`` (5 classes), ``randhie`` (4),
    the mixture (8,000 rows, 2 classes) and ``anes96`` (944 rows, 7 classes): max |coefficient difference|, max |threshold
    difference| (statsmodels' thresholds from ``transform_threshold_params``), both mean NLLs, and
    each fit's time (median of 3; quick: 1).
(b) Partition quality on ``data.mixture(n=8000, seed=s)`` (4 regimes of shares .4/.3/.2/.1, each
    with its own rule; 6,000 rows to partition and fit, 2,000 held out; seeds 0-4, quick 0-1),
    P = 16 and P = 8 parts: random equal parts, a balanced kd-tree (median cuts on the feature of
    widest spread, standardised, until P leaves), k-means with P centres (``profile.kmeans`` on
    standardised rows, held-out rows to the nearest centre), ours (``adaptive_partition`` at
    granularity 1, ``max_parts=P``, ``min_size=50``; held-out rows via ``.assign``) and the
    oracle (the 4 true regimes). Quality: held-out accuracy of one ``ordinal.fit`` per part
    (l2 1e-3; a part with a single class predicts it); balance: largest / mean part size.
(c) Federated methods: clients = our adaptive partition of each data set (fair 8 clients, randhie
    12, mixture 10, anes96 6 — see ``CLIENTS``) through ``fed.make_clients`` (60 / 20 / 20 % train / val /
    test per client, seeded). Every method gets the same budget of 6 configurations (quick: 2):
    local_lr in {0.1, 0.3, 1.0} x one method-specific value (``second_axis``), ``ROUNDS`` rounds
    (60; quick 15), chosen on seed 0's validation split by the mean client MAE after one
    adaptation step; the chosen configurations are then run on report seeds 1-5 (quick 1-2; a
    seed changes the clients' train / val / test split and the method's seed) and scored on the
    test rows: accuracy and MAE after 0 / 1 / 5 local steps (FedAvg after 1 / 5 steps is
    "FedAvg + fine-tuning"), the share of clients whose MAE is above training alone
    (``fed.local_only``: an L-BFGS fit per client), bytes per client, and training time. Paired: each meta
    method's MAE after 1 step minus the best anchor's (the anchor with the lowest mean test MAE
    after 1 step, the one most favourable to the anchors), per (seed, client), with a 95 %
    t-interval over those pairs. "Ours" is the meta method and adaptation (below) with the lowest
    mean validation MAE after 1 step over the report seeds (validation rows, never test). Every method is also adapted "guarded" (each
    client keeps its best iterate of 0..s steps on its own validation rows: ``mae_1g``) and by
    guarded damped-Newton steps (``mae_1n``, the damping in ``NEWTON_DAMPING`` chosen on the
    validation rows); Ditto's personal model (``mae_5n``: five guarded Newton steps on the client's
    loss plus (λ/2)|p - global|^2, which is Ditto's personal objective around a FedAvg / FedProx
    global model, solved nearly exactly) is a fourth anchor adaptation; the best anchor is the best
    of the anchors under all four. Headroom: per (seed, client) the lowest test MAE of any method,
    adaptation or alone, chosen on the test rows — a bound no method reaches, so a target below it
    is out of reach for this model family.
    Rounds to target: the first round at which a method's validation MAE after 1 step (the
    training history) reaches FedAvg's at its last round, over FedAvg's rounds.
(d) Drift: ``data.drifting_stream`` of 240 batches x 50 rows, change at batch 120; streams with
    new regimes (concept + covariate drift), with the same regimes in new shares .1/.1/.2/.6
    (covariate drift, large) or equal shares (mild), and stationary streams (one segment: no
    change) for false alarms; 10 seeds each (quick 3). Signal: per-row log-loss of a model fixed
    after a warm-up of 20 batches (adaptive partition at granularity 0.5 + one ordinal fit per
    part, as ``drift.follow_stream`` does). river's ADWIN (delta 0.002) and PageHinkley
    (mode="both", two-sided as ours) take it row by row; ours take it 50 rows at a time
    (``drift.ADWIN``, ``drift.PageHinkley``), KS takes the features of each 50-row batch against
    the warm-up rows (re-referenced on the 500 rows after an alarm), and "ours KS|ADWIN" is the
    two together, all detectors reset on either's alarm (what ``follow_stream`` does); KS|ADWIN
    also runs on 20-row batches (below river ADWIN's clock of 32 rows; KS's level is 1e-3 per 50
    rows, 4e-4 on 20-row batches, so the false-alarm rate per row is the same). Delay in rows: river
    ``row - change row + 1``, ours ``(alarm batch - change batch + 1) x batch rows``; an
    alarm counts as the detection if it is the first within 3,000 rows of the change, every
    other alarm is false (``drift.score_alarms``).
(d') Detectors alone on unit-variance streams (``unit_section``): 20 streams per shift of -1,
    +0.25, +0.5, +1 sd, a doubling of the sd, and none; river's ADWIN and PageHinkley row by row,
    ours on 16-row batches (ADWIN's clock, so it tests at the same rows as row by row); quick: 10
    streams per shift.
(e) Flower cross-check: if ``flwr`` is importable, FedAvg whose server step is Flower's own
    weighted average (``flwr.server.strategy.aggregate.aggregate``) on the fair clients of the
    first report seed, against ``fed.train(method="fedavg")`` round by round; else skipped
    (flwr is not a dependency).

Run from the repository root::

    .venv/bin/python benchmarks/federated.py                  # full run, about 10 min on 2 CPU cores
    .venv/bin/python benchmarks/federated.py --quick          # about 2 minutes
    .venv/bin/python benchmarks/federated.py --json out.json  # also write every table + machine
"""
from __future__ import annotations

import math
import os
import time
import warnings
from dataclasses import asdict, dataclass, replace

import numpy as np
import pandas as pd
import torch
from machine import Clock, describe, epilogue, parse_args, show
from scipy import stats
from tqdm.auto import tqdm

from adaptive_kit import federated as fed
from adaptive_kit.federated import adaptive_partition, data, drift, local_accuracy, ordinal, profile

CLIENTS = {  # data set -> clients (parts of our partition)
    # fair: 6,366 rows / 8 = ~800 per client, ~480 train rows for 12 parameters (40 per parameter)
    "fair": 8,
    # randhie: 20,190 rows / 12 = ~1,700 per client; more clients, still ~85 train rows per parameter
    "randhie": 12,
    # mixture: 8,000 rows / 10 = 800: the regimes' shares .4/.3/.2/.1 are 4/3/2/1 whole clients
    "mixture": 10,
    # anes96: 944 rows / 6 = ~157 per client, ~94 train rows for 14 parameters: clients too small alone
    "anes96": 6,
}
ANCHORS = ("fedavg", "fedprox", "oneshot")
NEWTON_DAMPING = (0.03, 0.3, 3.0)  # damped-Newton adaptation: chosen per run on the validation rows (quick: ends)
ADAPTATION = {"1": "1 step", "1g": "1 step guarded", "1n": "1 Newton step guarded",
              "5n": "Ditto personal model"}
ANCHOR_KINDS = ("1", "1g", "1n", "5n")  # 5n: 5 guarded Newton steps on own loss + (λ/2)|p - global|^2 = Ditto's solve
LOCAL_LRS = (0.1, 0.3, 1.0)


def second_axis(method: str) -> tuple[str, tuple]:
    """The method-specific hyper-parameter of the tuning grid and its two values."""
    if method in ("fedavg", "oneshot"):
        return "local_steps", (1, 5)  # FedAvg: 1 = FedSGD; one-shot: steps x rounds alone
    if method == "fedprox":
        return "mu", (0.01, 0.1)
    return "server_lr", (0.02, 0.1)  # Adam on the meta-gradient


def grid(method: str, quick: bool) -> list[dict]:
    name, values = second_axis(method)
    if quick:
        return [{"local_lr": lr, name: values[1]} for lr in (0.3, 1.0)]
    return [{"local_lr": lr, name: v} for lr in LOCAL_LRS for v in values]


def median_time(fn, reps: int) -> tuple[float, object]:
    times, out = [], None
    for _ in range(reps):
        t0 = time.perf_counter()
        out = fn()
        times.append(time.perf_counter() - t0)
    return float(np.median(times)), out


# ================================================================================ (a) OrderedModel
def ordered_model(quick: bool) -> pd.DataFrame:
    from statsmodels.miscmodels.ordinal_model import OrderedModel

    sets = {"fair": data.fair(), "randhie": data.randhie(), "mixture": data.mixture(n=8000, seed=0)[0],
            "anes96": data.anes96()}
    reps = 1 if quick else 3
    ordinal.fit(sets["fair"].x[:500], sets["fair"].y[:500])  # torch's first L-BFGS call pays a one-off set-up
    rows = []
    for name, d in tqdm(sets.items(), desc="(a) OrderedModel"):
        x, y = d.x.double(), d.y
        t_ours, f = median_time(lambda x=x, y=y: ordinal.fit(x, y), reps)

        def sm(x=x, y=y):
            with warnings.catch_warnings():
                warnings.simplefilter("ignore")
                return OrderedModel(y.numpy(), x.numpy(), distr="logit").fit(method="bfgs", maxiter=2000,
                                                                             gtol=1e-8, disp=False)

        t_sm, res = median_time(sm, reps)
        k = x.shape[1]
        th = np.asarray(res.model.transform_threshold_params(res.params))[1:-1]
        rows.append({"data": name, "rows": len(y), "features": k, "classes": d.classes,
                     "coef_max_abs_diff": float(np.abs(f.coef.numpy() - np.asarray(res.params)[:k]).max()),
                     "threshold_max_abs_diff": float(np.abs(f.thresholds.numpy() - th).max()),
                     "nll_ours": f.nll, "nll_statsmodels": float(-res.llf / len(y)),
                     "ours_s": t_ours, "statsmodels_s": t_sm, "x_ours": t_sm / t_ours,
                     "ours_iters": f.iterations, "sm_converged": bool(res.mle_retvals.get("converged", False))})
    return pd.DataFrame(rows)


# ================================================================================ (b) partition quality
@dataclass
class KDTree:
    """A balanced kd-tree: per internal node (feature, threshold, left, right); a child < 0 is the
    leaf -(part + 1), as in ``DataPartition``."""

    nodes: list[tuple[int, float, int, int]]
    labels: np.ndarray
    parts: int

    @classmethod
    def build(cls, z: np.ndarray, parts: int) -> KDTree:
        nodes: list[tuple[int, float, int, int]] = []
        labels = np.zeros(len(z), dtype=int)
        count = 0

        def grow(rows: np.ndarray, t: int) -> int:
            nonlocal count
            if t == 1 or len(rows) < 2:
                labels[rows] = count
                count += 1
                return -count
            f = int(np.argmax(z[rows].std(axis=0)))  # the feature of widest spread here
            v = np.sort(z[rows, f])
            t_left = t // 2  # split counts in proportion to the leaves on each side
            cut = min(max(round(len(v) * t_left / t), 1), len(v) - 1)
            threshold = 0.5 * (v[cut - 1] + v[cut])
            right = z[rows, f] > threshold
            i = len(nodes)
            nodes.append((f, threshold, 0, 0))
            nodes[i] = (f, threshold, grow(rows[~right], t_left), grow(rows[right], t - t_left))
            return i

        grow(np.arange(len(z)), parts)
        return cls(nodes, labels, count)

    def assign(self, z: np.ndarray) -> np.ndarray:
        out = np.zeros(len(z), dtype=int)

        def route(node: int, rows: np.ndarray) -> None:
            if node < 0:
                out[rows] = -node - 1
                return
            f, threshold, left, right = self.nodes[node]
            go = z[rows, f] > threshold
            route(left, rows[~go])
            route(right, rows[go])

        if self.nodes:
            route(0, np.arange(len(z)))
        return out


def partition_quality(quick: bool) -> tuple[pd.DataFrame, pd.DataFrame]:
    seeds = (0, 1) if quick else (0, 1, 2, 3, 4)
    rows = []
    for seed, P in tqdm([(s, P) for s in seeds for P in (16, 8)], desc="(b) partitions"):
        d, regime = data.mixture(n=8000, seed=seed)
        perm = torch.randperm(len(d.y), generator=torch.Generator().manual_seed(1000 + seed))
        tr, te = perm[:6000], perm[6000:]
        xtr, ytr, xte, yte = d.x[tr].double(), d.y[tr], d.x[te].double(), d.y[te]
        mean, std = xtr.mean(0), xtr.std(0)
        ztr, zte = ((xtr - mean) / std).float(), ((xte - mean) / std).float()
        methods = {}
        t0 = time.perf_counter()
        g = torch.Generator().manual_seed(seed)
        methods["random"] = (torch.randperm(6000, generator=g) % P, torch.randint(P, (2000,), generator=g),
                             time.perf_counter() - t0)
        t0 = time.perf_counter()
        kd = KDTree.build(ztr.numpy(), P)
        methods["kd-tree"] = (kd.labels, kd.assign(zte.numpy()), time.perf_counter() - t0)
        t0 = time.perf_counter()
        centres, lab = profile.kmeans(ztr, P, seed=seed)
        methods["k-means"] = (lab, torch.cdist(zte, centres).argmin(1), time.perf_counter() - t0)
        t0 = time.perf_counter()
        ours = adaptive_partition(xtr.float(), ytr, 1.0, 50, max_parts=P, seed=seed)
        methods["ours"] = (ours.labels, ours.assign(xte.float()), time.perf_counter() - t0)
        methods["oracle (4 regimes)"] = (regime[tr], regime[te], 0.0)
        for name, (ltr, lte, secs) in methods.items():
            ltr, lte = np.asarray(ltr), np.asarray(lte)
            sizes = np.bincount(ltr)
            sizes = sizes[sizes > 0]
            rows.append({"P": P, "seed": seed, "method": name, "parts": len(sizes),
                         "accuracy": local_accuracy(xtr, ytr, torch.as_tensor(ltr), xte, yte,
                                                              torch.as_tensor(lte), d.classes),
                         "largest_x_mean": float(sizes.max() / sizes.mean()),
                         "smallest_x_mean": float(sizes.min() / sizes.mean()), "partition_s": secs})
    table = pd.DataFrame(rows)
    order = {m: i for i, m in enumerate(("random", "kd-tree", "k-means", "ours", "oracle (4 regimes)"))}
    summary = (table.groupby(["P", "method"], sort=False)
               .agg(seeds=("seed", "count"), accuracy=("accuracy", "mean"), accuracy_sd=("accuracy", "std"),
                    accuracy_min=("accuracy", "min"), largest_x_mean=("largest_x_mean", "mean"),
                    largest_x_mean_max=("largest_x_mean", "max"), smallest_x_mean=("smallest_x_mean", "mean"),
                    partition_s=("partition_s", "median"))
               .reset_index().sort_values(["P", "method"], ascending=[False, True],
                                          key=lambda s: s.map(order) if s.name == "method" else s))
    return table, summary


# ================================================================================ (c) federated methods
def load(name: str) -> data.OrdinalData:
    return data.mixture(n=8000, seed=0)[0] if name == "mixture" else getattr(data, name)()


def config_label(method: str, conf: dict) -> str:
    name, _ = second_axis(method)
    return f"lr={conf['local_lr']:g} {name}={conf[name]:g}"


def per_client(ev: dict) -> dict[str, np.ndarray]:
    return {f"{k}_{s}": v[k].numpy() for s, v in ev.items() for k in ("accuracy", "mae")}


def rounds_to(history: list[dict], target: float) -> float:
    """1-based first round whose validation MAE after 1 step is at most ``target`` (inf: never)."""
    return next((float(h["round"] + 1) for h in history if h["val_mae"] <= target + 1e-12), math.inf)


def paired(d: np.ndarray) -> tuple[float, float, float]:
    """Mean and 95 % t-interval of paired differences."""
    m = float(d.mean())
    half = float(stats.t.ppf(0.975, len(d) - 1) * d.std(ddof=1) / math.sqrt(len(d))) if len(d) > 1 else math.nan
    return m, m - half, m + half


def federated(quick: bool) -> dict:
    rounds = 15 if quick else 60
    report_seeds = (1, 2) if quick else (1, 2, 3, 4, 5)
    tune_rows, res_rows, pair_rows, rtt_rows = [], [], [], []
    headroom: dict[str, dict[str, float]] = {}
    chosen_cfg: dict[str, dict[str, fed.FederatedConfig]] = {}
    parts: dict[str, torch.Tensor] = {}
    part_seconds: dict[str, float] = {}
    for name, P in CLIENTS.items():
        d = load(name)
        t0 = time.perf_counter()
        part = adaptive_partition(d.x, d.y, 1.0, 50, max_parts=P, seed=0)
        part_s = time.perf_counter() - t0
        parts[name] = part.labels
        sizes = part.sizes().double()
        # ---- tuning on seed 0's validation split
        clients = fed.make_clients(d.x, d.y, part.labels, seed=0)
        jobs = [(m, c) for m in fed.METHODS for c in grid(m, quick)]
        best: dict[str, tuple[float, float, fed.FederatedConfig, dict]] = {}
        for method, conf in tqdm(jobs, desc=f"(c) tune {name}", leave=False):
            cfg = fed.FederatedConfig(method=method, rounds=rounds, seed=0, **conf)
            t0 = time.perf_counter()
            res = fed.train(clients, cfg)
            secs = time.perf_counter() - t0
            ev = fed.evaluate(res.model, clients, (1,), l2=cfg.l2, split="val")[1]
            mae, loss = float(ev["mae"].mean()), float(torch.nan_to_num(ev["loss"], nan=math.inf).mean())
            row = {"data": name, "method": method, "config": config_label(method, conf), "val_mae_1": mae,
                   "val_loss_1": loss, "failed": len(res.failed), "train_s": secs, "chosen": ""}
            tune_rows.append(row)
            if method not in best or (mae, loss) < best[method][:2]:
                best[method] = (mae, loss, cfg, row)
        for m in fed.METHODS:
            best[m][3]["chosen"] = "<-"
        chosen_cfg[name] = {m: best[m][2] for m in fed.METHODS}
        val_mae: dict[tuple[str, str], list[float]] = {}  # (method, adaptation) -> per report seed
        # ---- report seeds: test metrics
        per: dict[str, dict[str, list]] = {m: {} for m in (*fed.METHODS, "alone")}
        hist: dict[str, list] = {m: [] for m in fed.METHODS}
        extra: dict[str, dict[str, list]] = {m: {"bytes": [], "train_s": [], "best_round": []} for m in fed.METHODS}
        for seed in tqdm(report_seeds, desc=f"(c) report {name}", leave=False):
            clients = fed.make_clients(d.x, d.y, part.labels, seed=seed)
            t0 = time.perf_counter()
            alone_params = fed.local_only(clients)
            alone_s = time.perf_counter() - t0
            alone = per_client(fed.evaluate(alone_params, clients, (0,), l2=1e-4))
            for k, v in alone.items():
                per["alone"].setdefault(k, []).append(v)
            per["alone"].setdefault("train_s", []).append(alone_s)
            for method in fed.METHODS:
                cfg = replace(chosen_cfg[name][method], seed=seed)
                t0 = time.perf_counter()
                res = fed.train(clients, cfg)
                extra[method]["train_s"].append(time.perf_counter() - t0)
                extra[method]["bytes"].append(res.bytes_per_client)
                extra[method]["best_round"].append(res.best_round)
                hist[method].append(res.history)
                pc = per_client(fed.evaluate(res.model, clients, (0, 1, 5), l2=cfg.l2))
                # guarded: each client keeps its best iterate on its own validation rows (early stopping)
                pc.update({f"{k}g": v for k, v in per_client(
                    fed.evaluate(res.model, clients, (1, 5), l2=cfg.l2, guard=True)).items()})
                # guarded damped Newton steps from the global model, damping chosen on the validation rows
                val_n = {a: float(fed.evaluate(res.model.params, clients, (1,), lr=1.0, l2=cfg.l2, split="val",
                                                guard=True, newton=a)[1]["mae"].mean())
                         for a in (NEWTON_DAMPING[::2] if quick else NEWTON_DAMPING)}
                lam = min(val_n, key=val_n.get)
                pc.update({f"{k}n": v for k, v in per_client(fed.evaluate(
                    res.model.params, clients, (1, 5), lr=1.0, l2=cfg.l2, guard=True, newton=lam)).items()})
                extra[method].setdefault("damping", []).append(lam)
                # validation MAE after 1 step of each adaptation: what picks "ours" (never the test rows)
                for kind, v in (("1", fed.evaluate(res.model, clients, (1,), l2=cfg.l2, split="val")),
                                ("1g", fed.evaluate(res.model, clients, (1,), l2=cfg.l2, split="val", guard=True))):
                    val_mae.setdefault((method, kind), []).append(float(v[1]["mae"].mean()))
                val_mae.setdefault((method, "1n"), []).append(val_n[lam])
                for k, v in pc.items():
                    per[method].setdefault(k, []).append(v)
                for s in ("0", "1", "5", "1g", "5g", "1n", "5n"):
                    per[method].setdefault(f"worse_{s}", []).append(pc[f"mae_{s}"] > alone["mae_0"] + 1e-12)
        cat = {m: {k: np.concatenate(v) for k, v in per[m].items() if k != "train_s"} for m in per}
        # ours: the meta method and adaptation with the lowest mean validation MAE after 1 step
        ours, ours_kind = min(((m, k) for m in fed.META_METHODS for k in ("1", "1g", "1n")),
                              key=lambda mk: float(np.mean(val_mae[mk])))
        for m in (*fed.METHODS, "alone"):
            c = cat[m]
            row = {"data": name, "clients": P, "sizes": f"{int(sizes.min())}-{int(sizes.max())}",
                   "method": m + (" (ours)" if m == ours else ""),
                   "config": config_label(m, {"local_lr": chosen_cfg[name][m].local_lr,
                                              second_axis(m)[0]: getattr(chosen_cfg[name][m], second_axis(m)[0])})
                   if m != "alone" else "L-BFGS fit per client"}
            for s in (0, 1, 5):
                row[f"acc_{s}"] = float(c[f"accuracy_{s}"].mean()) if f"accuracy_{s}" in c else math.nan
            for s in (0, 1, 5):
                row[f"mae_{s}"] = float(c[f"mae_{s}"].mean()) if f"mae_{s}" in c else math.nan
            if m == "alone":
                row["acc_0"], row["mae_0"] = float(c["accuracy_0"].mean()), float(c["mae_0"].mean())
                row.update(worse_1=math.nan, worse_5=math.nan, bytes_per_client=0,
                           train_s=float(np.mean(per["alone"]["train_s"])))
            else:
                row.update({f"mae_{s}": float(c[f"mae_{s}"].mean()) for s in ("1g", "5g", "1n", "5n")})
                row.update(worse_1g=float(c["worse_1g"].mean()), worse_1n=float(c["worse_1n"].mean()),
                           damping="/".join(f"{a:g}" for a in sorted(set(extra[m]["damping"]))))
                row.update(worse_1=float(c["worse_1"].mean()), worse_5=float(c["worse_5"].mean()),
                           bytes_per_client=int(np.median(extra[m]["bytes"])),
                           train_s=float(np.mean(extra[m]["train_s"])))
            res_rows.append(row)
        # the best anchor: over anchors and over their plain / guarded / guarded-Newton fine-tuning
        anchor, a_kind = min(((a, k) for a in ANCHORS for k in ANCHOR_KINDS), key=lambda ak: cat[ak[0]][f"mae_{ak[1]}"].mean())
        base = cat[anchor][f"mae_{a_kind}"]
        # headroom: per (seed, client) the lowest test MAE of any method, adaptation or alone —
        # chosen on the test rows, so no real method can do better; if it is not 5 % below the
        # best anchor, the target is out of reach for this model family on this data
        every = [cat[m][f"mae_{k}"] for m in fed.METHODS for k in ("0", "1", "5", "1g", "5g", "1n", "5n")]
        oracle = np.minimum.reduce([*every, cat["alone"]["mae_0"]])
        headroom[name] = {"oracle_mae": float(oracle.mean()), "anchor_mae": float(base.mean()),
                          "rel": float(oracle.mean() / base.mean() - 1)}
        for m in fed.META_METHODS:
            for kind in ("1", "1g", "1n"):
                diff = cat[m][f"mae_{kind}"] - base
                mean, lo, hi = paired(diff)
                pair_rows.append({"data": name, "method": m + (" (ours)" if m == ours else ""),
                                  "adaptation": ADAPTATION[kind], "vs": f"{anchor} {ADAPTATION[a_kind]}",
                                  "pairs": len(diff), "anchor_mae_1": float(base.mean()),
                                  "method_mae_1": float(cat[m][f"mae_{kind}"].mean()), "diff": mean, "ci_lo": lo,
                                  "ci_hi": hi, "rel_change": mean / float(base.mean()), "rel_ci_lo": lo / float(base.mean()),
                                  "rel_ci_hi": hi / float(base.mean()),
                                  "worse_than_alone_1": float(cat[m][f"worse_{kind}"].mean()),
                                  "is_ours": m == ours and kind == ours_kind})
        # ---- rounds to FedAvg + fine-tuning's final validation MAE
        for m in fed.METHODS:
            if m == "oneshot":
                continue
            fr, fedavg_own = [], []
            for i in range(len(report_seeds)):
                fh = hist["fedavg"][i]
                target = fh[-1]["val_mae"]
                r = rounds_to(hist[m][i], target)
                fr.append(r / len(fh))
                fedavg_own.append(rounds_to(fh, target) / len(fh))
            per_round = extra[m]["bytes"][0] / rounds
            rtt_rows.append({"data": name, "method": m + (" (ours)" if m == ours else ""),
                             "fedavg_final_val_mae": float(np.mean([h[-1]["val_mae"] for h in hist["fedavg"]])),
                             "reached": f"{sum(math.isfinite(f) for f in fr)}/{len(fr)}",
                             "median_fraction": float(np.median(fr)), "max_fraction": float(np.max(fr)),
                             "fedavg_own_fraction": float(np.median(fedavg_own)),
                             "bytes_to_target": per_round * float(np.median(fr)) * rounds, "is_ours": m == ours})
        part_seconds[name] = part_s
    return {"tuning": pd.DataFrame(tune_rows), "results": pd.DataFrame(res_rows), "paired": pd.DataFrame(pair_rows),
            "rounds": pd.DataFrame(rtt_rows), "headroom": headroom, "configs": chosen_cfg, "partition_s": part_seconds, "parts": parts, "rounds_run": rounds,
            "report_seeds": report_seeds}


# ================================================================================ (d) drift
BATCH, BATCHES, CHANGE, WARMUP, REF_ROWS, HORIZON = 50, 240, 120, 20, 500, 3000
SMALL_BATCH = 20  # a second batch size for ours KS|ADWIN: below river ADWIN's clock of 32 rows
KINDS = {
    "stationary": {"changes": (), "shares": (data.MIXTURE_WEIGHTS,)},
    "new regimes": {"new_regimes": True},
    "shares -> .1/.1/.2/.6": {"new_regimes": False},
    "shares -> equal": {"new_regimes": False, "shares": (data.MIXTURE_WEIGHTS, (0.25, 0.25, 0.25, 0.25))},
}


def loss_signal(s: data.Stream, seed: int) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """(per-row loss after the warm-up, features after the warm-up, warm-up features): a model
    fixed after the warm-up batches, one ordinal fit per part of an adaptive partition."""
    d = s.x.shape[-1]
    xw, yw = s.x[:WARMUP].reshape(-1, d), s.y[:WARMUP].reshape(-1)
    classes = ordinal.check_ordinal(s.y.reshape(-1))
    part = adaptive_partition(xw, yw, 0.5, 50, seed=seed)
    models = drift.fit_parts(xw.double(), yw, part, classes)
    x, y = s.x[WARMUP:].reshape(-1, d), s.y[WARMUP:].reshape(-1)
    loss, _ = drift.score_rows(models, part, x, y, classes)
    return loss.numpy(), x.numpy(), xw.numpy()


def run_river(cls, loss: np.ndarray, **kw) -> tuple[list[int], float]:
    det = cls(**kw)
    alarms = []
    t0 = time.perf_counter()
    for i, v in enumerate(loss.tolist()):
        det.update(v)
        if det.drift_detected:
            alarms.append(i)
    return alarms, time.perf_counter() - t0


def run_ours(which: tuple[str, ...], loss: np.ndarray, x: np.ndarray, ref: np.ndarray,
             batch: int = BATCH) -> tuple[list[int], float]:
    """Batch detectors; an alarm is reported at the row that fired (river's row for ADWIN and
    Page-Hinkley, the batch's last row for KS). Together (more than one
    detector), every detector is reset on any alarm, as in ``drift.follow_stream``; KS takes the
    next ``REF_ROWS`` rows as its new reference after an alarm."""
    adwin = drift.ADWIN() if "adwin" in which else None
    ph = drift.PageHinkley() if "ph" in which else None
    # KS's level scales with the batch, so its false-alarm rate per row stays that of 1e-3 per 50 rows
    ks = drift.KSDrift(alpha=1e-3 * batch / BATCH, reference=ref) if "ks" in which else None
    together = len(which) > 1
    alarms, collecting = [], None
    t0 = time.perf_counter()
    for b in range(len(loss) // batch):
        lb, xb = loss[b * batch:(b + 1) * batch], x[b * batch:(b + 1) * batch]
        at = [b * batch + det.fired_at for det in (adwin, ph) if det is not None and det.update(lb)]
        fired = bool(at)
        if ks is not None:
            if collecting is not None:
                collecting.append(xb)
                if len(collecting) * batch >= REF_ROWS:
                    ks.reset(np.concatenate(collecting))
                    collecting = None
            elif ks.update(xb):
                fired, collecting = True, []
        if fired:
            alarms.append(min(at) if at else (b + 1) * batch - 1)
            if together:
                if adwin is not None:
                    adwin.reset()
                if ph is not None:
                    ph.reset()
                if ks is not None and collecting is None:
                    collecting = []
    return alarms, time.perf_counter() - t0


def drift_section(quick: bool) -> tuple[pd.DataFrame, pd.DataFrame]:
    import river.drift as rd

    seeds = range(3) if quick else range(10)
    change_row = (CHANGE - WARMUP) * BATCH
    rows = []
    for kind, kw in tqdm(KINDS.items(), desc="(d) drift"):
        for seed in seeds:
            args = {"changes": (CHANGE,), **kw}
            s = data.drifting_stream(batches=BATCHES, batch=BATCH, seed=seed, **args)
            loss, x, ref = loss_signal(s, seed)
            changes = [change_row] if args["changes"] else []
            ratio = float(loss[change_row:].mean() / loss[:change_row].mean()) if changes else 1.0
            runs = {"river ADWIN": run_river(rd.ADWIN, loss, delta=0.002),
                    "river PageHinkley": run_river(rd.PageHinkley, loss, mode="both"),
                    "ours ADWIN": run_ours(("adwin",), loss, x, ref),
                    "ours PageHinkley": run_ours(("ph",), loss, x, ref),
                    "ours KS": run_ours(("ks",), loss, x, ref),
                    "ours KS|ADWIN": run_ours(("ks", "adwin"), loss, x, ref),
                    f"ours KS|ADWIN, {SMALL_BATCH}-row batches": run_ours(("ks", "adwin"), loss, x, ref, SMALL_BATCH)}
            for det, (alarms, secs) in runs.items():
                sc = drift.score_alarms(alarms, changes, HORIZON)
                delay = sc["delays"][0] + 1 if changes and sc["delays"][0] is not None else None
                rows.append({"kind": kind, "seed": seed, "detector": det, "loss_ratio": ratio,
                             "delay_rows": delay, "missed": sc["missed"], "false_alarms": sc["false_alarms"],
                             "alarms": len(alarms), "ms_per_10k_rows": 1e3 * secs * 1e4 / len(loss)})
    table = pd.DataFrame(rows)
    out = []
    for (kind, det), g in table.groupby(["kind", "detector"], sort=False):
        drifting = kind != "stationary"
        found = g.delay_rows.dropna()
        capped = g.delay_rows.fillna(HORIZON) if drifting else pd.Series(dtype=float)
        out.append({"kind": kind, "detector": det, "streams": len(g), "loss_ratio": g.loss_ratio.mean(),
                    "detected": f"{len(found)}/{len(g)}" if drifting else "-",
                    "mean_delay": found.mean() if len(found) else math.nan,
                    "median_delay": found.median() if len(found) else math.nan,
                    "capped_mean_delay": capped.mean() if drifting else math.nan,
                    "false_alarms": int(g.false_alarms.sum()), "false_per_stream": g.false_alarms.mean(),
                    "ms_per_10k_rows": g.ms_per_10k_rows.median()})
    return table, pd.DataFrame(out)


UNIT_SHIFTS = {"-1 sd": -1.0, "+0.25 sd": 0.25, "+0.5 sd": 0.5, "+1 sd": 1.0, "sd x 2": "sd", "none": 0.0}
UNIT_BEFORE, UNIT_AFTER, UNIT_STREAMS, UNIT_BATCH = 2000, 2000, 20, 16


def unit_stream(shift: float | str, seed: int) -> np.ndarray:
    """``UNIT_BEFORE`` N(0, 1) values, then ``UNIT_AFTER`` moved by ``shift`` sd (or with sd 2)."""
    rng = np.random.default_rng(1000 + seed)
    tail = rng.normal(0, 2, UNIT_AFTER) if shift == "sd" else rng.normal(shift, 1, UNIT_AFTER)
    return np.concatenate([rng.normal(0, 1, UNIT_BEFORE), tail])


def unit_section(quick: bool) -> pd.DataFrame:
    """(d') Detectors side by side on unit-variance streams: river's ADWIN and Page-Hinkley row by
    row, ours on batches of ``UNIT_BATCH`` rows (ADWIN's clock: it tests at the same rows as row by
    row), same defaults (ADWIN delta 0.002; Page-Hinkley delta 0.005, threshold 50, two-sided).
    Detected: an alarm after the change; delay: its row - change row; false: every other alarm."""
    import river.drift as rd

    rows = []
    for kind, shift in UNIT_SHIFTS.items():
        found: dict[str, list] = {}
        for seed in range(UNIT_STREAMS // 2 if quick else UNIT_STREAMS):
            v = unit_stream(shift, seed)
            runs = {"river ADWIN": run_river(rd.ADWIN, v, delta=0.002),
                    "river PageHinkley": run_river(rd.PageHinkley, v, mode="both"),
                    "ours ADWIN": run_batches(drift.ADWIN(), v), "ours PageHinkley": run_batches(drift.PageHinkley(), v)}
            for det, (alarms, secs) in runs.items():
                after = [a for a in alarms if a >= UNIT_BEFORE]
                found.setdefault(det, []).append((after[0] - UNIT_BEFORE + 1 if after and shift else None,
                                                  len(alarms) - (1 if after and shift else 0), secs))
        for det, f in found.items():
            delays = [d for d, _, _ in f if d is not None]
            rows.append({"shift": kind, "detector": det, "streams": len(f),
                         "detected": f"{len(delays)}/{len(f)}" if shift else "-",
                         "mean_delay": float(np.mean(delays)) if delays else math.nan,
                         "false_alarms": sum(x for _, x, _ in f),
                         "ms_per_10k_rows": 1e3 * float(np.median([t for _, _, t in f])) * 1e4 / (UNIT_BEFORE + UNIT_AFTER)})
    return pd.DataFrame(rows)


def run_batches(det, v: np.ndarray, batch: int = UNIT_BATCH) -> tuple[list[int], float]:
    """Alarms at the row that fired (``fired_at``: the detector says which)."""
    t0 = time.perf_counter()
    alarms = [i + det.fired_at for i in range(0, len(v), batch) if det.update(v[i:i + batch])]
    return alarms, time.perf_counter() - t0


# ================================================================================ (e) Flower
def flower(quick: bool, fres: dict) -> tuple[pd.DataFrame, str]:
    try:
        from flwr.server.strategy.aggregate import aggregate
    except ImportError:
        return pd.DataFrame(), "flwr not installed — skipped"
    d = load("fair")
    seed = fres["report_seeds"][0]
    clients = fed.make_clients(d.x, d.y, fres["parts"]["fair"], seed=seed)
    cfg = replace(fres["configs"]["fair"]["fedavg"], seed=seed)
    trace = []
    fed.train(clients, cfg, on_step=lambda r, model, row: trace.append(model.params.clone()))
    p = ordinal.init_params(clients.features, clients.classes)
    sizes = clients.sizes.tolist()
    worst = 0.0
    t0 = time.perf_counter()
    for r in range(cfg.rounds):
        local = fed.adapt(p, clients, cfg.local_steps, cfg.local_lr, cfg.l2)
        p = torch.as_tensor(aggregate([([local[i].numpy()], int(sizes[i])) for i in range(clients.n)])[0])
        worst = max(worst, float((p - trace[r]).abs().max()))
    secs = time.perf_counter() - t0
    ours = fed.evaluate(trace[-1], clients, (0, 1), lr=cfg.local_lr, l2=cfg.l2)
    fl = fed.evaluate(p, clients, (0, 1), lr=cfg.local_lr, l2=cfg.l2)
    import flwr

    return pd.DataFrame([{"data": "fair", "seed": seed, "rounds": cfg.rounds, "config": f"lr={cfg.local_lr:g} "
                          f"local_steps={cfg.local_steps}", "max_abs_param_diff": worst,
                          "ours_mae_1": float(ours[1]["mae"].mean()), "flower_mae_1": float(fl[1]["mae"].mean()),
                          "ours_mae_0": float(ours[0]["mae"].mean()), "flower_mae_0": float(fl[0]["mae"].mean()),
                          "flower_s": secs}]), f"flwr {flwr.__version__}"


# ================================================================================ targets and main
def targets(om: pd.DataFrame, pq: pd.DataFrame, fres: dict, dsum: pd.DataFrame, ut: pd.DataFrame) -> pd.DataFrame:
    rows = []

    def add(target: str, value: str, met: bool | None) -> None:
        rows.append({"target": target, "value": value, "met": "n/a" if met is None else "yes" if met else "no"})

    c, t = float(om.coef_max_abs_diff.max()), float(om.threshold_max_abs_diff.max())
    add("(a) coefficients (and thresholds) within 1e-3 of OrderedModel",
        f"max |coef diff| {c:.1e}, |threshold diff| {t:.1e} over {len(om)} data sets", max(c, t) <= 1e-3)
    pr = fres["paired"]
    for name in CLIENTS:
        r = pr[(pr.data == name) & pr.is_ours].iloc[0]
        h = fres["headroom"][name]
        add(f"(c) {name}: ours' MAE after 1 step >= 5% below the best tuned anchor, <= 10% of clients worse "
            "than alone",
            f"{r.method.split()[0]} + {r.adaptation} {r.method_mae_1:.4f} vs {r.vs} {r.anchor_mae_1:.4f}: change "
            f"{100 * r.rel_change:+.1f}% [{100 * r.rel_ci_lo:+.1f}, {100 * r.rel_ci_hi:+.1f}] (needs <= -5%); "
            f"worse than alone {100 * r.worse_than_alone_1:.0f}%; headroom: the best of every method per client, "
            f"chosen on test, {h['oracle_mae']:.4f} ({100 * h['rel']:+.1f}%)",
            bool(r.rel_change <= -0.05 and r.worse_than_alone_1 <= 0.10))
    rt = fres["rounds"]
    ours_rt = rt[rt.is_ours]
    value = "; ".join(f"{r.data} {r.method.split()[0]} {r.median_fraction:.2f} ({r.reached})" for r in ours_rt.itertuples())
    add("(c) FedAvg + fine-tuning's final MAE reached in <= 1/3 of its rounds (median over seeds)",
        value, bool((ours_rt.median_fraction <= 1 / 3).all()))
    o = pq[(pq.P == 16) & (pq.method == "ours")].iloc[0]
    add("(b) partition >= 87% accuracy on the mixture, largest subset <= 1.10x the mean (P=16)",
        f"accuracy {o.accuracy:.3f} (min {o.accuracy_min:.3f}); largest {o.largest_x_mean_max:.3f}x mean (worst seed)",
        bool(o.accuracy >= 0.87 and o.largest_x_mean_max <= 1.10 + 1e-9))
    drifting = [k for k in KINDS if k != "stationary"]
    ours = dsum[dsum.detector == "ours KS|ADWIN"].set_index("kind")
    river = dsum[dsum.detector == "river ADWIN"].set_index("kind")
    delay_ok = all(ours.loc[k, "capped_mean_delay"] <= river.loc[k, "capped_mean_delay"] for k in drifting)
    fa_o, fa_r = int(ours.false_alarms.sum()), int(river.false_alarms.sum())
    small = dsum[dsum.detector == f"ours KS|ADWIN, {SMALL_BATCH}-row batches"].set_index("kind")
    add(f"(d) drift delay <= river ADWIN's at no more false alarms (ours = KS|ADWIN, {BATCH}-row batches)",
        "capped mean delay " + ", ".join(f"{k}: {ours.loc[k, 'capped_mean_delay']:.0f} vs "
                                         f"{river.loc[k, 'capped_mean_delay']:.0f}" for k in drifting)
        + f" rows; false alarms {fa_o} vs {fa_r} (at {SMALL_BATCH}-row batches: delay "
        + ", ".join(f"{small.loc[k, 'capped_mean_delay']:.0f}" for k in drifting)
        + f"; false alarms {int(small.false_alarms.sum())})", delay_ok and fa_o <= fa_r)
    u = ut.set_index(["shift", "detector"])
    for mine, theirs in (("ours ADWIN", "river ADWIN"), ("ours PageHinkley", "river PageHinkley")):
        moved = [k for k in UNIT_SHIFTS if UNIT_SHIFTS[k]]
        det_ok = all(int(u.loc[(k, mine), "detected"].split("/")[0]) >= int(u.loc[(k, theirs), "detected"].split("/")[0])
                     for k in moved)
        delay_ok = all(not u.loc[(k, mine), "mean_delay"] > u.loc[(k, theirs), "mean_delay"] for k in moved)
        fa_m = int(ut[ut.detector == mine].false_alarms.sum())
        fa_t = int(ut[ut.detector == theirs].false_alarms.sum())
        add(f"(d') {mine} on unit-variance streams: detections >= {theirs}'s, delay <= its, false alarms <= its",
            "; ".join(f"{k}: {u.loc[(k, mine), 'detected']} d={u.loc[(k, mine), 'mean_delay']:.0f} vs "
                      f"{u.loc[(k, theirs), 'detected']} d={u.loc[(k, theirs), 'mean_delay']:.0f}" for k in moved)
            + f"; false alarms {fa_m} vs {fa_t}", det_ok and delay_ok and fa_m <= fa_t)
    return pd.DataFrame(rows)


def main(argv: list[str] | None = None) -> dict:
    args = parse_args(__doc__.splitlines()[0], "fewer seeds, configurations and rounds (under 3 minutes)", argv)
    quick = args.quick
    info = describe(torch.device("cpu"))  # small models: everything runs on the CPU
    print(f"device=cpu cpu={info['cpu']!r} cores={info['cpu_count']} threads={info['torch_threads']} "
          f"torch={info['torch']} mode={'quick' if quick else 'full'} load average at start={os.getloadavg()[0]:.2f}")
    torch.manual_seed(0)
    clock = Clock()

    def timed(section, fn, *a):
        with clock.section(section):
            return fn(quick, *a)

    om = timed("a", ordered_model)
    shown = om.copy()
    for c in ("coef_max_abs_diff", "threshold_max_abs_diff"):
        shown[c] = [f"{v:.1e}" for v in om[c]]
    show("(a) ordinal.fit against statsmodels OrderedModel (logit, BFGS)", shown, 6,
         note="diffs: max absolute difference of coefficients / thresholds; nll: mean negative log-likelihood; "
              "x_ours: statsmodels time / ours (above 1: ours faster); statsmodels at gtol 1e-8")

    pt, pq = timed("b", partition_quality)
    show("(b) Partition quality on the mixture (6,000 rows partitioned, 2,000 held out; one ordinal fit per part)",
         pq, 3, note="accuracy: held-out, mean over seeds (sd, min); largest_x_mean: largest part / mean part "
                     "(mean, max over seeds); partition_s: median time to partition")

    fres = timed("c", federated)
    tun = fres["tuning"]
    compact = []
    for (dname, m), g in tun.groupby(["data", "method"], sort=False):
        ch = g[g.chosen == "<-"].iloc[0]
        compact.append({"data": dname, "method": m, "configs": len(g), "chosen": ch.config, "val_mae_1": ch.val_mae_1,
                        "val_loss_1": ch.val_loss_1, "worst_val_mae_1": g.val_mae_1.max(),
                        "failed_updates": int(g.failed.sum()), "train_s": g.train_s.mean()})
    show("(c) Tuning on seed 0's validation split: the chosen configuration per method (every one in --json)",
         pd.DataFrame(compact), 4,
         note="val_mae_1 / val_loss_1: mean over clients after one adaptation step from the returned (best-on-"
              "validation) model; worst_val_mae_1: the worst configuration; failed_updates: client updates left "
              "out as non-finite over all configurations; train_s: mean per configuration")
    show(f"(c) Test metrics over report seeds {list(fres['report_seeds'])} (mean over seeds x clients), "
         f"{fres['rounds_run']} rounds", fres["results"], 4, note="acc_s / mae_s: after s local steps from the global model (fedavg at 1/5 = FedAvg + fine-tuning); "
                 "worse_s: share of (seed, client) whose MAE after s steps is above training alone; alone: each "
                 "client's own model (fed.local_only); bytes_per_client: sent + received over all rounds; "
                 "(ours): the meta method with the lowest tuning validation MAE; sizes: client rows (min-max); partition "
                 "time " + ", ".join(f"{k} {v:.1f} s" for k, v in fres["partition_s"].items()))
    show("(c) Paired MAE after 1 step: meta method - best anchor, per (seed, client), 95% t-interval", fres["paired"]
         .drop(columns=["is_ours"]), 4, note="best anchor: the anchor with the lowest mean test MAE after 1 step; "
                                             "rel_*: over the anchor's mean MAE (negative: the meta method is better)")
    show("(c) Rounds to FedAvg + fine-tuning's final validation MAE (after 1 step), over FedAvg's rounds",
         fres["rounds"].drop(columns=["is_ours"]), 3,
         note="median / max over report seeds (inf: not reached); fedavg_own_fraction: FedAvg's own first round at "
              "that MAE; bytes_to_target: bytes per client up to the median round")

    dt, dsum = timed("d", drift_section)
    show(f"(d) Drift on the per-row loss (and features): streams of {BATCHES} x {BATCH} rows, change at row "
         f"{(CHANGE - WARMUP) * BATCH} after a {WARMUP * BATCH}-row warm-up", dsum, 2,
         note=f"delay in rows (ours: batches of {BATCH} rows unless said); capped_mean_delay: a miss counts as {HORIZON}; "
              f"detected: first alarm within {HORIZON} rows of the change; false_alarms: every other alarm, summed over "
              "streams; loss_ratio: mean loss after / before the change; both Page-Hinkleys two-sided")

    ut = timed("d2", unit_section)
    show(f"(d') Detectors on {UNIT_STREAMS // (2 if quick else 1)} unit-variance streams per shift ({UNIT_BEFORE} + {UNIT_AFTER} values), "
         f"river row by row, ours on {UNIT_BATCH}-row batches", ut, 1,
         note="delay in rows after the change; false_alarms: alarms other than the first after the change, summed "
              "over streams; 'none': no change (every alarm false)")

    fl, fl_note = timed("e", flower, fres)
    if len(fl):
        show(f"(e) Flower FedAvg cross-check ({fl_note})", fl, 6,
             note="max_abs_param_diff: Flower's weighted average against fed.train's FedAvg, round by round")
    else:
        print(f"\n== (e) Flower FedAvg cross-check: {fl_note} ==")

    tg = targets(om, pq, fres, dsum, ut)
    show("targets", tg)
    out = {"machine": info, "mode": "quick" if quick else "full", "ordered_model": om.to_dict(orient="records"),
           "partition_quality": pt.to_dict(orient="records"), "partition_summary": pq.to_dict(orient="records"),
           "tuning": fres["tuning"].to_dict(orient="records"), "results": fres["results"].to_dict(orient="records"),
           "paired": fres["paired"].to_dict(orient="records"), "headroom": fres["headroom"], "rounds_to_target": fres["rounds"].to_dict(orient="records"),
           "configs": {n: {m: asdict(c) for m, c in v.items()} for n, v in fres["configs"].items()},
           "drift": dt.to_dict(orient="records"), "drift_summary": dsum.to_dict(orient="records"),
           "drift_unit_streams": ut.to_dict(orient="records"),
           "flower": fl.to_dict(orient="records"), "flower_status": fl_note, "targets": tg.to_dict(orient="records")}
    return epilogue(args, out, clock)


if __name__ == "__main__":
    main()
