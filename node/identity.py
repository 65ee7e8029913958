"""A node's identity: its Ed25519 key (created on first use, file mode 0600) and the node id derived from it.

>>> import tempfile
>>> with tempfile.TemporaryDirectory() as d:
...     identity = NodeIdentity.load_or_create(f"{d}/node_key.pem")
...     len(identity.node_id)
64
"""

import logging
import os
from dataclasses import dataclass
from pathlib import Path

from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PrivateKey
from omi.protos import signing

logger = logging.getLogger(__name__)


def default_key_path() -> Path:
    """``$OMI_HOME/node_key.pem``, by default ``~/.omi/node_key.pem``."""
    return Path(os.environ.get("OMI_HOME", Path.home() / ".omi")) / "node_key.pem"


@dataclass(frozen=True)
class NodeIdentity:
    """The node's private key, raw public key and node id (hex SHA-256 of the public key)."""

    key: Ed25519PrivateKey
    public_key: bytes
    node_id: str

    @classmethod
    def from_key(cls, key: Ed25519PrivateKey) -> "NodeIdentity":
        public = signing.public_bytes(key)
        return cls(key, public, signing.node_id(public))

    @classmethod
    def load_or_create(cls, path: str | Path | None = None) -> "NodeIdentity":
        """Load the key at ``path`` (default ``default_key_path()``), creating it with mode 0600 on first use."""
        path = Path(path) if path is not None else default_key_path()
        identity = cls.from_key(signing.load_or_create_key(path))
        logger.debug("node identity %s from %s", identity.node_id[:12], path)
        return identity
