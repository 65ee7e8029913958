"""The coordinator's configuration: dataclasses with a default and a comment per field, free of heavy imports.

``omi-coordinator`` builds a :class:`ServerConfig` from its options before it imports the server (which pulls in
torch and hivemind), so the admin commands stay light.
"""

from dataclasses import dataclass, field
from pathlib import Path

DEFAULT_MAX_MESSAGE_BYTES = 4 * 1024 * 1024


@dataclass
class RegistryConfig:
    challenge_ttl: float = 60.0    # seconds a challenge nonce may be answered
    max_clock_skew: float = 60.0   # seconds a signed request's timestamp may differ from the coordinator's clock
    node_rate: float = 5.0         # requests per second per node after the burst
    node_burst: int = 50           # requests a node may send back to back
    register_rate: float = 5.0     # challenges + registrations per second per source address after the burst
    register_burst: int = 60


@dataclass
class WorkConfig:
    # assignments one source address may hold per round (0: no cap), so identities made by the dozen behind one
    # address cannot take a small data set's whole round (issue 12, point 6)
    max_assignments_per_address: int = 8


@dataclass
class CoordinatorConfig:
    registry: RegistryConfig = field(default_factory=RegistryConfig)  # TTLs and rate limits
    work: WorkConfig = field(default_factory=WorkConfig)  # per-address caps on assignments
    flush_interval: float = 2.0     # seconds between heartbeat flushes to (and refreshes from) the store
    metrics_interval: float = 10.0  # seconds between points of the run history
    audit_task_timeout: float = 600.0  # seconds a validator may hold an audit task
    records_grace: float = 60.0  # seconds a node has from its report to hand its records over, window or not


@dataclass
class ServerConfig:
    state_dir: Path = Path("state")              # key, admin token, checkpoints and (by default) the SQLite database
    db_url: str | None = None                    # SQLAlchemy URL; None = SQLite under state_dir
    grpc_address: str = "127.0.0.1:50051"        # HOST:PORT of the gRPC API (port 0 = any free port)
    http_address: str | None = "127.0.0.1:8080"  # HOST:PORT of the HTTP app (dashboard); None = no HTTP
    run_file: Path | None = None                 # RunSpec TOML created (if new) and started at startup
    max_message_bytes: int = DEFAULT_MAX_MESSAGE_BYTES  # larger requests get RESOURCE_EXHAUSTED
    swarm_host: str | None = "127.0.0.1"         # where runs' hivemind bootstrap peers listen; None = no swarm peer
    validator: bool = False                      # start the built-in validator of each running run (needs swarm_host)
    coordinator: CoordinatorConfig = field(default_factory=CoordinatorConfig)
