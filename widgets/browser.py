"""JupyterLab in a real browser: start a lab over a temporary folder, open a notebook in Debian's
chromium through playwright, run it, and read what the page shows (``browser_probe.js`` does the
reading, and checks the house style of every figure: ``LabPage.layout_problems``).

Used by the browser tests (``tests/browser``) and by ``benchmarks/dashboard.py``; it imports neither
bokeh nor the kit, and playwright only when a browser starts. Chromium is ``/usr/bin/chromium``
(Debian's ``chromium`` package: ``make chromium``) unless ``ADAPTIVE_KIT_CHROMIUM`` names another.
"""
from __future__ import annotations

import json
import os
import secrets
import shutil
import socket
import subprocess
import sys
import time
import urllib.request
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Any

REPO = Path(__file__).resolve().parents[1]
PROBE = Path(__file__).with_name("browser_probe.js")
NOTEBOOKS = sorted(p.name for p in (REPO / "notebooks").glob("*.ipynb"))
ARTIFACTS = REPO / "artifacts" / "browser"  # screenshots and figures (gitignored)
CHROMIUM = Path(os.environ.get("ADAPTIVE_KIT_CHROMIUM", "/usr/bin/chromium"))
# the machine's network is closed: without these chromium keeps dialling Google's services
CHROMIUM_ARGS = ["--no-sandbox", "--disable-gpu", "--disable-background-networking", "--disable-component-update",
                 "--disable-sync", "--no-first-run", "--disable-quic"]
# lab settings for a test: every cell in the DOM (no virtual scrolling), no news or update toasts
SETTINGS = {
    "@jupyterlab/notebook-extension/tracker": {"windowingMode": "none"},
    "@jupyterlab/apputils-extension/notification": {"fetchNews": "false", "checkForUpdates": False},
    "@jupyterlab/docmanager-extension/plugin": {"autosave": False},
}


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


class JupyterLab:
    """A JupyterLab server on 127.0.0.1 over ``root``, with its own token, settings, workspaces and
    Jupyter dirs under ``root/.lab`` (nothing of the user's is read or written), kernels started with
    ``env`` added to this process's environment. Use as a context manager.
    """

    def __init__(self, root: Path, *, env: dict[str, str] | None = None, start_timeout_s: float = 120) -> None:
        self.root = Path(root)
        self.env = dict(env or {})
        self.start_timeout_s = start_timeout_s
        self.token = secrets.token_hex(16)
        self.port = _free_port()
        self.proc: subprocess.Popen | None = None
        self.log = self.root / ".lab" / "server.log"

    def __enter__(self) -> JupyterLab:
        state = self.root / ".lab"
        for name, values in SETTINGS.items():
            path = state / "settings" / f"{name}.jupyterlab-settings"
            path.parent.mkdir(parents=True, exist_ok=True)
            path.write_text(json.dumps(values))
        env = os.environ | self.env | {
            "JUPYTER_CONFIG_DIR": str(state / "config"), "JUPYTER_DATA_DIR": str(state / "data"),
            "JUPYTER_RUNTIME_DIR": str(state / "runtime"), "IPYTHONDIR": str(state / "ipython"),
            "JUPYTER_PLATFORM_DIRS": "1"}
        cmd = [sys.executable, "-m", "jupyter", "lab", "--no-browser", "--ip=127.0.0.1", f"--port={self.port}",
               "--port-retries=0", f"--IdentityProvider.token={self.token}", f"--ServerApp.root_dir={self.root}",
               "--ServerApp.allow_root=True", f"--LabApp.workspaces_dir={state / 'workspaces'}",
               f"--LabApp.user_settings_dir={state / 'settings'}", "--LabApp.expose_app_in_browser=True"]
        self._log_file = self.log.open("w")
        self.proc = subprocess.Popen(cmd, stdout=self._log_file, stderr=subprocess.STDOUT, env=env, cwd=self.root)
        deadline = time.monotonic() + self.start_timeout_s
        while True:
            if self.proc.poll() is not None:
                raise RuntimeError(f"JupyterLab exited with {self.proc.returncode}:\n{self.tail()}")
            try:
                self.api("GET", "/api/status")
                return self
            except OSError:
                if time.monotonic() > deadline:
                    self.__exit__(None, None, None)
                    raise RuntimeError(f"JupyterLab did not answer within {self.start_timeout_s:.0f} s:\n"
                                       f"{self.tail()}") from None
                time.sleep(0.5)

    def __exit__(self, *exc: Any) -> None:
        if self.proc is not None and self.proc.poll() is None:
            self.proc.terminate()
            try:
                self.proc.wait(timeout=30)
            except subprocess.TimeoutExpired:
                self.proc.kill()
                self.proc.wait()
        self._log_file.close()

    def api(self, method: str, path: str) -> Any:
        req = urllib.request.Request(f"http://127.0.0.1:{self.port}{path}", method=method,
                                     headers={"Authorization": f"token {self.token}"})
        with urllib.request.urlopen(req, timeout=10) as r:
            body = r.read()
        return json.loads(body) if body else None

    def url(self, notebook: str) -> str:
        """The notebook's address: ``?reset`` opens it in a fresh workspace, alone."""
        return f"http://127.0.0.1:{self.port}/lab/tree/{notebook}?reset&token={self.token}"

    def shutdown_kernels(self) -> None:
        for kernel in self.api("GET", "/api/kernels"):
            self.api("DELETE", f"/api/kernels/{kernel['id']}")

    def tail(self, chars: int = 4000) -> str:
        return self.log.read_text(errors="replace")[-chars:] if self.log.exists() else ""


