"""Strip a notebook's outputs except those of ``# NBVAL_CHECK_OUTPUT`` cells, taken from a fresh run.

    ADAPTIVE_KIT_FAST=1 .venv/bin/jupyter nbconvert --to notebook --execute NB --output /tmp/run.ipynb
    .venv/bin/python .ci/keep_checked_outputs.py NB /tmp/run.ipynb

nbval compares checked cells with these stored outputs; it skips cells without an execution
count, so checked cells keep one.
"""
import sys

import nbformat

src, executed = sys.argv[1], sys.argv[2]
nb, ex = nbformat.read(src, as_version=4), nbformat.read(executed, as_version=4)
for cell, ran in zip(nb.cells, ex.cells, strict=True):
    if cell.cell_type != "code":
        continue
    checked = "NBVAL_CHECK_OUTPUT" in cell.source
    cell.execution_count = 1 if checked else None
    cell.outputs = ran.outputs if checked else []
nbformat.write(nb, src)
