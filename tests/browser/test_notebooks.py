"""Every notebook in a real JupyterLab in headless chromium: Run All in fast mode, no error output,
every widget and plot drawn, one interaction with the notebook's panel that changes its plots'
data, as a user would make it (a dropdown, a slider key, a button, a tab), and every figure on the
page readable: no title or axis label wider than its figure, no glyph data outside the visible
range, no legend over a glyph (the house style of ``widgets/plots.py``, measured in the page).

Screenshots, whole cells at full height, go to ``artifacts/browser/``: ``<notebook>.png`` is the
panel after the interaction, ``<notebook>_cell<i>.png`` every other cell that shows a figure."""
from collections.abc import Callable
from dataclasses import dataclass

import pytest

from widgets.browser import NOTEBOOKS, LabPage

pytestmark = pytest.mark.timeout(900)
WAITS_FOR_INPUT = ("tap a node",)  # titles of figures that stay empty until the user picks something

Step = Callable[[LabPage, object], None]


def pick(label: str, option: str) -> Step:
    """Choose ``option`` in the dropdown described ``label``."""
    def step(page: LabPage, cell) -> None:
        dropdown = cell.locator(".widget-dropdown").filter(has=page.page.locator("label", has_text=label))
        dropdown.locator("select").select_option(label=option)
    return step


def press(text: str) -> Step:
    """Click the button that says ``text``."""
    return lambda page, cell: cell.locator("button", has_text=text).click()


def slide(label: str, key: str = "ArrowRight") -> Step:
    """Move the slider described ``label`` one step with the keyboard."""
    def step(page: LabPage, cell) -> None:
        slider = cell.locator(".widget-slider").filter(has=page.page.locator("label", has_text=label))
        slider.locator(".noUi-handle").press(key)
    return step


def tab(title: str) -> Step:
    """Open the tab titled ``title``."""
    return lambda page, cell: cell.locator(".lm-TabBar-tab", has_text=title).click()


@dataclass(frozen=True)
class Case:
    notebook: str
    panel: str  # the panel's title
    steps: tuple[Step, ...]  # the interaction


CASES = [
    Case("00_tour.ipynb", "Tour", (pick("batch size", "128"), press("Train"))),
    Case("01_telemetry_granularity.ipynb", "Telemetry granularity", (pick("statistic", "norm"),)),
    Case("02_speculative_training.ipynb", "Speculative training", (pick("network", "lan"),)),
    Case("03_predictive_partitioning.ipynb", "Predictive partitioning", (slide("slowdown"),)),
    Case("04_federated_meta_learning.ipynb", "Federated meta-learning", (tab("Partition"), slide("granularity", "ArrowLeft"))),
    Case("05_swarm_live.ipynb", "Live swarm", (pick("metric", "val_loss"),)),
]


def test_every_notebook_has_a_case():
    assert sorted(c.notebook for c in CASES) == NOTEBOOKS


@pytest.mark.parametrize("case", CASES, ids=[c.notebook.split("_")[0] for c in CASES])
def test_notebook_runs_renders_and_responds(lab_page, artifacts, case):
    page = lab_page
    page.open(case.notebook)
    ran = page.run_all()
    code = [c for c in page.cells() if c["type"] == "code"]
    errors = {c["index"]: c["errors"] for c in code if c["errors"]}
    assert ran["ok"] and not errors, f"Run All stopped: {ran}, error outputs {errors}\n{page.lab.tail(1500)}"
    assert code and all(c["executionCount"] for c in code), "a cell did not run"
    assert not {c["index"]: c["renderFailures"] for c in code if c["renderFailures"]}

    # the panel's widgets are on the page with a size; every visible plot is drawn, not blank
    panel = page.panel_cell(case.panel)
    for widget in ("h3", ".widget-dropdown, .widget-slider, button"):
        shown = page.cell(panel).locator(f".jp-OutputArea-output .jupyter-widgets {widget}").filter(visible=True)
        box = shown.first.bounding_box()
        assert box and box["width"] > 20 and box["height"] > 10, f"the panel's {widget} is not drawn"
    plots = [p for p in page.plots() if p["visible"] and p["figures"]]
    assert plots, "no bokeh plot on the page"
    for p in plots:
        for f in p["figures"]:
            assert f["ink"] > 0.002 and f["colours"] >= 3, f"cell {p['cell']}: a blank {p['type']} canvas: {f}"

        # what the browser holds, not what the kernel holds: a plot drawn before display must arrive
        empty = [f["title"] for f in p["data"] if f["rows"] == 0 and not f["title"].endswith(WAITS_FOR_INPUT)]
        assert not empty, f"cell {p['cell']}: figures with no data on the page: {empty}"
    assert any(p["cell"] == panel for p in plots), "the panel shows no plot"
    before = page.signature(panel)
    assert before["rows"] > 0, "the panel's plots hold no data"
    for step in case.steps:
        step(page, page.cell(panel))
    after = page.wait_for_change(panel, before)
    # a panel that trains disables its button until the run is over: the pictures show the end
    try:
        page.cell(panel).locator("button.jupyter-button:disabled").first.wait_for(state="detached", timeout=300_000)
    except Exception:  # noqa: BLE001 - a button disabled for good (no run) leaves the pictures as they are
        pass
    after = page.wait_settled(panel)
    stem = case.notebook.removesuffix(".ipynb")
    page.screenshot_cell(artifacts / f"{stem}.png", panel)
    for cell in page.plot_cells():
        if cell != panel:
            page.screenshot_cell(artifacts / f"{stem}_cell{cell}.png", cell)
    assert after["hash"] != before["hash"], "the interaction did not change the panel's data"
    assert not [c for c in page.cells() if c["errors"]], "the interaction raised"
    assert not page.problems, page.problems
    assert page.probe("figureCount", None) >= len(plots), "the house-style check found no figures"
    problems = page.layout_problems()
    assert not problems, "figures a reader cannot read cleanly:\n" + "\n".join(problems)