def copy_notebooks(names: list[str], root: Path) -> None:
    """Copy the kit's notebooks into a lab's root, so that running them leaves the repository alone."""
    for name in names:
        shutil.copy(REPO / "notebooks" / name, root / name)


@contextmanager
def browser(headless: bool = True) -> Iterator[Any]:
    """Debian's chromium under playwright, with the flags this machine needs."""
    from playwright.sync_api import sync_playwright

    with sync_playwright() as p:
        b = p.chromium.launch(executable_path=str(CHROMIUM), args=CHROMIUM_ARGS, headless=headless)
        try:
            yield b
        finally:
            b.close()


class LabPage:
    """One tab of the lab showing one notebook: open it, run it, read its cells and plots, find its
    widgets. ``problems`` collects uncaught page errors and console errors as they happen."""

    def __init__(self, browser: Any, lab: JupyterLab, *, width: int = 1400, height: int = 1100) -> None:
        self.lab = lab
        self.context = browser.new_context(viewport={"width": width, "height": height})
        self.context.add_init_script(path=str(PROBE))
        self.page = self.context.new_page()
        self.problems: list[str] = []
        self.page.on("pageerror", lambda e: self.problems.append(f"page error: {e}"))
        self.page.on("console", lambda m: m.type == "error" and self.problems.append(f"console error: {m.text}"))

    def close(self) -> None:
        self.context.close()

    def probe(self, call: str, *args: Any) -> Any:
        """``akProbe.<call>(*args)`` in the page."""
        return self.page.evaluate(f"(args) => window.akProbe.{call}(...args)", list(args))

    def open(self, notebook: str, timeout_s: float = 120) -> None:
        """Open the notebook and wait until its kernel is ready."""
        self.page.goto(self.lab.url(notebook))
        self.page.wait_for_function(
            "(name) => { const w = window.jupyterapp && window.jupyterapp.shell.currentWidget;"
            " return w && w.sessionContext && w.context.path === name; }", arg=notebook, timeout=timeout_s * 1000)
        self.page.evaluate("async () => { const app = window.jupyterapp; const w = app.shell.currentWidget;"
                           " await w.context.ready; await w.sessionContext.ready; app.shell.collapseLeft(); }")
        self.wait_idle(timeout_s)

    def run_all(self, timeout_s: float = 600) -> dict[str, Any]:
        """Run every cell (the Run All command) and wait until the last one finished; returns
        ``{"ok": True}`` when no cell failed, else ``ok`` false and the ``error`` JupyterLab gave."""
        self.page.evaluate("() => { window.__akRun = null; window.jupyterapp.commands"
                           ".execute('notebook:run-all-cells').then((ok) => window.__akRun = {ok},"
                           " (e) => window.__akRun = {ok: false, error: String(e)}); }")
        self.page.wait_for_function("() => window.__akRun", timeout=timeout_s * 1000, polling=250)
        self.wait_idle(timeout_s)
        self.probe("markCells")
        return self.page.evaluate("() => window.__akRun")

    def wait_idle(self, timeout_s: float = 120) -> None:
        """Wait until the kernel is idle (stays idle for half a second)."""
        self.page.wait_for_function("() => window.akProbe.kernelStatus() === 'idle'", timeout=timeout_s * 1000)
        time.sleep(0.5)
        self.page.wait_for_function("() => window.akProbe.kernelStatus() === 'idle'", timeout=timeout_s * 1000)

    def run_cell(self, index: int, timeout_s: float = 300) -> str:
        """Run cell ``index`` alone; returns the text it printed."""
        self.page.evaluate("async (i) => { const app = window.jupyterapp; const nb = app.shell.currentWidget;"
                           " nb.content.activeCellIndex = i; await app.commands.execute('notebook:run-cell'); }",
                           index)
        self.wait_idle(timeout_s)
        self.probe("markCells")
        cell = self.cells()[index]
        if cell["errors"]:
            raise RuntimeError(f"cell {index} failed: {cell['errors']}")
        return self.page.evaluate(
            "(i) => window.jupyterapp.shell.currentWidget.content.widgets[i].model.outputs.toJSON()"
            ".filter((o) => o.output_type === 'stream').map((o) => o.text).join('')", index)

    def cells(self) -> list[dict[str, Any]]:
        return self.probe("cells")

    def plots(self, cell: int | None = None) -> list[dict[str, Any]]:
        return self.probe("plots", cell)

    def signature(self, cell: int) -> dict[str, Any]:
        return self.probe("signature", cell)

    def cell(self, index: int) -> Any:
        """The playwright locator of cell ``index``."""
        return self.page.locator(f'[data-ak-cell="{index}"]')

    def panel_cell(self, title: str) -> int:
        """The index of the cell whose output shows the panel titled ``title``."""
        heading = self.page.locator(".jp-OutputArea h3", has_text=title).first
        heading.wait_for(timeout=30_000)
        index = heading.evaluate("(el) => window.akProbe.cellOf(el)")
        if index < 0:
            raise LookupError(f"no cell shows a panel titled {title!r}")
        return index

    def wait_for_change(self, cell: int, before: dict[str, Any], timeout_s: float = 120) -> dict[str, Any]:
        """Wait until the data behind the cell's plots differs from ``before``, then for the kernel
        to go idle; returns the new signature (equal to ``before`` on time-out)."""
        deadline = time.monotonic() + timeout_s
        after = self.signature(cell)
        while after["hash"] == before["hash"] and time.monotonic() < deadline:
            time.sleep(0.25)
            after = self.signature(cell)
        self.wait_idle(timeout_s)
        return self.signature(cell)

    def wait_settled(self, cell: int, quiet_s: float = 4.0, timeout_s: float = 600) -> dict[str, Any]:
        """Wait until the data behind the cell's plots has not changed for ``quiet_s`` (a run the
        interaction started has finished drawing) and the kernel is idle; returns the signature."""
        deadline = time.monotonic() + timeout_s
        last, since = self.signature(cell), time.monotonic()
        while time.monotonic() - since < quiet_s and time.monotonic() < deadline:
            time.sleep(0.5)
            now = self.signature(cell)
            if now["hash"] != last["hash"]:
                last, since = now, time.monotonic()
        self.wait_idle(timeout_s)
        return self.signature(cell)

    def screenshot(self, path: Path, cell: int | None = None) -> None:
        """The viewport, scrolled to ``cell`` when given."""
        path.parent.mkdir(parents=True, exist_ok=True)
        if cell is not None:
            self.cell(cell).evaluate("(el) => el.scrollIntoView({block: 'start'})")
            time.sleep(0.3)
        self.page.screenshot(path=str(path))

    def screenshot_cell(self, path: Path, cell: int, max_height: int = 8000) -> None:
        """Cell ``cell`` whole, however tall: the viewport grows to hold it for the shot (the notebook
        scrolls inside the page, so a taller page is the only way to see all of a tall panel at once)."""
        path.parent.mkdir(parents=True, exist_ok=True)
        size = self.page.viewport_size
        height = self.cell(cell).evaluate("(el) => el.getBoundingClientRect().height")
        try:
            self.page.set_viewport_size({"width": size["width"], "height": int(min(max_height, height + 300))})
            time.sleep(0.5)  # the lab lays out again
            self.cell(cell).evaluate("(el) => el.scrollIntoView({block: 'start'})")
            time.sleep(0.5)
            self.cell(cell).screenshot(path=str(path))
        finally:
            self.page.set_viewport_size(size)

    def plot_cells(self) -> list[int]:
        """Indices of the cells that show a bokeh plot."""
        return sorted({p["cell"] for p in self.plots() if p["visible"] and p["cell"] >= 0})

    def layout_problems(self, cell: int | None = None) -> list[str]:
        """House-style problems of every figure in ``cell`` (all cells when None): a title or axis
        label wider than its figure, glyph data outside the visible range, a legend over a glyph."""
        return self.probe("layoutProblems", cell)


