"""Pipeline plans for model graphs: contiguous in a topological order, so always runnable."""
from __future__ import annotations

import heapq
from collections.abc import Mapping, Sequence
from dataclasses import dataclass

import networkx as nx
import numpy as np

from .chain import partition_chain


@dataclass(frozen=True)
class GraphPlan:
    """A stage per node, and what the slowest stage costs."""

    order: tuple[str, ...]  # the topological order the stages cut
    stage_of: dict[str, int]  # node -> stage in [0, k)
    stage_s: tuple[float, ...]
    bottleneck_s: float


def boundary_bytes(g: nx.DiGraph, order: Sequence[str], key: str = "bytes") -> np.ndarray:
    """(n,) bytes crossing a cut after position i of ``order``: each node's output crosses every
    boundary between it and its last consumer once."""
    pos = {v: i for i, v in enumerate(order)}
    diff = np.zeros(len(order) + 1)
    for u in order:
        out = [(pos[v], d.get(key, 0)) for v, d in g.succ[u].items()]
        if out:
            last = max(p for p, _ in out)
            size = max(b for _, b in out)
            diff[pos[u]] += size
            diff[last] -= size
    return np.maximum(np.cumsum(diff)[:-1], 0.0)  # float cancellation can leave -1e-16


def is_valid_pipeline(g: nx.DiGraph, stage_of: dict[str, int]) -> bool:
    """True when every edge goes to the same or a later stage (the stage graph is a chain DAG)."""
    return all(stage_of[u] <= stage_of[v] for u, v in g.edges)


def _orders(g: nx.DiGraph) -> list[tuple[str, ...]]:
    """Topological orders to cut: the graph's own (torch.fx's), as soon as possible (by depth from
    the inputs) and as late as possible (by height to the output), ties kept in the graph's order."""
    nodes = list(g.nodes)
    idx = {v: i for i, v in enumerate(nodes)}
    succ = [[idx[w] for w in g.succ[v]] for v in nodes]
    indeg = [len(g.pred[v]) for v in nodes]
    first = _kahn(succ, indeg, list(range(len(nodes))))
    depth = [0] * len(nodes)
    for i in first:
        for w in succ[i]:
            depth[w] = max(depth[w], depth[i] + 1)
    height = [0] * len(nodes)
    for i in reversed(first):
        height[i] = max((height[w] + 1 for w in succ[i]), default=0)
    out: list[tuple[str, ...]] = []
    for order in (first, _kahn(succ, indeg, list(zip(depth, range(len(nodes))))),
                  _kahn(succ, indeg, [(-h, i) for i, h in enumerate(height)])):
        named = tuple(nodes[i] for i in order)
        if named not in out:
            out.append(named)
    return out


def _kahn(succ: list[list[int]], indeg: list[int], key: list) -> list[int]:
    """Topological order of node indices taking the smallest ``key`` among the ready nodes."""
    left = list(indeg)
    ready = [(key[i], i) for i, d in enumerate(left) if d == 0]
    heapq.heapify(ready)
    order = []
    while ready:
        _, i = heapq.heappop(ready)
        order.append(i)
        for w in succ[i]:
            left[w] -= 1
            if left[w] == 0:
                heapq.heappush(ready, (key[w], w))
    return order


def partition_graph(g: nx.DiGraph, k: int, speeds: Sequence[float] | None = None,
                    bandwidth: float = float("inf"), cost: str = "time_s") -> GraphPlan:
    """The minimum-bottleneck split of ``g`` into ``k`` stages contiguous in a topological order.

    For a chain this is the exact optimum. For a branchy graph it is the best of the exact splits
    of three topological orders (torch.fx's, as soon as possible, as late as possible), and
    always a valid pipeline; :func:`milp_bound` measures how far from optimal it can be.

    Raises:
        ValueError: ``g`` is empty or has a cycle, a node lacks ``cost``, or the chain
            partitioner rejects ``k`` / ``speeds`` / ``bandwidth``.
    """
    _check(g, cost)
    check_speeds(speeds, k, "partition_graph", bandwidth)
    best = None
    for order in _orders(g):
        plan = _cut(g, order, k, speeds, bandwidth, cost)
        if best is None or plan.bottleneck_s < best.bottleneck_s * (1 - 1e-12):
            best = plan
    return best


