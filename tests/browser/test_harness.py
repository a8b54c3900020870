"""The browser harness itself: it skips (or, in CI, fails) with a clear message without chromium,
and its pixel probe tells a drawn canvas from a blank one."""
import os
import subprocess
import sys

import pytest

from widgets.browser import REPO


@pytest.mark.parametrize("required", [False, True])
def test_without_chromium_the_tests_say_why(required):
    env = {k: v for k, v in os.environ.items() if k != "ADAPTIVE_KIT_REQUIRE_BROWSER"}
    env["ADAPTIVE_KIT_CHROMIUM"] = "/nonexistent/chromium"
    if required:
        env["ADAPTIVE_KIT_REQUIRE_BROWSER"] = "1"
    run = subprocess.run([sys.executable, "-m", "pytest", "-rsE", "-q", "-p", "no:cacheprovider",
                          "tests/browser/test_notebooks.py::test_notebook_runs_renders_and_responds[00]"],
                         cwd=REPO, env=env, capture_output=True, text=True, timeout=120)
    assert "chromium at /nonexistent/chromium" in run.stdout and "make chromium" in run.stdout, run.stdout
    if required:
        assert run.returncode == 1 and "1 error" in run.stdout, run.stdout
    else:
        assert run.returncode == 0 and "1 skipped" in run.stdout, run.stdout


def test_ink_tells_a_drawn_canvas_from_a_blank_one(chromium):
    page = chromium.new_page()
    try:
        page.set_content("<canvas id=blank width=100 height=80></canvas><canvas id=white width=100 height=80>"
                         "</canvas><canvas id=drawn width=100 height=80></canvas>")
        page.add_script_tag(path=str(REPO / "widgets" / "browser_probe.js"))
        blank, white, drawn = page.evaluate("""() => {
            const get = (id) => document.getElementById(id);
            const w = get('white').getContext('2d'); w.fillStyle = '#fff'; w.fillRect(0, 0, 100, 80);
            const d = get('drawn').getContext('2d'); d.fillStyle = '#fff'; d.fillRect(0, 0, 100, 80);
            d.fillStyle = '#1f77b4'; d.fillRect(10, 10, 20, 40); d.strokeStyle = '#d62728'; d.lineWidth = 2;
            d.beginPath(); d.moveTo(0, 79); d.lineTo(99, 0); d.stroke();
            return ['blank', 'white', 'drawn'].map((id) => window.akProbe.ink(get(id)));
        }""")
    finally:
        page.close()
    assert blank["ink"] == 0 and blank["colours"] == 1
    assert white["ink"] == 0 and white["colours"] == 1
    assert 0.08 < drawn["ink"] < 0.2 and drawn["colours"] >= 3


def _standalone(chromium, fig) -> list[str]:
    """The house-style problems the probe finds in ``fig`` drawn alone on a fresh page."""
    from bokeh.embed import file_html
    from bokeh.resources import INLINE

    page = chromium.new_page()
    try:
        page.set_content(file_html(fig, INLINE, "probe"))
        page.add_script_tag(path=str(REPO / "widgets" / "browser_probe.js"))
        page.wait_for_function("() => window.Bokeh && window.Bokeh.index && [...window.Bokeh.index].length > 0")
        page.wait_for_timeout(300)
        return page.evaluate("() => window.akProbe.layoutProblems(null)")
    finally:
        page.close()


def test_the_layout_check_finds_covered_cut_and_clipped_figures(chromium):
    from bokeh.models import Range1d
    from bokeh.plotting import figure

    from widgets.plots import house_style

    x = list(range(50))
    title = "a title far too long for a figure this narrow, which bokeh would cut at its edge"
    bad = figure(title=title, width=300, height=250, y_range=Range1d(80, 120), x_axis_label="step")
    bad.line(x, [60 + v for v in x], legend_label="throughput")  # starts below 80: off the chart
    bad.line(x, [119 - v % 3 for v in x], legend_label="optimum")  # runs under the legend, top right
    bad.legend.location = "top_right"
    problems = _standalone(chromium, bad)
    assert any("title" in p and "px wide" in p for p in problems), problems
    assert any("outside the visible range" in p for p in problems), problems
    assert any("legend covers" in p for p in problems), problems

    good = figure(title=title, width=300, height=250, x_axis_label="step")
    good.line(x, [60 + v for v in x], legend_label="throughput")
    good.line(x, [119 - v % 3 for v in x], legend_label="optimum")
    assert _standalone(chromium, house_style(good)) == []