def write_notebook(path: Path, cells: list[str]) -> None:
    """A notebook of code cells (for a measurement the kit's notebooks do not make)."""
    import nbformat

    nb = nbformat.v4.new_notebook(cells=[nbformat.v4.new_code_cell(src) for src in cells])
    nb.metadata["kernelspec"] = {"name": "python3", "display_name": "Python 3", "language": "python"}
    nbformat.write(nb, path)


DASHBOARD = """\
import torch

import adaptive_kit as ak
from adaptive_kit.swarm import Swarm, SwarmConfig
from widgets import setup_notebook
from widgets.swarm import SwarmPanel

setup_notebook()
torch.set_num_threads(1)  # the browser gets the other core
{preamble}
swarm = Swarm(ak.datasets.digits(), SwarmConfig(members={members}, steps_per_round={steps}, seed=0))
panel = {panel}(swarm, min_interval_s={min_interval_s})
panel
"""
DASHBOARD_REPORT = """\
import json

import numpy as np

bus = swarm.collector.report(swarm.sent)
print(json.dumps({"rounds": swarm.round, "ticks": panel.ticks, "dropped_ticks": panel.dropped_ticks,
                  "redraws": panel.redraws, "redraw_ms_median": float(np.median(panel.redraw_s)) * 1e3,
                  "reports": int(bus["received"].sum()), "lost": int(bus["lost"].sum()),
                  "gaps": int(bus["gaps"].sum())}))
"""


