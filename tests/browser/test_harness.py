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
