"""The swarm dashboard at the sizes users run (16, 64 and 256 members), drawn in a real JupyterLab:
the similarity graph stays sparse (each member joined to its few most similar members), every
figure passes the house-style check, and a full-height screenshot of each size is saved."""
import pytest

from widgets.browser import write_notebook

SIZES = (16, 64, 256)
SETUP = """\
import torch

import adaptive_kit as ak
from adaptive_kit.swarm import Swarm, SwarmConfig
from widgets import setup_notebook
from widgets.swarm import SwarmPanel

setup_notebook()
torch.set_num_threads(1)
data = ak.datasets.digits()
"""
SIZE = """\
swarm_{n} = Swarm(data, SwarmConfig(members={n}, steps_per_round=2, seed=0))
panel_{n} = SwarmPanel(swarm_{n}, threshold=0.7)
panel_{n}.run(2)
panel_{n}.select([0, {n} // 2])
print(len(panel_{n}.edges), "edges")
panel_{n}
"""


@pytest.mark.timeout(900)
def test_the_swarm_dashboard_reads_at_16_64_and_256_members(lab_page, artifacts):
    page = lab_page
    write_notebook(page.lab.root / "swarm_sizes.ipynb", [SETUP, *(SIZE.format(n=n) for n in SIZES)])
    page.open("swarm_sizes.ipynb")
    page.run_cell(0)
    for i, n in enumerate(SIZES, start=1):
        edges = int(page.run_cell(i, timeout_s=600).split()[0])
        assert edges <= 3 * n, f"{n} members: {edges} edges, more than 3 per member"
        page.wait_idle()
        problems = page.layout_problems(i)
        page.screenshot_cell(artifacts / f"swarm_{n}_members.png", i)
        assert not problems, f"{n} members:\n" + "\n".join(problems)
    assert not page.problems, page.problems
