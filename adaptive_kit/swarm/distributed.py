"""A swarm across processes and local GPUs: members dealt to ranks, decisions taken alike on every rank."""
from __future__ import annotations

import threading
from collections.abc import Callable, Sequence
from typing import Any

import torch

from ..datasets import Split
from ..distributed import launch, worker_device
from ..records import ZmqPushSink
from .bus import Collector
from .engine import Swarm, SwarmConfig
from .spec import MemberSpec


def _worker(rank: int, world: int, data: Split, config: SwarmConfig, specs: Sequence[MemberSpec] | None,
            rounds: int, address: str, device: str) -> dict[str, Any]:
    dev = worker_device() if device == "auto" else torch.device(device)
    sink = ZmqPushSink(address, producer=f"swarm-rank{rank}", heartbeat_s=1.0)
    swarm = Swarm(data, config, specs=specs, device=dev, sink=sink, rank=rank, world=world)
    try:
        swarm.run(rounds, progress=False)
    finally:
        sink.close()
    state = swarm.state_dict()
    state["owned"] = [m.id for m in swarm.members if swarm.owns(m.id)]
    state["sent"] = swarm.sent
    return state


def train_distributed(data: Split, config: SwarmConfig, rounds: int, world_size: int, *,
                      specs: Sequence[MemberSpec] | None = None, collector: Collector | None = None,
                      device: str = "cpu", on_step: Callable[[Collector], None] | None = None,
                      timeout_s: float = 600.0, start_method: str = "spawn") -> tuple[Swarm, Collector]:
    """Train a swarm on ``world_size`` processes (gloo; one GPU per rank with ``device="auto"``).

    Members are dealt round-robin to ranks; each rank trains its own, the ranks share metrics
    after every round (``all_gather_object``) and take the same allocation and exploit decisions
    from the same seed, so parents' weights move between ranks only when a member is replaced.
    Every rank reports over ZeroMQ PUSH to ``collector`` (default: a new one bound on
    ``tcp://127.0.0.1``), which this process polls while the ranks run (``on_step(collector)``
    after each poll, e.g. to redraw a dashboard).

    Returns:
        the swarm gathered back into this process (ready to continue in-process, to save, or
        to inspect), and the collector with every report and its per-member sent / received check.

    Raises:
        ValueError: invalid arguments; :class:`~adaptive_kit.distributed.WorkerError` when a rank
            fails (the others are stopped).
    """
    if isinstance(world_size, bool) or not isinstance(world_size, int) or world_size < 1:
        raise ValueError(f"train_distributed(world_size={world_size!r}): expected an int >= 1")
    if world_size > config.members:
        raise ValueError(f"train_distributed(world_size={world_size}): more ranks than members ({config.members})")
    if device not in ("cpu", "auto"):
        raise ValueError(f"train_distributed(device={device!r}): expected 'cpu' or 'auto' (one GPU per rank)")
    collector = collector or Collector("tcp://127.0.0.1:*")
    collector.expect([f"swarm-rank{r}" for r in range(world_size)])
    data = Split(*(t.cpu() for t in (data.x_train, data.y_train, data.x_test, data.y_test)))
    out: dict[str, Any] = {}

    def target() -> None:
        try:
            out["states"] = launch(_worker, world_size, (data, config, specs, rounds, collector.address, device),
                                   backend="gloo" if device == "cpu" else None, timeout_s=timeout_s,
                                   start_method=start_method)
        except BaseException as e:  # noqa: BLE001 - re-raised in the caller's thread
            out["error"] = e

    thread = threading.Thread(target=target, name="adaptive-kit-swarm-launch", daemon=True)
    thread.start()
    while thread.is_alive():
        collector.poll(100)
        if on_step is not None:
            on_step(collector)
    thread.join()
    if "error" in out:
        raise out["error"]
    collector.drain([f"swarm-rank{r}" for r in range(world_size)], timeout_s=10.0, stale_s=5.0)
    if on_step is not None:
        on_step(collector)
    return _gather(data, config, out["states"]), collector


def _gather(data: Split, config: SwarmConfig, states: list[dict[str, Any]]) -> Swarm:
    """One in-process swarm from the ranks' states: each member from the rank that owns it."""
    first = states[0]
    merged = dict(first)
    owner = {i: s for s in states for i in s["owned"]}
    merged["members"] = [owner[i]["members"][i] for i in range(len(first["members"]))]
    merged["rows"] = sorted((r for s in states for r in s["rows"]), key=lambda r: (r["round"], r["member"]))
    merged["alarms"] = sorted((a for s in states for a in s["alarms"] if a["member"] in s["owned"]),
                              key=lambda a: (a["round"], a["member"]))
    merged["watch"] = {k: v for s in states for k, v in s["watch"].items()}
    swarm = Swarm(data, config, specs=[d["spec"] for d in merged["members"]])
    swarm.load_state_dict(merged)
    return swarm
