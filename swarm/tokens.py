"""Our access token on hivemind's DHT RPCs: the token adapter, the authorizer, and the coordinator's own tokens.

hivemind checks DHT RPCs with a ``TokenAuthorizerBase``: each request and response carries an access token and
is signed with the sender's RSA key. :class:`CoordinatorTokenAuthorizer` maps our ``pb.AccessToken``
(:mod:`omi.protos.tokens`) into hivemind's ``AccessToken`` message like this (only the serialized,
coordinator-signed token is trusted; the other fields are copies that must agree with it):

=======================  ==============================================================
hivemind field           value
=======================  ==============================================================
``username``             ``token.node_id``
``public_key``           ``token.swarm_public_key`` (OpenSSH bytes of the RSA key that signs requests)
``expiration_time``      ``token.expires_at_ms`` as an ISO 8601 UTC string
``signature``            ``token.SerializeToString()`` (our whole token, with its Ed25519 signature)
=======================  ==============================================================

A request whose token is missing, forged, expired, of another run, or whose RSA signature is not made by
the token's ``swarm_public_key`` is dropped before the DHT sees it; so is such a response. A stock
``hivemind.DHT`` can therefore neither read nor store the run's keys.
"""

from __future__ import annotations

import logging
import time
from datetime import UTC, datetime

from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PrivateKey
from google.protobuf.message import DecodeError
from hivemind.proto.auth_pb2 import AccessToken as HivemindAccessToken
from hivemind.utils.auth import TokenAuthorizerBase
from hivemind.utils.crypto import RSAPrivateKey
from omi.protos import pb, signing
from omi.protos.tokens import TokenProvider, is_valid_access_token, mint_access_token
from omi.swarm.keys import swarm_public_key
from omi.swarm.upstream import presented_token

logger = logging.getLogger(__name__)

REFRESH_MARGIN = 60.0  # ask the token provider again when the held token expires within this many seconds


class AccessDenied(RuntimeError):
    """This node holds no valid access token (expired and not renewed, or of another run)."""


def to_hivemind_token(token: pb.AccessToken) -> HivemindAccessToken:
    """Carry our token inside hivemind's ``AccessToken`` (see the table in the module docstring)."""
    expiry = datetime.fromtimestamp(token.expires_at_ms / 1000, tz=UTC).isoformat()
    return HivemindAccessToken(username=token.node_id, public_key=token.swarm_public_key,
                               expiration_time=expiry, signature=token.SerializeToString())


def from_hivemind_token(hm_token: HivemindAccessToken) -> pb.AccessToken | None:
    """Our token carried in ``hm_token``, or None if it is missing or its copied fields disagree with it."""
    try:
        token = pb.AccessToken.FromString(hm_token.signature)
    except DecodeError:
        return None
    return token if hm_token == to_hivemind_token(token) else None



class CoordinatorTokenAuthorizer(TokenAuthorizerBase):
    """hivemind authorizer: attach this node's coordinator-signed token to every DHT RPC and accept only valid ones.

    :param token_provider: returns this node's current ``pb.AccessToken``; called in the DHT process whenever the
      held token is about to expire, so it must see renewals made elsewhere (e.g. :class:`TokenFile`)
    :param coordinator_public_key: raw Ed25519 key of the coordinator (``RunSpec.coordinator_public_key``)
    :param run_id: the run tokens must be issued for (``RunSpec.run_id``)
    :param local_private_key: the RSA key this node signs requests with; must match its token's swarm_public_key
    :param refresh_margin: seconds before expiry at which the provider is asked for a renewed token

    >>> from omi.protos import signing
    >>> coordinator, rsa_key = signing.generate_key(), RSAPrivateKey()
    >>> token = mint_access_token(coordinator, run_id="digits", peer_id="Qm", ttl=600,
    ...                           swarm_public_key=swarm_public_key(rsa_key),
    ...                           node_public_key=signing.public_bytes(signing.generate_key()))
    >>> authorizer = CoordinatorTokenAuthorizer(lambda: token, signing.public_bytes(coordinator), "digits", rsa_key)
    >>> authorizer.is_token_valid(to_hivemind_token(token))
    True
    """

    def __init__(self, token_provider: TokenProvider, coordinator_public_key: bytes, run_id: str,
                 local_private_key: RSAPrivateKey, *, refresh_margin: float = REFRESH_MARGIN):
        super().__init__(local_private_key)
        self.token_provider = token_provider
        self.coordinator_public_key = coordinator_public_key
        self.run_id = run_id
        self.refresh_margin = refresh_margin
        self._local_swarm_public_key = swarm_public_key(local_private_key)
        # peer ids the coordinator revoked (banned nodes'), kept current inside the DHT process by
        # omi.swarm.access.start_revocation_watch: their still-unexpired tokens are refused on every DHT RPC
        self.revoked: set[str] = set()

    async def get_token(self) -> HivemindAccessToken:
        token = self.token_provider()
        if not is_valid_access_token(token, self.coordinator_public_key, self.run_id,
                                     swarm_public_key=self._local_swarm_public_key):
            raise AccessDenied(f"no valid access token for run {self.run_id!r} (expired, not renewed, or not bound "
                               "to this node's swarm key): renew it with the coordinator")
        return to_hivemind_token(token)

    def is_token_valid(self, access_token: HivemindAccessToken) -> bool:
        token = from_hivemind_token(access_token)
        return (token is not None and token.peer_id not in self.revoked
                and is_valid_access_token(token, self.coordinator_public_key, self.run_id))

    def does_token_need_refreshing(self, access_token: HivemindAccessToken) -> bool:
        token = from_hivemind_token(access_token)
        return token is None or token.expires_at_ms <= (time.time() + self.refresh_margin) * 1000

    @property
    def access_token(self) -> pb.AccessToken | None:
        """The token this node currently presents (None before the first RPC)."""
        token = presented_token(self)
        return None if token is None else from_hivemind_token(token)



class MintingTokenProvider:
    """Token provider of a peer run by the coordinator itself: mints a fresh token with the coordinator key."""

    def __init__(self, coordinator_key: Ed25519PrivateKey, *, run_id: str, peer_id: str,
                 swarm_public_key: bytes, ttl: float):
        self.coordinator_key, self.run_id, self.peer_id, self.ttl = coordinator_key, run_id, peer_id, ttl
        self.swarm_public_key = swarm_public_key
        self._token: pb.AccessToken | None = None

    def __call__(self) -> pb.AccessToken:
        if self._token is None or self._token.expires_at_ms <= (time.time() + self.ttl / 2) * 1000:
            self._token = mint_access_token(self.coordinator_key, run_id=self.run_id, peer_id=self.peer_id,
                                            swarm_public_key=self.swarm_public_key,
                                            node_public_key=signing.public_bytes(self.coordinator_key), ttl=self.ttl)
        return self._token