def check_speeds(speeds: Sequence[float] | None, k: int, where: str = "plan",
                 bandwidth: float | None = None) -> np.ndarray:
    """``speeds`` as a (k,) array (all ones for None), checked: one finite speed > 0 per device.

    Raises:
        ValueError: naming ``where``, the field and the value (a speed of 0, -1, NaN or inf, a
            wrong count, a bandwidth that is not > 0).
    """
    if isinstance(k, bool) or not isinstance(k, (int, np.integer)) or k < 1:
        raise ValueError(f"{where}: k={k!r} must be an int >= 1")
    try:
        s = np.ones(k) if speeds is None else np.asarray(speeds, dtype=float)
    except (TypeError, ValueError):
        raise ValueError(f"{where}: speeds must be {k} numbers, got {speeds!r}") from None
    if s.shape != (k,):
        raise ValueError(f"{where}: speeds must have one entry per device (k={k}), got {np.asarray(speeds).tolist()!r}")
    if not np.all(np.isfinite(s)) or (s <= 0).any():
        raise ValueError(f"{where}: speeds must be finite and > 0, got {s.tolist()}")
    if bandwidth is not None:
        try:
            ok = float(bandwidth) > 0  # inf is free communication; NaN, 0 and negatives are errors
        except (TypeError, ValueError):
            ok = False
        if not ok:
            raise ValueError(f"{where}: bandwidth must be > 0 bytes/s (inf: free), got {bandwidth!r}")
    return s


def _check(g: nx.DiGraph, cost: str) -> None:
    if g.number_of_nodes() == 0:
        raise ValueError("partition_graph: the graph is empty (an empty trace?)")
    if not nx.is_directed_acyclic_graph(g):
        raise ValueError("partition_graph: the graph has a cycle; a pipeline needs a DAG")
    missing = [v for v, d in g.nodes(data=True) if cost not in d]
    if missing:
        raise ValueError(f"partition_graph: nodes {missing[:5]} have no {cost!r} attribute")


def _cut(g: nx.DiGraph, order: tuple[str, ...], k: int, speeds, bandwidth: float, cost: str) -> GraphPlan:
    """The exact minimum-bottleneck split of one topological order."""
    c = np.array([g.nodes[v][cost] for v in order], dtype=float)
    plan = partition_chain(c, k, speeds, boundary_bytes(g, order), bandwidth)
    stage_of = {v: j for j, r in enumerate(plan.stages) for v in (order[i] for i in r)}
    return GraphPlan(order, stage_of, plan.stage_s, plan.bottleneck_s)


def _random_orders(g: nx.DiGraph, tries: int, seed: int) -> list[tuple[str, ...]]:
    nodes = list(g.nodes)
    idx = {v: i for i, v in enumerate(nodes)}
    succ = [[idx[w] for w in g.succ[v]] for v in nodes]
    indeg = [len(g.pred[v]) for v in nodes]
    rng = np.random.default_rng(seed)
    return [tuple(nodes[i] for i in _kahn(succ, indeg, rng.random(len(nodes)).tolist())) for _ in range(tries)]


def stage_loads(g: nx.DiGraph, stage_of: Mapping[str, int], k: int, cost: str = "cost_s",
                speeds: Sequence[float] | np.ndarray | None = None) -> np.ndarray:
    """(k,) seconds of each stage of a plan: the summed node ``cost`` of its nodes, divided by the
    device's speed when ``speeds`` are given (compute only: no communication)."""
    loads = np.zeros(k)
    for v, j in stage_of.items():
        loads[j] += g.nodes[v][cost]
    return loads if speeds is None else loads / np.asarray(speeds, dtype=float)


def _closure(g: nx.DiGraph, v: str, stage_of: dict[str, int], j: int, forward: bool) -> list[str]:
    """``v`` and everything in stage j that depends on it (forward) or that it depends on."""
    nbrs = g.succ if forward else g.pred
    seen, todo = {v}, [v]
    while todo:
        for w in nbrs[todo.pop()]:
            if stage_of[w] == j and w not in seen:
                seen.add(w)
                todo.append(w)
    return list(seen)


