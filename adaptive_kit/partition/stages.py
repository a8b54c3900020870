"""A partition plan as torch.fx stages: :func:`stage_modules` cuts a traced model into one
GraphModule per stage (``stage_of``: fx node name -> stage, monotone along edges), and the values
that cross a boundary are flattened to the tensors a pipeline can send."""
from __future__ import annotations

from collections.abc import Iterator, Mapping, Sequence
from dataclasses import dataclass
from typing import Any

import torch
from torch import fx, nn

from ..checks import check_int

# --- cutting a GraphModule into stages ---------------------------------------------------------

@dataclass(frozen=True)
class _Layout:
    """Which fx nodes each stage computes and which values cross each boundary."""

    nodes: tuple[tuple[fx.Node, ...], ...]  # per stage, graph order; get_attr where used
    inputs: tuple[tuple[fx.Node, ...], ...]  # values entering stage j (stage 0: placeholders)
    params: tuple[tuple[str, ...], ...]  # parameter names per stage
    owner: dict[str, int]  # parameter or buffer name -> the stage that updates it


def _attr(gm: nn.Module, target: str) -> Any:
    obj: Any = gm
    for part in target.split("."):
        obj = getattr(obj, part)
    return obj


def _check_plan(gm: fx.GraphModule, stage_of: Mapping[str, int], k: int) -> list[fx.Node]:
    check_int("k", k, 1)
    nodes = [n for n in gm.graph.nodes if n.op not in ("placeholder", "output")]
    names = {n.name for n in nodes}
    missing = [n.name for n in nodes if n.name not in stage_of]
    if missing:
        raise ValueError(f"stage_of lacks {len(missing)} node(s) of the graph: {missing[:5]}")
    unknown = [v for v in stage_of if v not in names]
    if unknown:
        raise ValueError(f"stage_of names {len(unknown)} node(s) not in the graph: {unknown[:5]}")
    for n in nodes:
        s = stage_of[n.name]
        if isinstance(s, bool) or not isinstance(s, int) or not 0 <= s < k:
            raise ValueError(f"node {n.name!r} is in stage {s!r}, outside [0, {k})")
    for n in nodes:
        for m in n.all_input_nodes:
            if m.op != "placeholder" and stage_of[m.name] > stage_of[n.name]:
                raise ValueError(f"plan is not monotone: edge {m.name!r} (stage {stage_of[m.name]}) -> "
                                 f"{n.name!r} (stage {stage_of[n.name]}) goes back")
    used = set(stage_of.values())
    empty = [j for j in range(k) if j not in used]
    if empty:
        raise ValueError(f"stage {empty[0]} has no node (empty stages: {empty})")
    return nodes


def _layout(gm: fx.GraphModule, stage_of: Mapping[str, int], k: int) -> _Layout:
    """Validate the plan and lay it out (see :func:`stage_modules` for what raises)."""
    nodes = _check_plan(gm, stage_of, k)

    def where(user: fx.Node) -> int:
        return k - 1 if user.op == "output" else stage_of[user.name]

    # a get_attr is materialised in every stage that uses it: a weight never travels
    homes: dict[fx.Node, set[int]] = {
        n: {where(u) for u in n.users} or {stage_of[n.name]} for n in nodes if n.op == "get_attr"}
    per_stage: list[list[fx.Node]] = [[] for _ in range(k)]
    for n in nodes:
        for j in sorted(homes[n]) if n.op == "get_attr" else [stage_of[n.name]]:
            per_stage[j].append(n)

    aliases: dict[int, list[str]] = {}
    for name, p in gm.named_parameters(remove_duplicate=False):
        aliases.setdefault(id(p), []).append(name)
    buffer_name = {id(b): name for name, b in gm.named_buffers()}
    param_stages: dict[int, dict[int, list[str]]] = {}  # id -> stage -> nodes using it
    owner: dict[str, int] = {}
    for j, members in enumerate(per_stage):
        for n in members:
            if n.op == "call_module":
                obj: Any = gm.get_submodule(n.target)
            elif n.op == "get_attr":
                obj = _attr(gm, n.target)
            else:
                continue
            params = list(obj.parameters()) if isinstance(obj, nn.Module) else (
                [obj] if isinstance(obj, nn.Parameter) else [])
            buffers = list(obj.buffers()) if isinstance(obj, nn.Module) else (
                [obj] if isinstance(obj, torch.Tensor) and not isinstance(obj, nn.Parameter) else [])
            for p in params:
                param_stages.setdefault(id(p), {}).setdefault(j, []).append(n.name)
            for b in buffers:
                if id(b) in buffer_name:  # read-only copies may be shared; the first stage owns it
                    owner.setdefault(buffer_name[id(b)], j)
    for pid, by_stage in param_stages.items():
        if len(by_stage) > 1:
            users = {j: ns[:3] for j, ns in sorted(by_stage.items())}
            raise ValueError(f"parameter {aliases[pid][0]!r} (aliases {aliases[pid]}) is used by stages "
                             f"{sorted(by_stage)} (tied weights): its users {users} must share a stage")
    params: list[list[str]] = [[] for _ in range(k)]
    for name, p in gm.named_parameters():
        if id(p) in param_stages:
            (j,) = param_stages[id(p)]
            params[j].append(name)
            owner[name] = j

    placeholders = [n for n in gm.graph.nodes if n.op == "placeholder"]
    born = {n: -1 for n in placeholders} | {n: stage_of[n.name] for n in nodes if n.op != "get_attr"}
    last = {v: max((where(u) for u in v.users), default=s) for v, s in born.items()}
    inputs = [tuple(placeholders)] + [tuple(v for v in born if born[v] < j <= last[v]) for j in range(1, k)]
    return _Layout(tuple(map(tuple, per_stage)), tuple(inputs), tuple(map(tuple, params)), owner)


