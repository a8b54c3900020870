"""How a swarm evolves: truncation exploit / explore and breeding, decided identically in every
process, with weights inherited layer by layer where shapes allow."""
from __future__ import annotations

import difflib
from collections import defaultdict
from collections.abc import Sequence
from typing import TYPE_CHECKING, Any

import numpy as np
import torch
import torch.distributed as dist

from .optimiser import Action, diversity_penalty, plan
from .spec import MemberSpec

if TYPE_CHECKING:
    from .engine import Member


class Evolution:
    """The evolving half of :class:`~adaptive_kit.swarm.Swarm` (it mixes this in)."""

    def _evolve(self) -> None:
        """Truncation exploit / explore and breeding, decided identically in every process."""
        ms, pol, space = self.members, self.optimiser, self.config.space
        active = np.array([m.active for m in ms])
        quarantined = ~active
        fit = self.fitness()
        sim = self.config.similarity.matrix([m.spec for m in ms])
        adjusted = diversity_penalty(fit, sim, pol.diversity)
        actions = plan(adjusted, active, quarantined, pol, self.rng)
        new: list[tuple[Action, MemberSpec, list[tuple[int, int]], int]] = []
        for a in actions:  # every process draws the same specs and seeds
            if a.kind == "exploit":
                src = ms[a.parents[0]].spec
                spec = space.perturb(src, self.rng, mode=pol.perturb, rate=pol.mutation_rate, resample=pol.resample,
                                     arch_rate=pol.arch_mutation)
                sources = None if spec.layers == src.layers else [(0, i) for i in _align(src.layers, spec.layers)]
            else:
                spec, sources = space.crossover(ms[a.parents[0]].spec, ms[a.parents[1]].spec, self.rng)
                if self.rng.random() < pol.arch_mutation:
                    mutated = space.perturb(spec, self.rng, rate=0.0, arch_rate=1.0)
                    sources = [sources[i] if i >= 0 else (0, -1) for i in _align(spec.layers, mutated.layers)]
                    spec = mutated
            new.append((a, spec, sources, int(self.rng.integers(2**62))))
        states = self._source_states({p for a, *_ in new for p in a.parents})
        for a, spec, sources, seed in new:
            m = ms[a.dst]
            before = m.spec.arch + " " + _hp(m.spec)
            self.lineage.append({"round": self.round, "member": a.dst, "kind": a.kind, "parents": a.parents,
                                 "before": before, "after": spec.arch + " " + _hp(spec),
                                 "detail": f"fitness {fit[a.dst]:.3f} <- " + ", ".join(f"{fit[p]:.3f}" for p in a.parents)})
            m.spec, m.status, m.reason = spec, "active", ""
            m.origin = f"{a.kind} " + "x".join(map(str, a.parents))
            m.step_time = ms[a.parents[0]].step_time  # until measured: the first parent's
            self.watch.reset(a.dst)
            if not self.owns(a.dst):
                continue
            self._template(spec)
            params = self._init_params(spec, seed)
            buf = {k: torch.zeros_like(v) for k, v in params.items()}
            if sources is None:  # same layers: a plain copy of weights and momentum
                src = states[a.parents[0]]
                params = {k: v.clone() for k, v in src[0].items()}
                buf = {k: v.clone() for k, v in src[1].items()}
            else:
                self._inherit(spec, params, buf, [(states[a.parents[p]], i) for p, i in sources],
                              [states[p] for p in a.parents])
            m.params, m.buf = params, buf
            m.gen = torch.Generator().manual_seed(seed)
        # measure the new members now, so that the next allocation and best() see their own numbers
        fresh: dict[tuple, list[Member]] = defaultdict(list)
        for a, *_ in new:
            if self.owns(a.dst):
                fresh[ms[a.dst].spec.group_key].append(ms[a.dst])
        for group in fresh.values():
            self._evaluate(group)
        if new:
            self._exchange()

    def _source_states(self, sources: set[int]) -> dict[int, tuple[dict, dict, MemberSpec]]:
        """Weights, momentum and spec of the parents, gathered from whichever process owns them."""
        mine = {i: ({k: v.cpu() for k, v in self.members[i].params.items()},
                    {k: v.cpu() for k, v in self.members[i].buf.items()}, self.members[i].spec)
                for i in sorted(sources) if self.owns(i)}
        if self.world > 1:
            gathered: list[Any] = [None] * self.world
            dist.all_gather_object(gathered, mine)
            mine = {k: v for d in gathered for k, v in d.items()}
        return {i: ({k: v.to(self.device) for k, v in p.items()}, {k: v.to(self.device) for k, v in b.items()}, s)
                for i, (p, b, s) in mine.items()}

    def _inherit(self, spec: MemberSpec, params: dict, buf: dict, sources: list, parents: list) -> None:
        """Copy each layer's weights from the parent layer it came from (``sources``: per child
        layer, the parent's state and the layer's index there) where the shapes agree; the output
        layer from the first of ``parents`` whose output layer fits."""
        _, child_layers = self._template(spec)
        for keys, (state, i) in zip(child_layers[:-1], sources):
            if i < 0:
                continue
            p_params, p_buf, p_spec = state
            p_keys = self._template(p_spec)[1]
            if i >= len(p_keys) - 1:
                continue
            _copy_layer(keys, p_keys[i], params, buf, p_params, p_buf)
        for p_params, p_buf, p_spec in parents:
            if _copy_layer(child_layers[-1], self._template(p_spec)[1][-1], params, buf, p_params, p_buf):
                break


def _align(old: Sequence, new: Sequence) -> list[int]:
    """For each entry of ``new``, its index in ``old`` where the two lists match (-1: new)."""
    out = [-1] * len(new)
    for block in difflib.SequenceMatcher(None, list(old), list(new), autojunk=False).get_matching_blocks():
        for j in range(block.size):
            out[block.b + j] = block.a + j
    return out


def _hp(spec: MemberSpec) -> str:
    return f"lr={spec.lr:.3g} mom={spec.momentum:.2f} wd={spec.weight_decay:.2g}"


def _copy_layer(keys: list[str], src_keys: list[str], params: dict, buf: dict, src_params: dict,
                src_buf: dict) -> bool:
    """Copy one layer's weights and momentum when every tensor's shape agrees; True if copied."""
    if len(keys) != len(src_keys) or any(params[k].shape != src_params[s].shape for k, s in zip(keys, src_keys)):
        return False
    for k, s in zip(keys, src_keys):
        params[k] = src_params[s].clone()
        buf[k] = src_buf[s].clone()
    return True
