"""The coordinator: runs, registry, ledger, audits and checkpoints behind one gRPC service."""

from omi.coordinator.audit import Auditor
from omi.coordinator.checkpoints import Checkpoints
from omi.coordinator.core import Coordinator, CoordinatorConfig
from omi.coordinator.errors import CoordinatorError
from omi.coordinator.ledger import Ledger
from omi.coordinator.liveness import Liveness
from omi.coordinator.registry import Caller, Registry, RegistryConfig
from omi.coordinator.runs import Runs
from omi.coordinator.server import CoordinatorServer, ServerConfig, serve
from omi.coordinator.store import Store
from omi.coordinator.work import ShardLayout, WorkPlanner

__all__ = ["Auditor", "Caller", "Checkpoints", "Coordinator", "CoordinatorConfig", "CoordinatorError",
           "CoordinatorServer", "Ledger", "Liveness", "Registry", "RegistryConfig", "Runs", "ServerConfig",
           "ShardLayout", "Store", "WorkPlanner", "serve"]
