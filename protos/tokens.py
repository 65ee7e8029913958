"""Access tokens: the coordinator-signed permission to take part in a run's swarm, checked by every peer.

A node's permission is our ``pb.AccessToken`` (node id, libp2p peer id, run id, expiry, the RSA
``swarm_public_key`` its hivemind authorizer signs with), signed by the coordinator's Ed25519 key.
:func:`is_valid_access_token` is the one check every peer applies; how tokens ride on hivemind's RPCs is
:mod:`omi.swarm.tokens`. This module needs neither torch nor hivemind, so reading a token file is cheap.

>>> coordinator = signing.generate_key()
>>> token = signing.sign(pb.AccessToken(node_id="n", peer_id="Qm", run_id="digits", expires_at_ms=2_000_000_000_000),
...                      coordinator)
>>> is_valid_access_token(token, signing.public_bytes(coordinator), "digits", now=1_700_000_000.0)
True
>>> is_valid_access_token(token, signing.public_bytes(coordinator), "digits", now=2_100_000_000.0)  # expired
False
"""

from __future__ import annotations

import os
import time
from collections.abc import Callable
from pathlib import Path

from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PrivateKey
from omi.protos import pb, signing

TokenProvider = Callable[[], pb.AccessToken]

MAX_CLOCK_SKEW = 60.0  # seconds a token's issued_at may lie in the future (unsynchronised clocks)


def is_valid_access_token(token: pb.AccessToken, coordinator_public_key: bytes, run_id: str,
                          now: float | None = None, *, peer_id: str | None = None,
                          swarm_public_key: bytes | None = None) -> bool:
    """True if ``token`` is signed by the coordinator, for ``run_id``, and valid at ``now`` (seconds, UNIX time).

    :param peer_id: if given, the token must be bound to this libp2p peer id (base58)
    :param swarm_public_key: if given, the token must be bound to this RSA key (OpenSSH bytes)
    """
    now = time.time() if now is None else now
    if not token.signature or not signing.verify(token, coordinator_public_key):
        return False
    if token.run_id != run_id:
        return False
    if token.expires_at_ms <= now * 1000 or token.issued_at_ms > (now + MAX_CLOCK_SKEW) * 1000:
        return False
    if peer_id is not None and token.peer_id != peer_id:
        return False
    if swarm_public_key is not None and token.swarm_public_key != swarm_public_key:
        return False
    return True


def mint_access_token(coordinator_key: Ed25519PrivateKey, *, run_id: str, peer_id: str, swarm_public_key: bytes,
                      node_public_key: bytes, ttl: float, now: float | None = None) -> pb.AccessToken:
    """A coordinator-signed token (what the coordinator's ``Register``/``RenewToken`` hand out)."""
    now = time.time() if now is None else now
    token = pb.AccessToken(node_id=signing.node_id(node_public_key), peer_id=peer_id, run_id=run_id,
                           issued_at_ms=int(now * 1000), expires_at_ms=int((now + ttl) * 1000),
                           node_public_key=node_public_key, swarm_public_key=swarm_public_key)
    return signing.sign(token, coordinator_key)



class TokenFile:
    """A token shared across processes through a file: the node writes renewals, swarm processes read them.

    hivemind runs the DHT and each averager in forked processes, so a token held in the node's memory
    would never reach them after a renewal. The authorizer calls this object (a ``token_provider``) in the
    DHT process; it rereads the file whenever its modification time changes.

    :param path: file holding the serialized ``pb.AccessToken`` (written atomically, mode 0600)

    >>> import tempfile, os
    >>> tokens = TokenFile(os.path.join(tempfile.mkdtemp(), "token.bin"))
    >>> tokens.write(pb.AccessToken(node_id="n", run_id="digits"))
    >>> tokens().run_id
    'digits'
    """

    def __init__(self, path: str | os.PathLike):
        self.path = Path(path)
        self._cached: tuple[int, pb.AccessToken] | None = None

    def write(self, token: pb.AccessToken) -> None:
        signing.write_private_file(self.path, token.SerializeToString())

    def __call__(self) -> pb.AccessToken:
        mtime = self.path.stat().st_mtime_ns
        if self._cached is None or self._cached[0] != mtime:
            self._cached = (mtime, pb.AccessToken.FromString(self.path.read_bytes()))
        return self._cached[1]