def refine(g: nx.DiGraph, plan: GraphPlan, speeds: Sequence[float] | None = None,
           cost: str = "time_s", rounds: int = 1000) -> GraphPlan:
    """Improve a valid plan by moving work off the slowest stage to a neighbouring one.

    Moving node v from stage j to j + 1 takes along everything in stage j that depends on v;
    moving it to j - 1 takes along everything in stage j it depends on, so the plan stays a
    valid pipeline. Each round makes the move that lowers the larger of the two stages most; it
    stops when none helps. Communication is not re-priced (use it for bandwidth=inf plans).
    """
    k = len(plan.stage_s)
    s = check_speeds(speeds, k, "refine")
    stage_of = dict(plan.stage_of)
    cost_of = {v: float(g.nodes[v][cost]) for v in g.nodes}
    loads = stage_loads(g, stage_of, k, cost, s)
    for _ in range(rounds):
        j = int(np.argmax(loads))
        members = [v for v, sv in stage_of.items() if sv == j]
        best = None  # (new larger load of the pair, nodes, target stage)
        for v in members:
            for t in (j - 1, j + 1):
                if not 0 <= t < k:
                    continue
                move = _closure(g, v, stage_of, j, forward=t > j)
                if len(move) == len(members):
                    continue  # a stage may not become empty
                c = sum(cost_of[w] for w in move)
                pair = max(loads[j] - c / s[j], loads[t] + c / s[t])
                if pair < loads[j] * (1 - 1e-12) and (best is None or pair < best[0]):
                    best = (pair, move, t)
        if best is None:
            break
        _, move, t = best
        c = sum(cost_of[w] for w in move)
        loads[j] -= c / s[j]
        loads[t] += c / s[t]
        stage_of.update(dict.fromkeys(move, t))
    pos = {v: i for i, v in enumerate(plan.order)}
    order = tuple(sorted(plan.order, key=lambda v: (stage_of[v], pos[v])))
    return GraphPlan(order, stage_of, tuple(float(x) for x in loads), float(loads.max()))


def best_plan(g: nx.DiGraph, k: int, speeds: Sequence[float] | None = None,
              bandwidth: float = float("inf"), cost: str = "time_s", *, tries: int = 16,
              small: int = 300, seed: int = 0, tol: float = 0.0) -> GraphPlan:
    """The best valid plan we can find: every candidate order cut exactly, then refined.

    Candidates are :func:`partition_graph`'s three topological orders, plus ``tries`` seeded
    random ones on graphs of at most ``small`` nodes (where each costs a few milliseconds).
    With a finite ``bandwidth`` the plans are not refined (refine does not re-price traffic).
    With ``tol`` > 0 a later candidate replaces the current one only when its bottleneck is
    lower by more than that fraction: near-ties go to the earlier candidate (a fixed order), so
    noise in the costs does not flip the plan between equivalent ones.
    """
    if not (isinstance(tol, (int, float)) and 0 <= tol < 1):
        raise ValueError(f"best_plan: tol must be in [0, 1), got {tol!r}")
    _check(g, cost)
    check_speeds(speeds, k, "best_plan", bandwidth)
    orders = _orders(g)
    if g.number_of_nodes() <= small:
        orders += _random_orders(g, tries, seed)
    best = None
    for order in orders:
        plan = _cut(g, order, k, speeds, bandwidth, cost)
        if not np.isfinite(bandwidth):
            plan = refine(g, plan, speeds, cost)
        if best is None or plan.bottleneck_s < best.bottleneck_s * (1 - max(tol, 1e-12)):
            best = plan
    return best


@dataclass(frozen=True)
class Bound:
    """What the MILP proved: ``lower_s`` <= every valid plan's bottleneck; ``best_s`` is the best
    plan it found (equal to ``lower_s`` when it finished)."""

    lower_s: float
    best_s: float
    optimal: bool
    seconds: float


