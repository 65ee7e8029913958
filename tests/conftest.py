"""Shared fixtures: subprocesses a test started die with their process groups; one torch thread for tiny models."""

import pytest
import torch
from processes import reap_all


@pytest.fixture(autouse=True)
def _reap_processes():
    yield
    reap_all()


@pytest.fixture(scope="module")
def one_torch_thread():
    """Tiny models on 2 shared cores: one torch thread is fastest, two wait on each other when other jobs run."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)
