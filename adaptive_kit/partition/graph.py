"""A model as a networkx DiGraph: torch.fx nodes with FLOPs, bytes and measured time.

Each node carries ``flops`` (torch.utils.flop_counter, forward + backward), ``param_bytes``,
``grad_bytes`` (= param bytes), ``act_bytes`` (its output), and ``time_s`` (measured forward +
backward on the target device: ``reps`` rounds over all nodes after a warm-up round, the median
of each node's lower half, so interference cannot make a small operation look large); each edge carries ``bytes``, the tensor it
moves. A model that torch.fx cannot trace raises :class:`TraceError` naming the failing
operation, or, with ``fallback=True``, is described at module level: its top-level children in
order, as a chain.
"""
from __future__ import annotations

import time
import warnings
from collections.abc import Sequence
from typing import Any

import networkx as nx
import numpy as np
import torch
from torch import fx, nn
from torch.fx.passes.shape_prop import ShapeProp
from torch.utils.flop_counter import FlopCounterMode


class TraceError(RuntimeError):
    """torch.fx could not trace the model; ``operation`` says where."""

    def __init__(self, operation: str, cause: BaseException,
                 hint: str = "Pass fallback=True to describe it at module level instead") -> None:
        super().__init__(f"torch.fx cannot trace the model at {operation}: {cause}. {hint}")
        self.operation = operation


def _bytes(value: Any) -> int:
    if isinstance(value, torch.Tensor):
        return value.numel() * value.element_size()
    if isinstance(value, (tuple, list)):
        return sum(_bytes(v) for v in value)
    if isinstance(value, dict):
        return sum(_bytes(v) for v in value.values())
    return 0


def _tensors(value: Any) -> list[torch.Tensor]:
    if isinstance(value, torch.Tensor):
        return [value]
    if isinstance(value, (tuple, list)):
        return [t for v in value for t in _tensors(v)]
    return []


