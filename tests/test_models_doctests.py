"""The `>>>` examples in omi.models' module docstrings run and hold."""

import doctest
import importlib

import pytest

MODULES = ["omi.models.registry", "omi.models.microbatch", "omi.models.commitment", "omi.models.data",
           "omi.models.verify", "omi.models.sampling", "omi.models.device", "omi.models.quality"]


@pytest.mark.parametrize("name", MODULES)
def test_doctests(name):
    result = doctest.testmod(importlib.import_module(name), optionflags=doctest.ELLIPSIS)
    assert result.attempted > 0, f"{name} has no examples"
    assert result.failed == 0
