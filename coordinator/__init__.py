"""The coordinator: runs, registry, ledger, audits and checkpoints behind one gRPC service.

The public names below are imported on first use, so ``omi-coordinator run list`` (which loads this package)
does not pull in torch and hivemind, which the domain objects and the server need.
"""

import importlib

_HOMES = {
    "Auditor": "audit", "Caller": "registry", "Checkpoints": "checkpoints", "Coordinator": "core",
    "CoordinatorConfig": "config", "CoordinatorError": "errors", "CoordinatorServer": "server", "Ledger": "ledger",
    "Liveness": "liveness", "Registry": "registry", "RegistryConfig": "config", "Runs": "runs",
    "ServerConfig": "config", "ShardLayout": "work", "Store": "store", "WorkPlanner": "work", "serve": "server",
}
__all__ = sorted(_HOMES)


def __getattr__(name: str):
    if name not in _HOMES:
        raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
    return getattr(importlib.import_module(f"{__name__}.{_HOMES[name]}"), name)


def __dir__() -> list[str]:
    return sorted([*globals(), *__all__])