def milp_bound(g: nx.DiGraph, k: int, speeds: Sequence[float] | None = None, cost: str = "time_s",
               time_limit: float = 10.0) -> Bound:
    """Lower bound on the bottleneck of any valid k-stage pipeline of ``g`` (communication free).

    y[v, j] = 1 when node v runs at stage <= j: monotone in j, y[v, j] <= y[u, j] on every edge
    u -> v (a consumer is never earlier than its producer), every stage non-empty; minimise B with
    stage loads / speeds <= B. Solved by HiGHS through ``scipy.optimize.milp`` within ``time_limit``;
    the dual bound is a valid lower bound even when the solver stops early.
    """
    import time

    from scipy.optimize import Bounds, LinearConstraint, milp
    from scipy.sparse import coo_matrix

    nodes = list(g.nodes)
    n = len(nodes)
    _check(g, cost)
    s = check_speeds(speeds, k, "milp_bound")
    if not 1 <= k <= n:
        raise ValueError(f"milp_bound: k={k} must be in [1, {n}] (the node count)")
    if not (isinstance(time_limit, (int, float)) and time_limit > 0):
        raise ValueError(f"milp_bound: time_limit must be > 0 seconds, got {time_limit!r}")
    c = np.array([g.nodes[v][cost] for v in nodes], dtype=float)
    if not np.all(np.isfinite(c)) or (c < 0).any():
        raise ValueError(f"milp_bound: node {cost!r} must be finite and >= 0, got {c[~(np.isfinite(c) & (c >= 0))][:3].tolist()}")
    scale = c.sum() / s.min() or 1.0  # solve in units of the total: HiGHS misjudges 1e8-size rows
    c = c / scale
    idx = {v: i for i, v in enumerate(nodes)}
    var = lambda i, j: i * k + j  # noqa: E731
    nb = n * k + 1  # y and B
    rows, cols, vals, lo, hi = [], [], [], [], []
    r = 0

    def add(entries, lower, upper):
        nonlocal r
        for col, val in entries:
            rows.append(r)
            cols.append(col)
            vals.append(val)
        lo.append(lower)
        hi.append(upper)
        r += 1

    for i in range(n):
        for j in range(k - 1):  # y[i, j] <= y[i, j + 1]
            add([(var(i, j), 1.0), (var(i, j + 1), -1.0)], -np.inf, 0.0)
    for u, v in g.edges:
        for j in range(k - 1):  # y[v, j] <= y[u, j]
            add([(var(idx[v], j), 1.0), (var(idx[u], j), -1.0)], -np.inf, 0.0)
    for j in range(k):  # load_j / s_j - B <= 0 and stage j non-empty
        entries = [(var(i, j), c[i] / s[j]) for i in range(n)]
        count = [(var(i, j), 1.0) for i in range(n)]
        if j > 0:
            entries += [(var(i, j - 1), -c[i] / s[j]) for i in range(n)]
            count += [(var(i, j - 1), -1.0) for i in range(n)]
        add([*entries, (nb - 1, -1.0)], -np.inf, 0.0)
        add(count, 1.0, np.inf)
    a = coo_matrix((vals, (rows, cols)), shape=(r, nb)).tocsr()
    lb, ub = np.zeros(nb), np.ones(nb)
    lb[[var(i, k - 1) for i in range(n)]] = 1.0  # every node runs somewhere
    ub[-1] = np.inf
    integrality = np.ones(nb)
    integrality[-1] = 0
    objective = np.zeros(nb)
    objective[-1] = 1.0
    t0 = time.perf_counter()
    res = milp(objective, integrality=integrality, bounds=Bounds(lb, ub),
               constraints=LinearConstraint(a, lo, hi), options={"time_limit": time_limit})
    seconds = time.perf_counter() - t0
    trivial = max(c.sum() / s.sum(), 0.0)
    lower = getattr(res, "mip_dual_bound", None)
    lower = max(float(lower) if lower is not None and np.isfinite(lower) else 0.0, trivial)
    best = float(res.fun) if res.x is not None else float("inf")
    return Bound(scale * min(lower, best), scale * best, bool(res.status == 0), seconds)


