"""Code copied from hivemind stays in omi.swarm.upstream, pinned to the upstream source it follows.

As diffusers' ``utils/check_copies.py``: each piece there names its upstream function in a comment, and the sha256 of
that function's source under the installed hivemind must equal its pin in ``PINNED``. Outside that module, no code in
swarm/, node/, coordinator/ or models/ reads a private hivemind attribute or overrides a private hivemind method.
"""

import ast
import hashlib
import importlib
import inspect
import re
import textwrap
from pathlib import Path

import hivemind
import pytest
from omi.swarm import upstream

ROOT = Path(__file__).resolve().parent.parent
UPSTREAM = ROOT / "swarm" / "upstream.py"
SCANNED = ("swarm", "node", "coordinator", "models")
# the comment that opens each copied piece in omi.swarm.upstream
MARKER = re.compile(r"^\s*# (?:Copied from|Follows) (hivemind(?:\.\w+)+) \(hivemind ([\d.]+)\)")
# private hivemind attributes and methods that only omi.swarm.upstream may touch (read, call, assign or override)
PRIVATE = frozenset({
    "_p2p", "_matchmaking", "_outer_pipe", "_inner_pipe", "_running_groups", "_averaging_alpha", "_state_updated",
    "_ban_sender", "_generate_input_for_peer", "_communicate_with_peer", "_accumulate_parts_streaming",
    "_aggregate_with_group", "_run_allreduce_inplace_", "_load_state_from_peers", "_rpc_handlers", "_stub_type",
    "_BASE_COMPRESSION_TYPES", "_local_access_token", "_private_key", "_load_local_tensors_into_averager_",
    "tensor_part_container", "tensor_part_reducer", "parts_for_local_averaging",
})
# (file, name) where the name is the module's own attribute, not hivemind's
OWN = {("swarm/params_p2p.py", "_p2p")}  # ParamsServer/ParamsFetcher keep their own libp2p handle under this name


def upstream_object(qualified: str):
    """The object a dotted name such as ``hivemind.averaging.averager.DecentralizedAverager.step`` names."""
    parts = qualified.split(".")
    for split in range(len(parts), 0, -1):
        try:
            found = importlib.import_module(".".join(parts[:split]))
        except ImportError:
            continue
        for attribute in parts[split:]:
            found = getattr(found, attribute)
        return found
    raise ImportError(qualified)


def source_hash(qualified: str) -> str:
    return hashlib.sha256(textwrap.dedent(inspect.getsource(upstream_object(qualified))).encode()).hexdigest()


def changed_upstream(pins: dict[str, str]) -> list[str]:
    """The pinned upstream functions whose source differs in the installed hivemind (or that are gone)."""
    changed = []
    for name, pin in sorted(pins.items()):
        try:
            now = source_hash(name)
        except (ImportError, AttributeError, OSError, TypeError):
            now = "missing"
        if now != pin:
            changed.append(f"{name}: pinned {pin}, installed hivemind {hivemind.__version__}: {now}")
    return changed


def test_every_pinned_upstream_function_is_unchanged():
    changed = changed_upstream(upstream.PINNED)
    assert not changed, (
        "hivemind changed functions that omi.swarm.upstream copies or relies on:\n  " + "\n  ".join(changed) +
        "\nFor each: read the upstream change (its diff between hivemind " + upstream.HIVEMIND_VERSION +
        " and the installed version), adapt the piece in swarm/upstream.py whose comment names it (or confirm it "
        "needs no change), then set its PINNED hash to the new one above and the version in its comment and in "
        "HIVEMIND_VERSION.")


def test_a_changed_upstream_function_is_reported():
    name = "hivemind.averaging.averager.DecentralizedAverager._run_allreduce_inplace_"
    pins = dict(upstream.PINNED, **{name: "0" * 64})
    assert [line.split(":")[0] for line in changed_upstream(pins)] == [name]


def test_every_copy_names_a_pinned_function_and_every_pin_a_copy():
    marked = [MARKER.match(line) for line in UPSTREAM.read_text().splitlines()]
    named = {m.group(1) for m in marked if m}
    assert named == set(upstream.PINNED), "each '# Copied from'/'# Follows' comment has one PINNED entry and back"
    assert {m.group(2) for m in marked if m} == {upstream.HIVEMIND_VERSION}


def private_hivemind_access(source: str, path: str = "<source>") -> list[str]:
    """Where ``source`` reads, assigns, imports or overrides a name of :data:`PRIVATE` or a private hivemind module
    member (``from hivemind.x import _y``), as ``path:line name``."""
    found = []
    for node in ast.walk(ast.parse(source)):
        names = []
        if isinstance(node, ast.Attribute):
            names = [node.attr]
        elif isinstance(node, ast.FunctionDef | ast.AsyncFunctionDef):
            names = [node.name]
        elif isinstance(node, ast.Assign | ast.AnnAssign):
            targets = node.targets if isinstance(node, ast.Assign) else [node.target]
            names = [t.id for t in targets if isinstance(t, ast.Name)]
        elif isinstance(node, ast.ImportFrom) and (node.module or "").split(".")[0] == "hivemind":
            names = [alias.name for alias in node.names if alias.name.startswith("_")]
            names += [part for part in node.module.split(".") if part.startswith("_")]
        for name in names:
            if (name in PRIVATE or isinstance(node, ast.ImportFrom)) and (path, name) not in OWN:
                found.append(f"{path}:{node.lineno} {name}")
    return found


def test_private_hivemind_access_is_only_in_the_upstream_module():
    found = []
    for package in SCANNED:
        for file in sorted((ROOT / package).rglob("*.py")):
            if file != UPSTREAM and "_pb2" not in file.name:
                relative = file.relative_to(ROOT).as_posix()
                found += private_hivemind_access(file.read_text(), relative)
    assert found == [], ("private hivemind access outside swarm/upstream.py; move it there behind a named function "
                         "pinned to the upstream function it follows:\n  " + "\n  ".join(found))


@pytest.mark.parametrize("snippet", [
    "self._p2p.call()", "runner.tensor_part_container.prefetch = 2",
    "async def _run_allreduce_inplace_(self, tensors): pass", "class A:\n    _rpc_handlers = None",
    "from hivemind.compression.serialization import _BASE_COMPRESSION_TYPES",
])
def test_the_scan_sees_private_access(snippet):
    assert private_hivemind_access(snippet)


def test_the_scanned_names_are_hivemind_names():
    sources = "\n".join(path.read_text() for path in Path(hivemind.__file__).parent.rglob("*.py"))
    assert sorted(name for name in PRIVATE if not re.search(rf"\b{re.escape(name)}\b", sources)) == []
