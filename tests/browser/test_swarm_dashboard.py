"""The live swarm dashboard with 64 members, played from the browser for a minute: measured in the
page (frames per second, age of the data each update shows) and in the kernel (rounds, bus).

The issue's targets (p95 data age <= 0.75 s, >= 30 frames per second) are checked and recorded by
``benchmarks/dashboard.py``; this test fails a dashboard that falls far behind them (twice the age,
half the frame rate), stops updating or loses reports, and saves the figures and a screenshot.
"""
import json

import pytest

from widgets.browser import measure_swarm_dashboard

SECONDS, MEMBERS = 60, 64


@pytest.mark.timeout(600)
def test_swarm_dashboard_keeps_up_for_a_minute(lab_page, artifacts):
    figures = measure_swarm_dashboard(lab_page, seconds=SECONDS, members=MEMBERS)
    (artifacts / "swarm_dashboard.json").write_text(json.dumps(figures, indent=1))
    lab_page.screenshot_cell(artifacts / "swarm_dashboard.png", lab_page.panel_cell("Live swarm"))
    problems = lab_page.layout_problems()
    assert not problems, "\n".join(problems)
    print(json.dumps(figures, indent=1))

    kernel = figures["kernel"]
    assert kernel["rounds"] >= SECONDS / 5, "the swarm barely ran"
    assert kernel["reports"] == MEMBERS * kernel["rounds"] and kernel["lost"] == kernel["gaps"] == 0
    # every redraw reached the page, and the page kept drawing while they came
    assert figures["updates"] >= 0.8 * (kernel["redraws"] - 1), figures  # the first redraw had no rows
    assert figures["updates_per_s"] >= 0.5, figures
    assert figures["fps"] >= 15, figures
    assert figures["age_p95_s"] <= 1.5, figures
    assert not lab_page.problems, lab_page.problems