def _build_stage(gm: fx.GraphModule, layout: _Layout, j: int) -> fx.GraphModule:
    k = len(layout.nodes)
    graph = fx.Graph()
    env: dict[fx.Node, fx.Node] = {}
    for v in layout.inputs[j]:
        env[v] = graph.node_copy(v) if j == 0 else graph.placeholder(v.name)
    for n in layout.nodes[j]:
        env[n] = graph.node_copy(n, env.__getitem__)
    if j == k - 1:
        out = next(n for n in gm.graph.nodes if n.op == "output")
        graph.node_copy(out, env.__getitem__)
    else:
        graph.output(tuple(env[v] for v in layout.inputs[j + 1]))
    graph.lint()
    # GraphModule(root, graph) installs the very submodules and tensors the graph names: shared
    return fx.GraphModule(gm, graph, class_name=f"Stage{j}")


def stage_modules(gm: fx.GraphModule, stage_of: Mapping[str, int], k: int) -> list[fx.GraphModule]:
    """The ``k`` stages of a plan as GraphModules sharing ``gm``'s submodules and parameters.

    Stage 0 takes the model's inputs; stage j > 0 takes, positionally, the values live at the
    boundary before it (made at or before stage j - 1 and used at j or later, pass-throughs
    included, in graph order); every stage but the last returns the tuple of values live after
    it, and the last returns the model's output. A ``get_attr`` node (a parameter, buffer or
    constant) is computed in every stage that uses it, whatever stage the plan gives it, so no
    weight crosses a boundary.

    Raises:
        ValueError: ``k`` < 1; a node of ``gm`` is missing from ``stage_of`` or a name in it is
            not a node; a stage is outside [0, k); an edge goes to an earlier stage; a stage has
            no node; a parameter is used by nodes of two stages (tied weights). The message names
            the node, stage or parameter.
    """
    layout = _layout(gm, stage_of, k)
    return [_build_stage(gm, layout, j) for j in range(k)]


def stage_parameters(gm: fx.GraphModule, stage_of: Mapping[str, int], k: int) -> list[list[str]]:
    """Names (as in ``gm.named_parameters()``) of the parameters each stage uses and updates.

    Raises:
        ValueError: as :func:`stage_modules`.
    """
    return [list(p) for p in _layout(gm, stage_of, k).params]


def run_stages(stages: Sequence[nn.Module], *inputs: Any) -> Any:
    """The stages composed in order: equals the traced model on ``inputs``."""
    values = stages[0](*inputs)
    for stage in stages[1:]:
        values = stage(*values)
    return values


# --- boundary values as tensors ----------------------------------------------------------------
# PipelineStage sends tensors only; shape arithmetic (ints, torch.Size) or a split's tuple may
# cross a cut, so each boundary value is flattened to tensors by a spec taken from an example.

def _spec(value: Any, name: str) -> Any:
    if isinstance(value, torch.Tensor):
        return "tensor"
    if isinstance(value, (bool, int, float)):
        return type(value).__name__
    if value is None:
        return "none"
    if isinstance(value, (tuple, list)):  # torch.Size is a tuple
        kind = "size" if isinstance(value, torch.Size) else type(value).__name__
        return (kind, tuple(_spec(v, name) for v in value))
    raise ValueError(f"value {name!r} of type {type(value).__name__} crosses a stage boundary; "
                     "a pipeline sends tensors, ints, floats, bools, None and tuples of them: move the cut")


def _flatten(value: Any, spec: Any, device: torch.device, out: list[torch.Tensor]) -> None:
    if spec == "tensor":
        out.append(value.contiguous())  # send/recv need contiguous memory
    elif spec in ("bool", "int"):
        out.append(torch.tensor(int(value), dtype=torch.int64, device=device))
    elif spec == "float":
        out.append(torch.tensor(value, dtype=torch.float64, device=device))
    elif spec != "none":
        for v, s in zip(value, spec[1]):
            _flatten(v, s, device, out)


def _unflatten(leaves: Iterator[torch.Tensor], spec: Any) -> Any:
    if spec == "tensor":
        return next(leaves)
    if spec in ("bool", "int", "float"):
        return {"bool": bool, "int": int, "float": float}[spec](next(leaves).item())
    if spec == "none":
        return None
    kind, children = spec
    items = [_unflatten(leaves, s) for s in children]
    return torch.Size(items) if kind == "size" else list(items) if kind == "list" else tuple(items)
