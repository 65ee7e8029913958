"""Who may take part in a run's swarm: the token registry in the DHT and the gate every averager asks.

hivemind applies authorizers to DHT RPCs only (:mod:`omi.swarm.tokens`); the averagers' RPCs
(``rpc_join_group``, ``rpc_aggregate_part``, ``rpc_download_state``) are open to any libp2p peer. libp2p
authenticates the peer id of every stream (``context.remote_id``) and our token binds ``peer_id``, so every node
publishes its token in the (token-gated) DHT under :func:`token_registry_key` with subkey = its peer id
(:func:`start_token_publisher`), and a :class:`PeerAccessGate` refuses a remote peer id that has no valid
published token (cached until it expires, at most :data:`RECHECK_SECONDS`). :class:`TokenRegistryValidator`
makes the DHT accept under that key only a valid token for the very peer id in the subkey, so one member cannot
overwrite another's entry. The averagers that ask the gate are in :mod:`omi.swarm.averagers`.

**Revocations.** A ban must not wait for the token TTL (an hour by default). The coordinator's bootstrap peer
publishes, under :func:`revocation_key`, a coordinator-signed revocation for every peer id of a banned node
(:func:`publish_revocations`; :class:`RevocationValidator` makes the DHT refuse any other record there, so no
peer can revoke another). A gate keeps a verified token for at most :data:`RECHECK_SECONDS` before it reads the
registry and the revocations again, so a banned node's peer is refused by every averager within a minute.

The DHT refuses a banned node too: every DHT peer (:func:`omi.swarm.dht.make_dht`) reads the revocations every
:data:`RECHECK_SECONDS` (:func:`start_revocation_watch`) and hands the revoked peer ids to its token authorizer
(:mod:`omi.swarm.tokens`), which then refuses their DHT requests and responses although their tokens have not
expired.

Limits: tokens are bearer-free only as far as keys stay private: DHT access needs the RSA key, averaging needs the
libp2p key.
"""

from __future__ import annotations

import asyncio
import functools
import logging
import time

import hivemind
from google.protobuf.message import DecodeError
from hivemind.dht.routing import DHTID
from hivemind.dht.validation import DHTRecord, RecordValidatorBase
from hivemind.p2p import PeerID
from hivemind.utils.serializer import MSGPackSerializer
from hivemind.utils.timed_storage import get_dht_time
from omi.protos import pb, signing
from omi.protos.tokens import is_valid_access_token
from omi.swarm.tokens import AccessDenied, CoordinatorTokenAuthorizer

logger = logging.getLogger(__name__)

PUBLISH_PERIOD = 15.0  # seconds between re-publications of a node's token in the DHT registry
RECHECK_SECONDS = 30.0  # a gate trusts a verified token this long before it looks for a revocation again
REVOCATION_DOMAIN = b"omi.v1 revoked swarm peer\0"


def token_registry_key(dht_prefix: str) -> str:
    """DHT key under which every peer of the run publishes its token (subkey: its base58 peer id)."""
    return f"{dht_prefix}_access_tokens"


def revocation_key(dht_prefix: str) -> str:
    """DHT key under which the coordinator revokes the peer ids of banned nodes (subkey: the base58 peer id)."""
    return f"{dht_prefix}_revoked_peers"


def revocation_bytes(run_id: str, peer_id: str) -> bytes:
    """What the coordinator signs to revoke ``peer_id`` in ``run_id``."""
    return REVOCATION_DOMAIN + run_id.encode() + b"\0" + peer_id.encode()


def is_valid_revocation(signature: bytes, coordinator_public_key: bytes, run_id: str, peer_id: str) -> bool:
    return isinstance(signature, bytes) and signing.verify_bytes(revocation_bytes(run_id, peer_id), signature,
                                                                 coordinator_public_key)


class _PeerKeyedValidator(RecordValidatorBase):
    """DHT record validator for one key whose subkeys are base58 peer ids: records under other keys pass; under this
    key a record passes only if :meth:`accepts` its decoded peer id and value (an undecodable one is refused)."""

    def __init__(self, coordinator_public_key: bytes, run_id: str, key: str):
        self.coordinator_public_key, self.run_id = coordinator_public_key, run_id
        self._key_id = DHTID.generate(source=key).to_bytes()

    def validate(self, record: DHTRecord) -> bool:
        if record.key != self._key_id:
            return True
        try:
            peer_id, value = MSGPackSerializer.loads(record.subkey), MSGPackSerializer.loads(record.value)
            return isinstance(peer_id, str) and self.accepts(peer_id, value, record)
        except Exception:  # any undecodable record under our key is refused
            return False

    def accepts(self, peer_id: str, value, record: DHTRecord) -> bool:
        raise NotImplementedError

    def merge_with(self, other: RecordValidatorBase) -> bool:
        return False


