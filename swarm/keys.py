"""A peer's two swarm keys: the libp2p identity (its peer id) and the RSA key that signs its DHT requests."""

from __future__ import annotations

import logging
import os
from pathlib import Path

from cryptography.hazmat.primitives import serialization
from cryptography.hazmat.primitives.asymmetric import rsa
from hivemind.p2p import P2P, PeerID
from hivemind.utils.crypto import RSAPrivateKey
from omi.protos import signing
from omi.swarm.upstream import rsa_private_key

logger = logging.getLogger(__name__)

_GENERATED: set[str] = set()  # identity files this process generated: no other peer can hold those


def load_or_create_swarm_key(path: str | os.PathLike) -> RSAPrivateKey:
    """The RSA key a node's hivemind authorizer signs DHT requests with; created (PEM, mode 0600) on first use.

    Its public half (:func:`swarm_public_key`) goes into ``RegisterRequest.swarm_public_key``.
    """
    path = Path(path)
    if path.exists():
        raw = serialization.load_pem_private_key(path.read_bytes(), password=None)
        if not isinstance(raw, rsa.RSAPrivateKey):
            raise ValueError(f"{path} does not hold an RSA private key")
    else:
        raw = rsa.generate_private_key(public_exponent=65537, key_size=2048)
        signing.save_key(raw, path)
        logger.info("created a new swarm RSA key at %s", path)
    return rsa_private_key(raw)


def swarm_public_key(key: RSAPrivateKey) -> bytes:
    """OpenSSH bytes of the public half of ``key``: what tokens bind as ``swarm_public_key``."""
    return key.get_public_key().to_bytes()


def load_or_create_peer_identity(identity_path: str | os.PathLike) -> str:
    """The base58 libp2p peer id stored at ``identity_path`` (a libp2p private key), created on first use."""
    identity_path = str(identity_path)
    if not os.path.isfile(identity_path):
        Path(identity_path).parent.mkdir(parents=True, exist_ok=True)
        P2P.generate_identity(identity_path)
        _GENERATED.add(os.path.realpath(identity_path))
    with open(identity_path, "rb") as f:
        return PeerID.from_identity(f.read()).to_base58()



def generated_here(identity_path: str | os.PathLike) -> bool:
    """Whether this process generated the identity at ``identity_path`` (:func:`load_or_create_peer_identity`):
    then no other peer can be using it, and hivemind's check that it is free (a second libp2p daemon started
    against the swarm, seconds at every start) can be skipped."""
    return os.path.realpath(identity_path) in _GENERATED