def measure_swarm_dashboard(page: LabPage, *, seconds: float = 60, members: int = 64, steps: int = 5,
                            min_interval_s: float = 0.35, panel: str = "SwarmPanel",
                            preamble: str = "") -> dict[str, Any]:
    """Play a ``members``-member swarm on its dashboard (``panel``, a SwarmPanel or a subclass that
    ``preamble`` defines) for ``seconds`` from the browser's Play button and measure in the page the
    frames per second and the age of the data each update shows (frame time - the newest and the
    oldest report's ``time``); the kernel's own counters come back under ``kernel``."""
    import numpy as np

    name = f"dashboard_{panel}_{members}_{min_interval_s:g}.ipynb"
    code = DASHBOARD.format(members=members, steps=steps, min_interval_s=min_interval_s, panel=panel,
                            preamble=preamble)
    write_notebook(page.lab.root / name, [code, DASHBOARD_REPORT])
    page.open(name)
    page.run_cell(0)
    cell = page.cell(page.panel_cell("Live swarm"))
    buttons = cell.locator(".widget-play button")
    page.probe("startLive", "swarm_heat")
    buttons.nth(0).click()  # play
    time.sleep(seconds)
    live = page.probe("stopLive")
    buttons.nth(1).click()  # pause
    page.wait_idle()
    kernel = json.loads(page.run_cell(1))
    newest, oldest = np.array(live["newest"]), np.array(live["oldest"])

    def pct(a: np.ndarray, q: float) -> float:
        return float(np.percentile(a, q)) if a.size else float("nan")

    return {"panel": panel, "members": members, "steps_per_round": steps, "min_interval_s": min_interval_s,
            "seconds": live["seconds"], "fps": live["frames"] / live["seconds"], "updates": live["updates"],
            "updates_per_s": live["updates"] / live["seconds"], "longest_frame_ms": live["longest_frame_ms"],
            "age_p50_s": pct(newest, 50), "age_p95_s": pct(newest, 95), "age_max_s": pct(newest, 100),
            "oldest_age_p95_s": pct(oldest, 95), "kernel": kernel}
