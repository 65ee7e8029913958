"""The coordinator's credentials in its state dir, created at first start with mode 0600: its Ed25519 key (it signs
tokens, assignments and checkpoint manifests; its public half is in every RunSpec) and the admin token (admin RPCs
carry it as ``authorization: Bearer <token>``).

>>> import tempfile
>>> with tempfile.TemporaryDirectory() as state_dir:
...     first = load_or_create_admin_token(state_dir)
...     same = load_or_create_admin_token(state_dir) == first
...     _ = (Path(state_dir) / ADMIN_TOKEN_FILENAME).write_text("")  # left empty by a crash
...     same, len(load_or_create_admin_token(state_dir)) > 20
(True, True)
"""

import logging
import secrets
from pathlib import Path

from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PrivateKey
from omi.protos import signing

logger = logging.getLogger(__name__)

KEY_FILENAME = "coordinator_key.pem"
ADMIN_TOKEN_FILENAME = "admin_token"


def load_or_create_coordinator_key(state_dir: str | Path) -> Ed25519PrivateKey:
    """The coordinator's key in its state dir, created (mode 0600) at first start."""
    return signing.load_or_create_key(Path(state_dir) / KEY_FILENAME)


def load_or_create_admin_token(state_dir: str | Path) -> str:
    """The admin token of a state dir, created (mode 0600) at first start."""
    path = Path(state_dir) / ADMIN_TOKEN_FILENAME
    if path.exists():
        token = path.read_text().strip()
        if token:
            return token
        # an empty file (an older version left one when it crashed mid-write) must not become an empty token
        logger.warning("the admin token file %s is empty: writing a new token", path)
    token = secrets.token_urlsafe(32)
    signing.write_private_file(path, (token + "\n").encode())
    logger.info("created the admin token in %s", path)
    return token