class RevocationValidator(_PeerKeyedValidator):
    """DHT record validator: under the revocation key, accept only the coordinator's signed revocation of the
    subkey's peer id (nobody else can revoke a peer)."""

    def __init__(self, coordinator_public_key: bytes, run_id: str, dht_prefix: str):
        super().__init__(coordinator_public_key, run_id, revocation_key(dht_prefix))

    def accepts(self, peer_id: str, value, record: DHTRecord) -> bool:
        return is_valid_revocation(value, self.coordinator_public_key, self.run_id, peer_id)


def publish_revocations(dht: hivemind.DHT, coordinator_key, spec: pb.RunSpec, peer_ids, lifetime: float) -> int:
    """Store the coordinator's revocation of each of ``peer_ids`` in the run's DHT for ``lifetime`` seconds (at
    least the token TTL: a banned node's last token must expire before its revocation does); returns how many
    were stored."""
    key, expiration, stored = revocation_key(spec.dht_prefix), get_dht_time() + lifetime, 0
    for peer_id in peer_ids:
        signature = signing.sign_bytes(revocation_bytes(spec.run_id, peer_id), coordinator_key)
        stored += bool(dht.store(key, subkey=peer_id, value=signature, expiration_time=expiration))
    return stored


class TokenRegistryValidator(_PeerKeyedValidator):
    """DHT record validator: under the token registry key, accept only a valid token for the subkey's peer id.

    The record may not outlive the token. Records under other keys pass untouched.
    """

    def __init__(self, coordinator_public_key: bytes, run_id: str, dht_prefix: str):
        super().__init__(coordinator_public_key, run_id, token_registry_key(dht_prefix))

    def accepts(self, peer_id: str, value, record: DHTRecord) -> bool:
        token = pb.AccessToken.FromString(value)
        return (record.expiration_time <= token.expires_at_ms / 1000
                and is_valid_access_token(token, self.coordinator_public_key, self.run_id, peer_id=peer_id))


async def _publish_token_periodically(registry_key: str, period: float, dht: hivemind.DHT, node) -> None:
    """Runs inside the DHT process: store the token the authorizer holds under the registry, again and again."""
    authorizer: CoordinatorTokenAuthorizer = node.protocol.authorizer
    peer_id = node.peer_id.to_base58()
    published = None
    while True:
        try:
            await authorizer.refresh_token_if_needed()
            token = authorizer.access_token
            # re-storing an unchanged token reaches peers that joined since; they answer False where they hold it
            stored = await node.store(registry_key, subkey=peer_id, value=token.SerializeToString(),
                                      expiration_time=token.expires_at_ms / 1000)
            if stored:
                published = token
            elif token != published:
                logger.warning("could not publish this node's access token in the DHT (will retry)")
        except AccessDenied as e:
            logger.warning("%s", e)
        except Exception:
            logger.exception("publishing the access token failed")
        await asyncio.sleep(period)



async def _watch_revocations(spec: pb.RunSpec, period: float, dht: hivemind.DHT, node) -> None:
    """Runs inside the DHT process: read the coordinator's revocations every ``period`` seconds and hand the revoked
    peer ids to this peer's token authorizer, which then refuses their DHT requests and responses."""
    authorizer: CoordinatorTokenAuthorizer = node.protocol.authorizer
    key = revocation_key(spec.dht_prefix)
    while True:
        try:
            found = await node.get(key, latest=True)
            if found is not None and isinstance(found.value, dict):
                for peer_id, item in found.value.items():
                    if (isinstance(peer_id, str) and peer_id not in authorizer.revoked and is_valid_revocation(
                            item.value, spec.coordinator_public_key, spec.run_id, peer_id)):
                        authorizer.revoked.add(peer_id)
                        logger.info("peer %s is revoked (its node is banned): its DHT requests are refused", peer_id)
        except Exception:
            logger.exception("reading the revocations failed")
        await asyncio.sleep(period)


