"""Shared test fixtures: reference key lists, and the device marker policy."""

from __future__ import annotations

import pytest
import torch
from reference_lists import load_reference


@pytest.fixture
def reference_lists():
    """``reference_lists(name) -> {key: (shape, dtype)}`` for a released checkpoint's key list."""
    return load_reference


def pytest_collection_modifyitems(config: pytest.Config, items: list[pytest.Item]) -> None:
    """Tests marked ``gpu`` are skipped without a CUDA device (the same checks run on the GPU machine)."""
    if torch.cuda.is_available():
        return
    skip = pytest.mark.skip(reason="needs a CUDA device")
    for item in items:
        if "gpu" in item.keywords:
            item.add_marker(skip)


@pytest.fixture
def one_thread():
    """Run the test on one torch thread (``pytestmark = pytest.mark.usefixtures("one_thread")``)."""
    n = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(n)
