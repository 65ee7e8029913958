"""The package layering README.md's Layout states: ``protos ← models ← swarm ← node | coordinator ← dashboard``.

No cycle; node and coordinator never import each other; only the coordinator's CLI composes the dashboard;
protos load none of torch, hivemind, diffusers, transformers (the wire stays light for any tool).

Read from the source (every ``import`` statement, also those inside functions), so a lazy import cannot hide a
dependency the wrong way.
"""

import ast
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parent.parent
PACKAGES = ("protos", "models", "swarm", "node", "coordinator", "dashboard")
# what each package may import from the others
ALLOWED = {
    "protos": set(),
    "models": {"protos"},
    "swarm": {"protos", "models"},
    "node": {"protos", "models", "swarm"},
    "coordinator": {"protos", "models", "swarm"},
    "dashboard": {"protos", "models", "swarm", "coordinator"},
}
# the coordinator's CLI composes the whole program (the dashboard app served beside the gRPC API); no other module
# of the coordinator may reach the dashboard
COMPOSITION_ROOTS = {"coordinator/cli.py": {"dashboard"}}
# third-party packages a layer must not load: the wire is light enough for any tool that reads tokens or specs
FORBIDDEN_THIRD_PARTY = {"protos": {"torch", "hivemind", "diffusers", "transformers"}}


def imports_of(path: Path) -> set[str]:
    """Every module name an ``import`` statement in ``path`` names."""
    names = set()
    for node in ast.walk(ast.parse(path.read_text(), str(path))):
        if isinstance(node, ast.Import):
            names.update(alias.name for alias in node.names)
        elif isinstance(node, ast.ImportFrom) and node.module and node.level == 0:
            names.add(node.module)
            names.update(f"{node.module}.{alias.name}" for alias in node.names)
    return names


def sources(package: str) -> list[Path]:
    return sorted(p for p in (ROOT / package).rglob("*.py") if "_pb2" not in p.name)


@pytest.mark.parametrize("package", PACKAGES)
def test_package_imports_only_the_layers_below_it(package):
    wrong = []
    for path in sources(package):
        allowed = ALLOWED[package] | COMPOSITION_ROOTS.get(path.relative_to(ROOT).as_posix(), set())
        for name in imports_of(path):
            parts = name.split(".")
            if parts[0] == "omi" and len(parts) > 1 and parts[1] != package and parts[1] not in allowed:
                wrong.append(f"{path.relative_to(ROOT)} imports {name}")
            if parts[0] in FORBIDDEN_THIRD_PARTY.get(package, ()):
                wrong.append(f"{path.relative_to(ROOT)} imports {name}")
    assert wrong == []


def test_the_allowed_graph_has_no_cycle():
    done: set[str] = set()

    def visit(package: str, path: tuple[str, ...]) -> None:
        assert package not in path, f"cycle: {' -> '.join((*path, package))}"
        if package not in done:
            for below in ALLOWED[package]:
                visit(below, (*path, package))
            done.add(package)

    for package in PACKAGES:
        visit(package, ())