@dataclass(frozen=True)
class ModelPlan:
    """A model ready to pipeline: its (possibly split) GraphModule, graph, cost model and plan."""

    gm: object  # torch.fx.GraphModule
    graph: nx.DiGraph
    plan: GraphPlan
    cost_model: object  # CostModel
    splits: dict  # node -> shards of each Linear split at operation level


def plan_model(model, example, k: int, speeds: Sequence[float] | None = None,
               bandwidth: float = float("inf"), *, split: bool = True, reps: int = 5,
               fallback: bool = False, grid: float = 0.1) -> ModelPlan:
    """Trace, measure, calibrate, split dominant Linears and partition a model in one call.

    Node costs (``cost_s``) are the calibrated :class:`~adaptive_kit.partition.profile.CostModel`'s,
    which smooths per-operation timing noise, except for nodes measured well above the
    per-operation overhead and more than 2x off the model's estimate (a mispriced operation, not
    noise), which keep their measured time. A Linear costing more than a fair
    share (total / k) is split into column shards when that lowers the bottleneck.

    Timings are robust (interleaved rounds, lower-half medians, an outlier-rejecting fit), and
    the costs the planner sees are snapped to a geometric ``grid`` (relative step, 0 = off), so
    the plan does not move with timing noise smaller than the step: the same model on the same
    machine gets the same plan run after run. ``fallback=True`` plans an untraceable model at
    module level only when its forward runs the children as a chain (see :func:`model_graph`).

    Raises:
        ValueError: invalid ``speeds``, ``bandwidth`` or ``grid``.
    """
    from .graph import model_graph, trace
    from .profile import CostModel, profile_batch
    from .split import dominant_linears, split_linear

    try:
        gm = trace(model)
    except Exception:
        if not fallback:
            raise
        gm = model
    check_speeds(speeds, k, "plan_model", bandwidth)
    if not (isinstance(grid, (int, float)) and 0 <= grid < 1):
        raise ValueError(f"plan_model: grid must be a relative step in [0, 1), got {grid!r}")
    g = model_graph(gm, example, reps=reps, fallback=fallback)
    cm = CostModel.fit(g, profile_batch(example))
    snap(cm.annotate(g, disagree=2.0), grid)
    plan = best_plan(g, k, speeds, bandwidth, "cost_s", tol=grid / 4)
    splits: dict[str, int] = {}
    if split and g.graph.get("granularity") == "operation":
        for node, parts in dominant_linears(gm, g, k, "cost_s").items():
            gm2 = split_linear(gm, node, parts)
            g2 = snap(cm.annotate(model_graph(gm2, example, reps=reps), disagree=2.0), grid)  # the join is measured too
            plan2 = best_plan(g2, k, speeds, bandwidth, "cost_s", tol=grid / 4)
            if plan2.bottleneck_s < plan.bottleneck_s:
                gm, g, plan, splits[node] = gm2, g2, plan2, parts
    return ModelPlan(gm, g, plan, cm, splits)


def snap(g: nx.DiGraph, grid: float, key: str = "cost_s") -> nx.DiGraph:
    """Round each node's ``key`` to the nearest point of a geometric grid of relative step ``grid``
    (values 1 + grid apart; 0 leaves them as they are); returns ``g``.

    The grid is laid relative to the median positive cost, so a machine that is uniformly
    slower in one run (load) scales every cost alike and the snapped costs keep their ratios.
    """
    if grid > 0:
        pos = [float(d.get(key, 0.0)) for _, d in g.nodes(data=True) if float(d.get(key, 0.0)) > 0]
        if not pos:
            return g
        unit = float(np.median(pos))
        step = np.log1p(grid)
        for _, d in g.nodes(data=True):
            c = float(d.get(key, 0.0))
            if c > 0:
                d[key] = unit * float(np.exp(np.round(np.log(c / unit) / step) * step))
    return g


def stage_graph(g: nx.DiGraph, stage_of: dict[str, int]) -> nx.DiGraph:
    """The quotient graph: an edge a -> b when some node of stage a feeds one of stage b."""
    q = nx.DiGraph()
    q.add_nodes_from(set(stage_of.values()))
    q.add_edges_from((stage_of[u], stage_of[v]) for u, v in g.edges if stage_of[u] != stage_of[v])
    return q