def robust_seconds(samples: Sequence[float]) -> float:
    """A time from repeated measurements that noise cannot inflate: the median of the lower half.

    Interference (another process, a page fault, the GC) only ever adds time, so the upper
    samples are the noisy ones; the lower half's median is stable where the plain median moves
    once half the samples are disturbed, and less optimistic than the minimum.
    """
    t = np.sort(np.asarray(samples, dtype=float))
    if t.size == 0:
        return 0.0
    return float(np.median(t[: (t.size + 1) // 2]))


def _runner(fn, args: tuple, kwargs: dict):
    """A closure running forward + backward of ``fn(*args)``; returns its output."""
    def once() -> Any:
        leaves = [a.detach().requires_grad_(a.is_floating_point()) if isinstance(a, torch.Tensor) else a
                  for a in args]
        out = fn(*leaves, **kwargs)
        outs = [t for t in _tensors(out) if t.requires_grad]
        if outs:
            torch.autograd.backward(outs, [torch.ones_like(t) for t in outs])
        return out
    return once


def _time(once, device: torch.device) -> float:
    if device.type == "cuda":
        torch.cuda.synchronize(device)
    t0 = time.perf_counter()
    once()
    if device.type == "cuda":
        torch.cuda.synchronize(device)
    return time.perf_counter() - t0


def _measure(fn, args: tuple, kwargs: dict, reps: int, device: torch.device) -> tuple[float, float, Any]:
    """(flops, robust seconds) of forward + backward of ``fn(*args)``, and its output."""
    once = _runner(fn, args, kwargs)
    with FlopCounterMode(display=False) as counter:
        out = once()
    times = [_time(once, device) for _ in range(reps)]
    return float(counter.get_total_flops()), robust_seconds(times), out


def _node_times(g: nx.DiGraph, runners: dict[str, Any], reps: int, device: torch.device) -> dict[str, float]:
    """Time every node once per round, ``reps`` rounds after a warm-up round; robust per node.

    Interleaving the nodes spreads a burst of interference over one round of many nodes
    instead of every repetition of one node (which then looked like a dominant operation).
    """
    if reps <= 0:
        return dict.fromkeys(runners, 0.0)
    for once in runners.values():  # warm-up: allocator, caches, lazy initialisation
        once()
    samples: dict[str, list[float]] = {v: [] for v in runners}
    for _ in range(reps):
        for v, once in runners.items():
            samples[v].append(_time(once, device))
    return {v: robust_seconds(t) for v, t in samples.items()}


def trace(model: nn.Module) -> fx.GraphModule:
    """``model`` as a torch.fx GraphModule (returned as is when it is one already).

    Raises:
        TraceError: naming the operation in the model's code where tracing failed.
    """
    if isinstance(model, fx.GraphModule):
        return model
    try:
        return fx.symbolic_trace(model)
    except Exception as e:  # fx raises many types; name the operation from its message
        tb = e.__traceback__
        where = type(e).__name__
        while tb is not None:  # the innermost frame inside the model's own code
            frame = tb.tb_frame
            if "torch/fx" not in frame.f_code.co_filename:
                where = f"{frame.f_code.co_name} ({frame.f_code.co_filename.rsplit('/', 1)[-1]}:{tb.tb_lineno})"
            tb = tb.tb_next
        raise TraceError(where, e) from e


def model_graph(model: nn.Module, example: Sequence[torch.Tensor] | torch.Tensor, *, reps: int = 3,
                fallback: bool = False) -> nx.DiGraph:
    """The model's computation graph with per-node costs measured on the example's device.

    Args:
        model: any ``nn.Module`` (or the GraphModule :func:`trace` made of it, whose node names
            the graph keeps); parameters and example on the device to profile.
        example: the input(s) of one batch.
        reps: timed repetitions per node (0: FLOPs and bytes only, ``time_s`` = 0).
        fallback: on a trace failure, describe the top-level children as a chain.

    Raises:
        TraceError: torch.fx failed and ``fallback`` is False.
        ValueError: the trace is empty (no operation between inputs and output).
    """
    args = (example,) if isinstance(example, torch.Tensor) else tuple(example)
    device = args[0].device if args and isinstance(args[0], torch.Tensor) else torch.device("cpu")
    try:
        gm = trace(model)
    except TraceError as e:
        if not fallback:
            raise
        _check_chain(model, args, e)
        return _module_chain(model, args, reps, device)
    ShapeProp(gm).propagate(*args)
    g = nx.DiGraph(granularity="operation")
    env: dict[str, Any] = {}
    runners: dict[str, Any] = {}  # node -> its forward + backward, timed in interleaved rounds
    inputs = iter(args)
    for node in gm.graph.nodes:
        if node.op == "placeholder":
            env[node.name] = next(inputs)
            continue
        if node.op == "output":
            continue
        fetch = lambda a: env[a.name] if isinstance(a, fx.Node) else a  # noqa: E731
        nargs = fx.node.map_aggregate(node.args, fetch)
        nkwargs = fx.node.map_aggregate(node.kwargs, fetch)
        params = 0
        if node.op == "call_module":
            sub = gm.get_submodule(node.target)
            fn, params = sub, sum(_bytes(p) for p in sub.parameters())
        elif node.op == "get_attr":
            value = getattr(gm, node.target) if "." not in node.target else gm.get_parameter(node.target)
            env[node.name] = value
            g.add_node(node.name, op=node.op, target=str(node.target), flops=0.0, time_s=0.0,
                       param_bytes=_bytes(value), grad_bytes=_bytes(value), act_bytes=0)
            continue
        elif node.op == "call_method":
            fn = lambda obj, *a, _m=node.target, **k: getattr(obj, _m)(*a, **k)  # noqa: E731
        else:
            fn = node.target
        flops, _, out = _measure(fn, tuple(nargs), dict(nkwargs), 0, device)
        runners[node.name] = _runner(fn, tuple(nargs), dict(nkwargs))
        env[node.name] = out.detach() if isinstance(out, torch.Tensor) else out
        g.add_node(node.name, op=node.op, target=str(node.target), flops=flops, time_s=0.0,
                   param_bytes=params, grad_bytes=params, act_bytes=_bytes(out))
        for src in node.all_input_nodes:
            if src.name in g:
                g.add_edge(src.name, node.name, bytes=_bytes(env[src.name]))
    if g.number_of_nodes() == 0:
        raise ValueError(f"{type(model).__name__}: the trace has no operation between inputs and output")
    nx.set_node_attributes(g, _node_times(g, runners, reps, device), "time_s")
    return g


def _check_chain(model: nn.Module, args: tuple, cause: TraceError) -> None:
    """Refuse the module-level chain unless a real forward runs the children as that chain.

    The forward is run once with hooks: every top-level child must be called exactly once, in
    the order they are registered, each on the previous child's output, and the model must
    return the last child's output. A branch (``a`` *or* ``b``), a skipped, repeated or
    reordered child, or a residual path is refused; a forward that matches is planned with a
    warning, since a data-dependent branch may take another path on other inputs.

    Raises:
        TraceError: naming the children called, the children expected, and where fx failed.
    """
    children = list(model.named_children())
    calls: list[tuple[str, tuple, Any]] = []
    hooks = [child.register_forward_hook(lambda m, i, o, _n=name: calls.append((_n, i, o)))
             for name, child in children]
    try:
        with torch.no_grad():
            out = model(*args)
    finally:
        for h in hooks:
            h.remove()
    names = [n for n, _ in children]
    called = [n for n, _, _ in calls]
    why = None
    if called != names:
        why = f"forward called {called} of the children {names}"
    else:
        for (prev, _, o), (name, i, _) in zip(calls, calls[1:]):
            if not (len(i) == 1 and i[0] is o):
                why = f"{name!r} does not take {prev!r}'s output as its only input"
                break
        else:
            if calls and out is not calls[-1][2]:
                why = f"the model's output is not {names[-1]!r}'s output"
    where = cause.operation
    if why is not None:
        raise TraceError(where, RuntimeError(
            f"fallback=True refuses to plan {type(model).__name__} as the chain {' -> '.join(names)}: "
            f"{why} (data-dependent control flow?)"),
            hint="Make the branch traceable (torch.where, or torch.fx.wrap around it) to plan it") from cause
    warnings.warn(f"plan of {type(model).__name__} at module level ({' -> '.join(names)}): torch.fx "
                  f"failed at {where}; this input ran the children as that chain, but a data-dependent "
                  "branch there may take another path on other inputs", UserWarning, stacklevel=4)


def _module_chain(model: nn.Module, args: tuple, reps: int, device: torch.device) -> nx.DiGraph:
    """Top-level children as a chain, each measured as a whole (the fallback granularity)."""
    children = list(model.named_children())
    if not children:
        raise ValueError(f"{type(model).__name__} has no child modules to fall back on")
    g = nx.DiGraph(granularity="module")
    x: Any = args
    prev = None
    for name, child in children:
        flops, seconds, out = _measure(child, x if isinstance(x, tuple) else (x,), {}, reps, device)
        params = sum(_bytes(p) for p in child.parameters())
        g.add_node(name, op="call_module", target=name, flops=flops, time_s=seconds,
                   param_bytes=params, grad_bytes=params, act_bytes=_bytes(out))
        if prev is not None:
            g.add_edge(prev, name, bytes=g.nodes[prev]["act_bytes"])
        prev, x = name, out.detach() if isinstance(out, torch.Tensor) else out
    return g
