"""What light entry points load: the admin CLI and the wire package stay free of torch, hivemind and diffusers."""

import subprocess
import sys
from pathlib import Path

HEAVY = ("torch", "hivemind", "diffusers")
BIN = Path(sys.executable).parent


def imported_modules(importtime_stderr: str) -> set[str]:
    """Module names in the output of ``python -X importtime`` (``import time: self | cumulative | name``)."""
    lines = [line.split("|")[-1].strip() for line in importtime_stderr.splitlines() if line.startswith("import time:")]
    return set(lines[1:])  # the first line is the header


def heavy(modules) -> list[str]:
    return sorted(m for m in modules if m.split(".")[0] in HEAVY)


def test_admin_cli_imports_no_torch_hivemind_or_diffusers():
    result = subprocess.run([sys.executable, "-X", "importtime", BIN / "omi-coordinator", "run", "list", "--help"],
                            capture_output=True, text=True, timeout=120)
    assert result.returncode == 0 and "List the runs" in result.stdout, result.stderr[-2000:]
    modules = imported_modules(result.stderr)
    assert "omi.coordinator.cli" in modules and "grpc" in modules  # the check sees what the command loaded
    assert heavy(modules) == []


def test_protos_import_neither_torch_nor_hivemind():
    code = ("import sys, omi.protos, omi.protos.tokens, omi.protos.runspec, omi.protos.signing, omi.protos.manifest\n"
            "print(' '.join(sorted(m for m in sys.modules if m.split('.')[0] in ('torch', 'hivemind'))))")
    result = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=120)
    assert result.returncode == 0, result.stderr[-2000:]
    assert result.stdout.strip() == ""


def test_the_coordinator_and_its_swarm_bootstrap_peer_load_no_diffusers():
    """``omi-coordinator serve`` and the per-run bootstrap peer it starts need hivemind, not the models: diffusers
    (and the transformers it pulls) cost seconds of CPU at each start of each of these processes."""
    code = ("import sys, omi.coordinator.server, omi.coordinator.bootstrap, omi.models, omi.swarm\n"
            "print(' '.join(sorted(m for m in sys.modules if m.split('.')[0] in ('diffusers', 'transformers'))))")
    result = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=120)
    assert result.returncode == 0, result.stderr[-2000:]
    assert result.stdout.strip() == ""
