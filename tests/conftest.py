"""Shared fixtures: every subprocess a test started is killed with its process group when the session ends."""

import pytest
from processes import reap_all


@pytest.fixture(autouse=True)
def _reap_processes():
    yield
    reap_all()
