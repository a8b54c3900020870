"""A JupyterLab server and Debian's chromium, shared by the browser tests of one session."""
import os
from collections.abc import Iterator
from pathlib import Path

import pytest

from widgets.browser import (
    ARTIFACTS,
    CHROMIUM,
    NOTEBOOKS,
    JupyterLab,
    LabPage,
    browser,
    copy_notebooks,
)


@pytest.fixture(scope="session")
def chromium() -> Iterator[object]:
    """The browser; skips (fails where ADAPTIVE_KIT_REQUIRE_BROWSER=1, as in CI) without chromium."""
    if not CHROMIUM.exists():
        message = (f"browser tests need chromium at {CHROMIUM}: `make chromium` installs Debian's package, "
                   "or set ADAPTIVE_KIT_CHROMIUM to a Chromium or Chrome binary")
        if os.environ.get("ADAPTIVE_KIT_REQUIRE_BROWSER") == "1":
            pytest.fail(message)
        pytest.skip(message)
    with browser() as b:
        yield b


@pytest.fixture(scope="session")
def lab(chromium, tmp_path_factory) -> Iterator[JupyterLab]:
    """JupyterLab over a temporary copy of the notebooks; kernels run in fast mode."""
    root = tmp_path_factory.mktemp("lab")
    copy_notebooks(NOTEBOOKS, root)
    with JupyterLab(root, env={"ADAPTIVE_KIT_FAST": "1"}) as server:
        yield server


@pytest.fixture
def lab_page(chromium, lab) -> Iterator[LabPage]:
    """A fresh browser tab; its kernels are shut down afterwards."""
    page = LabPage(chromium, lab)
    yield page
    page.close()
    lab.shutdown_kernels()


@pytest.fixture(scope="session")
def artifacts() -> Path:
    ARTIFACTS.mkdir(parents=True, exist_ok=True)
    return ARTIFACTS
