"""Every `>>>` example in the omi packages runs and holds, so the examples cannot drift from the code.

Modules are found at collection time: each module of PACKAGES whose source holds a `>>>` is one test.
"""

import doctest
import importlib
import importlib.util
import pkgutil
import re
from pathlib import Path

import pytest

PACKAGES = ["omi.protos", "omi.models", "omi.swarm", "omi.node", "omi.coordinator", "omi.dashboard"]
EXAMPLE = re.compile(r"^[ \t]*>>>.*(?:\n[ \t]*\.\.\..*)*", re.MULTILINE)  # a prompt and its `...` lines
SKIP = re.compile(r"#\s*doctest:.*\+SKIP")

pytestmark = pytest.mark.usefixtures("one_torch_thread")  # conftest: tiny models run fastest on one thread


def modules_with_examples() -> dict[str, Path]:
    """Name → source file of every module of PACKAGES (generated ``*_pb2*`` code aside) whose source holds `>>>`."""
    found = {}
    for package in PACKAGES:
        spec = importlib.util.find_spec(package)
        modules = [(package, Path(spec.origin))]
        for info in pkgutil.walk_packages(spec.submodule_search_locations, package + "."):
            if "_pb2" not in info.name.rpartition(".")[2]:
                modules.append((info.name, Path(info.module_finder.find_spec(info.name).origin)))
        found.update((name, path) for name, path in modules if ">>>" in path.read_text())
    return found


def count_examples(source: str) -> tuple[int, int]:
    """(examples, skipped examples) written in ``source``: `>>>` lines with their `...` lines, and ``+SKIP`` ones."""
    examples = EXAMPLE.findall(source)
    return len(examples), sum(bool(SKIP.search(example)) for example in examples)


MODULES = modules_with_examples()


@pytest.mark.parametrize("name", MODULES)
def test_examples(name):
    module = importlib.import_module(name)
    examples, skipped = count_examples(MODULES[name].read_text())
    found = [example for test in doctest.DocTestFinder().find(module) for example in test.examples]
    assert len(found) == examples, f"{name}: {examples} `>>>` in the source, {len(found)} in docstrings doctest reads"
    result = doctest.testmod(module, optionflags=doctest.ELLIPSIS)
    assert result.failed == 0
    assert result.attempted == examples - skipped
