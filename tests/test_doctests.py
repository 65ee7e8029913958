"""Run the `>>>` examples in module docstrings, so they cannot drift from the code."""

import doctest
import importlib

import pytest

MODULES = ["omi.protos.signing", "omi.protos.runspec"]


@pytest.mark.parametrize("name", MODULES)
def test_doctests(name):
    result = doctest.testmod(importlib.import_module(name), optionflags=doctest.ELLIPSIS)
    assert result.attempted > 0, f"{name} has no examples"
    assert result.failed == 0
