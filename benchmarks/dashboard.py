"""The live swarm dashboard in a real JupyterLab in headless chromium: frames per second and data age.

Each configuration opens a notebook with a swarm and its ``SwarmPanel``, presses Play in the page and
measures there, over ``--seconds`` of live updates: animation frames per second, and the age of the
data each update shows (the frame's time - the time the newest report in it was made). Targets
(issue 8): with 64 members, p95 data age <= 0.75 s and >= 30 frames per second.

Ours: the panel as shipped (new rows streamed, at most one redraw per 0.35 s), at 16, 64, 128 and
256 members (64 and 256 with ``--quick``). Anchor: the naive dashboard, which sends the whole heatmap again on every redraw (bokeh
``source.data = ...``) instead of streaming the new rows, at 64 members.

    python benchmarks/dashboard.py [--quick] [--json FILE]

Needs chromium (``make chromium``); uses the browser harness in ``widgets/browser.py``.
"""
from __future__ import annotations

import sys
import tempfile
import time
from pathlib import Path

import pandas as pd
import torch
from machine import describe, parse_args, show, write_json

from widgets.browser import CHROMIUM, JupyterLab, LabPage, browser, measure_swarm_dashboard

AGE_TARGET_S, FPS_TARGET = 0.75, 30.0
RESEND = '''
from bokeh.models import ColumnDataSource


class ResendPanel(SwarmPanel):
    """The naive dashboard: every redraw sends the whole heatmap again, not just the new rows."""

    def _stream_heat(self, rows):
        kept = self.heat_source
        self.heat_source = ColumnDataSource({k: [] for k in kept.data})  # detached: streaming sends nothing
        try:
            super()._stream_heat(rows)
            new = self.heat_source.data
        finally:
            self.heat_source = kept
        kept.data = {k: list(kept.data[k]) + list(new[k]) for k in kept.data}
'''


def main(argv: list[str] | None = None) -> dict:
    args = parse_args(__doc__.splitlines()[0], "20 s per configuration, 64 and 256 members (about 3 minutes)", argv)
    if not CHROMIUM.exists():
        sys.exit(f"no chromium at {CHROMIUM}: `make chromium`, or set ADAPTIVE_KIT_CHROMIUM")
    seconds = 20 if args.quick else 60
    configs = [("ours", "SwarmPanel", 64), ("resend everything", "ResendPanel", 64), ("ours", "SwarmPanel", 256)]
    if not args.quick:
        configs += [("ours", "SwarmPanel", 16), ("ours", "SwarmPanel", 128)]
    rows = []
    t0 = time.perf_counter()
    with tempfile.TemporaryDirectory() as root, JupyterLab(Path(root)) as lab, browser() as b:
        for label, panel, members in configs:
            page = LabPage(b, lab)
            try:
                f = measure_swarm_dashboard(page, seconds=seconds, members=members, panel=panel,
                                            preamble=RESEND if panel == "ResendPanel" else "")
            finally:
                page.close()
                lab.shutdown_kernels()
            k = f["kernel"]
            rows.append({"dashboard": label, "members": members, "fps": f["fps"], "age p50 s": f["age_p50_s"],
                         "age p95 s": f["age_p95_s"], "age max s": f["age_max_s"],
                         "updates/s": f["updates_per_s"], "longest frame ms": f["longest_frame_ms"],
                         "rounds/s": k["rounds"] / f["seconds"], "redraw ms (kernel)": k["redraw_ms_median"],
                         "lost": k["lost"], "fps / target": f["fps"] / FPS_TARGET,
                         "age p95 / target": f["age_p95_s"] / AGE_TARGET_S})
            print(f"{label}, {members} members: {f['fps']:.1f} fps, age p95 {f['age_p95_s']:.3f} s", flush=True)
    table = pd.DataFrame(rows)
    ours = table[(table["dashboard"] == "ours") & (table["members"] == 64)].iloc[0]
    anchor = table[table["dashboard"] != "ours"].iloc[0]
    big = table[(table["dashboard"] == "ours") & (table["members"] == 256)].iloc[0]
    verdict = (f"256 members: {big['fps']:.1f} fps, p95 data age {big['age p95 s']:.3f} s "
               f"({'met' if big['fps'] >= FPS_TARGET and big['age p95 s'] <= AGE_TARGET_S else 'missed'}); "
               f"64 members: {ours['fps']:.1f} fps (target >= {FPS_TARGET:.0f}: "
               f"{'met' if ours['fps'] >= FPS_TARGET else 'missed'}), p95 data age {ours['age p95 s']:.3f} s "
               f"(target <= {AGE_TARGET_S}: {'met' if ours['age p95 s'] <= AGE_TARGET_S else 'missed'}); "
               f"against resending everything: fps x{ours['fps'] / anchor['fps']:.2f}, "
               f"age p95 x{ours['age p95 s'] / anchor['age p95 s']:.2f}")
    show(f"swarm dashboard in headless chromium, {seconds} s of Play per row", table, note=verdict)
    print(f"total {time.perf_counter() - t0:.0f} s")
    out = {"machine": describe(torch.device("cpu")) | {"chromium": str(CHROMIUM)}, "seconds": seconds,
           "table": table.to_dict("records"), "verdict": verdict}
    write_json(args.json, out)
    return out


if __name__ == "__main__":
    main()