def start_revocation_watch(dht: hivemind.DHT, spec: pb.RunSpec, period: float = RECHECK_SECONDS) -> None:
    """Keep this DHT peer's authorizer refusing the peers the coordinator revoked (read every ``period`` s)."""
    dht.run_coroutine(functools.partial(_watch_revocations, spec, period), return_future=True)


def start_token_publisher(dht: hivemind.DHT, dht_prefix: str, period: float = PUBLISH_PERIOD) -> None:
    """Publish (and keep re-publishing, picking up renewals) this node's token in the run's token registry."""
    dht.run_coroutine(functools.partial(_publish_token_periodically, token_registry_key(dht_prefix), period),
                      return_future=True)



class PeerAccessGate:
    """Decides, inside an averager's process, whether a remote libp2p peer holds a valid token of the run.

    Looks the peer up in the DHT token registry and caches a verified token until it expires, at most ``recheck``
    seconds. Lookups for unknown peers are rate-limited to one registry read per ``min_refresh_interval`` seconds.

    :param coordinator_public_key: raw Ed25519 key of the coordinator
    :param run_id: the run tokens must be issued for
    :param dht_prefix: the run's DHT prefix (where the registry lives)
    :param min_refresh_interval: seconds between two registry reads triggered by unknown peers
    :param recheck: seconds a verified token is trusted before the registry and revocations are read again
    """

    def __init__(self, coordinator_public_key: bytes, run_id: str, dht_prefix: str, *,
                 min_refresh_interval: float = 1.0, recheck: float = RECHECK_SECONDS):
        self.coordinator_public_key, self.run_id, self.recheck = coordinator_public_key, run_id, recheck
        self.registry_key, self.revocation_key = token_registry_key(dht_prefix), revocation_key(dht_prefix)
        self.min_refresh_interval = min_refresh_interval
        self._valid_until: dict[str, float] = {}  # base58 peer id -> trusted until (token expiry, at most a recheck)
        self._revoked: set[str] = set()  # peer ids the coordinator revoked (banned nodes')
        self._last_refresh = -float("inf")
        self._lock: asyncio.Lock | None = None

    def _is_cached(self, peer_id: str, now: float) -> bool:
        return self._valid_until.get(peer_id, 0.0) > now

    async def _refresh(self, dht: hivemind.DHT) -> None:
        self._last_refresh = time.monotonic()
        revoked = await dht.get(self.revocation_key, latest=True, return_future=True)
        if revoked is not None and isinstance(revoked.value, dict):
            for peer_id, item in revoked.value.items():
                if isinstance(peer_id, str) and is_valid_revocation(item.value, self.coordinator_public_key,
                                                                    self.run_id, peer_id):
                    self._revoked.add(peer_id)
                    self._valid_until.pop(peer_id, None)
        found = await dht.get(self.registry_key, latest=True, return_future=True)
        if found is None or not isinstance(found.value, dict):
            return
        now = time.time()
        for peer_id, item in found.value.items():
            try:
                token = pb.AccessToken.FromString(item.value)
            except (DecodeError, TypeError):
                continue
            if (isinstance(peer_id, str) and peer_id not in self._revoked
                    and is_valid_access_token(token, self.coordinator_public_key, self.run_id, now, peer_id=peer_id)):
                self._valid_until[peer_id] = min(token.expires_at_ms / 1000, now + self.recheck)

    async def is_allowed(self, dht: hivemind.DHT, peer_id: PeerID) -> bool:
        """True if ``peer_id`` has a valid token of the run published in the DHT registry."""
        peer = peer_id.to_base58()
        if self._is_cached(peer, time.time()):
            return True
        if self._lock is None:
            self._lock = asyncio.Lock()
        async with self._lock:
            if self._is_cached(peer, time.time()):
                return True
            if time.monotonic() - self._last_refresh >= self.min_refresh_interval:
                try:
                    await self._refresh(dht)
                except Exception as e:  # our own DHT access failing (e.g. our token expired) refuses everyone
                    logger.warning("could not read the token registry: %r", e)
            allowed = self._is_cached(peer, time.time())
        if not allowed:
            why = "its node is banned (revoked)" if peer in self._revoked else "no valid access token"
            logger.warning("refused averaging peer %s: %s for run %r", peer, why, self.run_id)
        return allowed

