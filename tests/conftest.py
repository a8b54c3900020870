"""Shared test set-up."""
from collections.abc import Iterator

import pytest
import torch

# every device a test parametrised by the ``devices`` fixture runs on
DEVICES = ["cpu"] + (["cuda"] if torch.cuda.is_available() else [])


@pytest.fixture(scope="session", autouse=True)
def one_thread() -> Iterator[None]:
    """One torch thread: the tests' models are tiny, and on a 2-core machine extra threads only
    contend with each other (and with spawned workers)."""
    n = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(n)


@pytest.fixture(params=DEVICES)
def devices(request: pytest.FixtureRequest) -> str:
    """The device a test runs on, once per device here: ``"cpu"``, and ``"cuda"`` when present."""
    return request.param
