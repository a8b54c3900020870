"""What every benchmark shares: its command line (--quick, --json, --threads), the machine, a clock
per section and the epilogue that prints the clock and writes the JSON."""
import argparse
import json
import math
import os
import platform
import time
from collections.abc import Iterator
from contextlib import contextmanager

import torch


def describe(device: torch.device) -> dict:
    """Platform, CPU model, core and thread counts, Python and torch versions, device and GPU."""
    cpu = platform.processor()
    if not cpu:
        try:
            with open("/proc/cpuinfo") as f:
                cpu = next((ln.split(":", 1)[1].strip() for ln in f if ln.startswith("model name")), "")
        except OSError:
            cpu = ""
    return {
        "platform": platform.platform(),
        "cpu": cpu,
        "cpu_count": os.cpu_count(),
        "torch_threads": torch.get_num_threads(),
        "python": platform.python_version(),
        "torch": torch.__version__,
        "device": str(device),
        "gpu": torch.cuda.get_device_name(device) if device.type == "cuda" else None,
    }


def parse_args(description: str, quick_help: str, argv: list[str] | None = None) -> argparse.Namespace:
    """``--quick``, ``--json FILE`` and ``--threads N`` (default 1, applied here).

    One thread by default: on a small shared VM, OpenMP workers that wait for a busy core made
    single calls 100x slower and the medians meaningless.
    """
    parser = argparse.ArgumentParser(description=description)
    parser.add_argument("--quick", action="store_true", help=quick_help)
    parser.add_argument("--json", metavar="FILE", help="also write the tables and the machine as JSON")
    parser.add_argument("--threads", type=int, default=1, metavar="N",
                        help="torch intra-op CPU threads (default 1; 0 keeps torch's default)")
    args = parser.parse_args(argv)
    if args.threads < 0:
        parser.error(f"--threads must be >= 0, got {args.threads}")
    if args.threads:
        torch.set_num_threads(args.threads)
    return args


def jsonable(o):
    """Plain JSON for --json: numpy scalars to Python, NaN and inf to None."""
    if isinstance(o, dict):
        return {str(k): jsonable(v) for k, v in o.items()}
    if isinstance(o, (list, tuple)):
        return [jsonable(v) for v in o]
    if hasattr(o, "item") and not isinstance(o, (str, bytes)):
        o = o.item()
    if isinstance(o, float) and not math.isfinite(o):
        return None
    return o


def write_json(path: str | None, out: dict) -> None:
    """Write a benchmark's table for --json (nothing when no path was given)."""
    if path:
        with open(path, "w") as f:
            json.dump(jsonable(out), f, indent=2)


def show(title: str, frame, digits: int = 3, note: str = "") -> None:
    """Print a pandas table under a title, wide enough not to wrap."""
    import pandas as pd

    print(f"\n== {title} ==")
    with pd.option_context("display.width", 250, "display.max_columns", 40, "display.max_colwidth", 70):
        print(frame.round(digits).to_string(index=False))
    if note:
        print(note)


class Clock:
    """Wall-clock seconds per named section of one benchmark run, from its creation on.

    ``with clock.section("part A"): ...`` adds the block's seconds to that section (a section
    entered twice adds up); :attr:`total` is the seconds since the clock was made.
    """

    def __init__(self) -> None:
        self.start = time.perf_counter()
        self.sections: dict[str, float] = {}

    @contextmanager
    def section(self, name: str) -> Iterator[None]:
        t0 = time.perf_counter()
        try:
            yield
        finally:
            self.sections[name] = self.sections.get(name, 0.0) + time.perf_counter() - t0

    @property
    def total(self) -> float:
        return time.perf_counter() - self.start


def epilogue(args: argparse.Namespace, out: dict, clock: Clock) -> dict:
    """End a benchmark: print ``total N s (section N s, ...); load average at end=L``, add
    ``runtime_s`` and ``sections_s`` to ``out``, write ``out`` to ``--json`` when given, return it."""
    total = clock.total
    parts = ", ".join(f"{name} {s:.0f} s" for name, s in clock.sections.items())
    print(f"\ntotal {total:.0f} s{f' ({parts})' if parts else ''}; load average at end={os.getloadavg()[0]:.2f}")
    out = {**out, "runtime_s": round(total, 1), "sections_s": {k: round(v, 1) for k, v in clock.sections.items()}}
    write_json(getattr(args, "json", None), out)
    return out
