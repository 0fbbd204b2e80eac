"""Fixtures shared by the unit and integration tests."""

import pytest
import torch


@pytest.fixture
def one_thread():
    """The runs here are tiny; one intra-op thread avoids oversubscribing shared CPUs."""
    before = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(before)
