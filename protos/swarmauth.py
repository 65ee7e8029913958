"""Access control for the hivemind swarm: coordinator-signed tokens on every DHT RPC and on every averaging RPC.

Shared by node and coordinator (the coordinator runs a DHT bootstrap peer and a checkpointer peer).

**Tokens.** A node's permission is our ``pb.AccessToken`` (node id, libp2p peer id, run id, expiry, the
RSA ``swarm_public_key`` its hivemind authorizer signs with), signed by the coordinator's Ed25519 key.
:func:`is_valid_access_token` is the one check every peer applies.

**DHT.** hivemind checks DHT RPCs with a ``TokenAuthorizerBase``: each request and response carries an
access token and is signed with the sender's RSA key. :class:`CoordinatorTokenAuthorizer` maps our token
into hivemind's ``AccessToken`` message like this (only the serialized, coordinator-signed token is trusted;
the other fields are copies that must agree with it):

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

**Averaging.** hivemind applies authorizers to DHT RPCs only; the averagers' RPCs (``rpc_join_group``,
``rpc_aggregate_part``, ``rpc_download_state``) are open to any libp2p peer. libp2p authenticates the peer id
of every stream (``context.remote_id``) and our token binds ``peer_id``, so every node publishes its token in
the (token-gated) DHT under :func:`token_registry_key` with subkey = its peer id, and the averager classes
below refuse a remote peer id that has no valid published token (:class:`PeerAccessGate`, cached until the
token expires). Before running an all-reduce a peer also checks every member of the group the leader
assembled, so it never sends a tensor part to, nor takes an average from, a peer without a token.
:class:`TokenRegistryValidator` makes the DHT accept under that key only a valid token for the very peer id
in the subkey, so one member cannot overwrite another's entry with garbage.

Limits: a node that holds a valid token can do anything a node may do until its token expires (the
coordinator bans by not renewing; a ban takes effect within the token TTL). Tokens are bearer-free only as
far as keys stay private: DHT access needs the RSA key, averaging needs the libp2p key.

>>> from omi.protos import signing
>>> coordinator = signing.generate_key()
>>> token = signing.sign(pb.AccessToken(node_id="n", peer_id="Qm", run_id="digits", expires_at_ms=2_000_000_000_000),
...                      coordinator)
>>> is_valid_access_token(token, signing.public_bytes(coordinator), "digits", now=1_700_000_000.0)
True
>>> is_valid_access_token(token, signing.public_bytes(coordinator), "digits", now=2_100_000_000.0)  # expired
False
"""

from __future__ import annotations

import asyncio
import ctypes
import functools
import logging
import multiprocessing as mp
import os
import signal
import tempfile
import time
import typing
from collections.abc import Callable, Sequence
from datetime import datetime, timezone
from pathlib import Path

import hivemind
from cryptography.hazmat.primitives import serialization
from cryptography.hazmat.primitives.asymmetric import rsa
from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PrivateKey
from google.protobuf.message import DecodeError
from hivemind.averaging.allreduce import AllreduceException, AllReduceRunner, AveragingMode
from hivemind.averaging.group_info import GroupInfo
from hivemind.dht.routing import DHTID
from hivemind.dht.validation import DHTRecord, RecordValidatorBase
from hivemind.optim.grad_averager import GradientAverager
from hivemind.optim.state_averager import TrainingStateAverager
from hivemind.p2p import P2P, P2PContext, PeerID
from hivemind.proto import averaging_pb2
from hivemind.proto.auth_pb2 import AccessToken as HivemindAccessToken
from hivemind.utils.asyncio import as_aiter, azip
from hivemind.utils.auth import TokenAuthorizerBase
from hivemind.utils.crypto import RSAPrivateKey
from hivemind.utils.serializer import MSGPackSerializer
from hivemind.utils.timed_storage import get_dht_time
from omi.protos import pb, signing

logger = logging.getLogger(__name__)

TokenProvider = Callable[[], pb.AccessToken]

MAX_CLOCK_SKEW = 60.0  # seconds a token's issued_at may lie in the future (unsynchronised clocks)
REFRESH_MARGIN = 60.0  # ask the token provider again when the held token expires within this many seconds
PUBLISH_PERIOD = 15.0  # seconds between re-publications of a node's token in the DHT registry


class AccessDenied(RuntimeError):
    """This node holds no valid access token (expired and not renewed, or of another run)."""


# ---------------------------------------------------------------- tokens


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


def to_hivemind_token(token: pb.AccessToken) -> HivemindAccessToken:
    """Carry our token inside hivemind's ``AccessToken`` (see the table in the module docstring)."""
    expiry = datetime.fromtimestamp(token.expires_at_ms / 1000, tz=timezone.utc).isoformat()
    return HivemindAccessToken(username=token.node_id, public_key=token.swarm_public_key,
                               expiration_time=expiry, signature=token.SerializeToString())


def from_hivemind_token(hm_token: HivemindAccessToken) -> pb.AccessToken | None:
    """Our token carried in ``hm_token``, or None if it is missing or its copied fields disagree with it."""
    try:
        token = pb.AccessToken.FromString(hm_token.signature)
    except DecodeError:
        return None
    return token if hm_token == to_hivemind_token(token) else None


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


# ---------------------------------------------------------------- keys and identities


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
    key = RSAPrivateKey.__new__(RSAPrivateKey)  # hivemind's class only generates; its pickling sets this field
    key._private_key = raw
    return key


def swarm_public_key(key: RSAPrivateKey) -> bytes:
    """OpenSSH bytes of the public half of ``key``: what tokens bind as ``swarm_public_key``."""
    return key.get_public_key().to_bytes()


def load_or_create_peer_identity(identity_path: str | os.PathLike) -> str:
    """The base58 libp2p peer id stored at ``identity_path`` (a libp2p private key), created on first use."""
    identity_path = str(identity_path)
    if not os.path.isfile(identity_path):
        Path(identity_path).parent.mkdir(parents=True, exist_ok=True)
        P2P.generate_identity(identity_path)
    with open(identity_path, "rb") as f:
        return PeerID.from_identity(f.read()).to_base58()


# ---------------------------------------------------------------- DHT authorizer


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

    async def get_token(self) -> HivemindAccessToken:
        token = self.token_provider()
        if not is_valid_access_token(token, self.coordinator_public_key, self.run_id,
                                     swarm_public_key=self._local_swarm_public_key):
            raise AccessDenied(f"no valid access token for run {self.run_id!r} (expired, not renewed, or not bound "
                               "to this node's swarm key): renew it with the coordinator")
        return to_hivemind_token(token)

    def is_token_valid(self, access_token: HivemindAccessToken) -> bool:
        token = from_hivemind_token(access_token)
        return token is not None and is_valid_access_token(token, self.coordinator_public_key, self.run_id)

    def does_token_need_refreshing(self, access_token: HivemindAccessToken) -> bool:
        token = from_hivemind_token(access_token)
        return token is None or token.expires_at_ms <= (time.time() + self.refresh_margin) * 1000

    @property
    def access_token(self) -> pb.AccessToken | None:
        """The token this node currently presents (None before the first RPC)."""
        return None if self._local_access_token is None else from_hivemind_token(self._local_access_token)


# ---------------------------------------------------------------- token registry in the DHT


def token_registry_key(dht_prefix: str) -> str:
    """DHT key under which every peer of the run publishes its token (subkey: its base58 peer id)."""
    return f"{dht_prefix}_access_tokens"


class TokenRegistryValidator(RecordValidatorBase):
    """DHT record validator: under the token registry key, accept only a valid token for the subkey's peer id.

    The record may not outlive the token. Records under other keys pass untouched.
    """

    def __init__(self, coordinator_public_key: bytes, run_id: str, dht_prefix: str):
        self.coordinator_public_key, self.run_id = coordinator_public_key, run_id
        self._key_id = DHTID.generate(source=token_registry_key(dht_prefix)).to_bytes()

    def validate(self, record: DHTRecord) -> bool:
        if record.key != self._key_id:
            return True
        try:
            peer_id = MSGPackSerializer.loads(record.subkey)
            token = pb.AccessToken.FromString(MSGPackSerializer.loads(record.value))
        except Exception:  # any undecodable record under our key is refused
            return False
        return (isinstance(peer_id, str)
                and record.expiration_time <= token.expires_at_ms / 1000
                and is_valid_access_token(token, self.coordinator_public_key, self.run_id, peer_id=peer_id))

    def merge_with(self, other: RecordValidatorBase) -> bool:
        return False


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


async def _exit_with_parent(dht: hivemind.DHT, node) -> None:
    """Runs inside the DHT process: when the process that started it dies (even by SIGKILL), stop the libp2p
    daemon and exit, rather than linger as an orphan that holds the peer identity and its port.

    The DHT process is forked from a process that may have its own SIGTERM handler (the coordinator's asyncio
    loop, the node's graceful leave); inherited here it would swallow the SIGTERM of hivemind's hard shutdown."""
    signal.signal(signal.SIGTERM, signal.SIG_DFL)
    parent = os.getppid()
    while os.getppid() == parent:
        await asyncio.sleep(1.0)
    logger.warning("the process that started this DHT peer is gone; shutting the peer down")
    try:
        await asyncio.wait_for(node.p2p.shutdown(), timeout=5.0)
    finally:
        os._exit(0)


def exit_with_parent(dht: hivemind.DHT) -> None:
    """Make ``dht``'s process (and its libp2p daemon) end when the process that started it ends."""
    dht.run_coroutine(_exit_with_parent, return_future=True)


def start_token_publisher(dht: hivemind.DHT, dht_prefix: str, period: float = PUBLISH_PERIOD) -> None:
    """Publish (and keep re-publishing, picking up renewals) this node's token in the run's token registry."""
    dht.run_coroutine(functools.partial(_publish_token_periodically, token_registry_key(dht_prefix), period),
                      return_future=True)


def make_dht(spec: pb.RunSpec, token_provider: TokenProvider, swarm_key: RSAPrivateKey, *,
             initial_peers: Sequence[str] = (), identity_path: str | None = None, host: str = "127.0.0.1",
             port: int = 0, client_mode: bool = False, announce_host: str | None = None,
             publish_token: bool = True) -> hivemind.DHT:
    """Start a hivemind DHT peer of ``spec``'s run with the token authorizer and the token registry validator."""
    if announce_host is not None and port == 0:
        raise ValueError("announce_host needs an explicit port (libp2p cannot announce port 0)")
    authorizer = CoordinatorTokenAuthorizer(token_provider, spec.coordinator_public_key, spec.run_id, swarm_key)
    validator = TokenRegistryValidator(spec.coordinator_public_key, spec.run_id, spec.dht_prefix)
    dht = hivemind.DHT(
        initial_peers=list(initial_peers) or None, start=True, client_mode=client_mode, authorizer=authorizer,
        record_validators=[validator], identity_path=identity_path,
        host_maddrs=[f"/ip4/{host}/tcp/{port}"],
        announce_maddrs=[f"/ip4/{announce_host}/tcp/{port}"] if announce_host else None,
    )
    exit_with_parent(dht)
    if publish_token:
        start_token_publisher(dht, spec.dht_prefix)
    return dht


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


def start_bootstrap_dht(coordinator_key: Ed25519PrivateKey, spec: pb.RunSpec, *, host: str = "127.0.0.1",
                        port: int = 0, identity_path: str | None = None, swarm_key_path: str | None = None,
                        announce_host: str | None = None, token_ttl: float = 3600.0,
                        ) -> tuple[hivemind.DHT, list[str]]:
    """Run the coordinator's non-training DHT bootstrap peer; returns it and the multiaddrs for ``initial_peers``.

    The peer presents a token the coordinator mints for itself (node id = the coordinator's key), renewed in
    the DHT process before it expires. ``spec`` must carry ``coordinator_public_key`` (of ``coordinator_key``),
    ``run_id`` and ``dht_prefix``. Without ``identity_path`` / ``swarm_key_path`` the peer gets a fresh identity
    in a temporary directory (its multiaddrs then change on every start).

    >>> dht, maddrs = start_bootstrap_dht(key, spec, port=31337, identity_path="state/bootstrap.id")  # doctest: +SKIP
    >>> spec.initial_peers.extend(maddrs)  # doctest: +SKIP
    """
    if spec.coordinator_public_key != signing.public_bytes(coordinator_key):
        raise ValueError("spec.coordinator_public_key is not the public key of coordinator_key")
    if not spec.dht_prefix or not spec.run_id:
        raise ValueError("spec needs run_id and dht_prefix")
    scratch = None
    if identity_path is None or swarm_key_path is None:
        scratch = tempfile.mkdtemp(prefix="omi-bootstrap-")
    identity_path = identity_path or os.path.join(scratch, "p2p.id")
    swarm_key = load_or_create_swarm_key(swarm_key_path or os.path.join(scratch, "swarm_rsa.pem"))
    peer_id = load_or_create_peer_identity(identity_path)
    provider = MintingTokenProvider(coordinator_key, run_id=spec.run_id, peer_id=peer_id,
                                    swarm_public_key=swarm_public_key(swarm_key), ttl=token_ttl)
    dht = make_dht(spec, provider, swarm_key, initial_peers=spec.initial_peers, identity_path=identity_path,
                   host=host, port=port, announce_host=announce_host)
    maddrs = [str(m) for m in dht.get_visible_maddrs()]
    logger.info("bootstrap DHT peer %s listening on %s", peer_id, maddrs)
    return dht, maddrs


# ---------------------------------------------------------------- access control on averaging


class PeerAccessGate:
    """Decides, inside an averager's process, whether a remote libp2p peer holds a valid token of the run.

    Looks the peer up in the DHT token registry and caches a verified token until it expires. Lookups for
    unknown peers are rate-limited to one registry read per ``min_refresh_interval`` seconds.

    :param coordinator_public_key: raw Ed25519 key of the coordinator
    :param run_id: the run tokens must be issued for
    :param dht_prefix: the run's DHT prefix (where the registry lives)
    :param min_refresh_interval: seconds between two registry reads triggered by unknown peers
    """

    def __init__(self, coordinator_public_key: bytes, run_id: str, dht_prefix: str, *,
                 min_refresh_interval: float = 1.0):
        self.coordinator_public_key, self.run_id = coordinator_public_key, run_id
        self.registry_key = token_registry_key(dht_prefix)
        self.min_refresh_interval = min_refresh_interval
        self._valid_until: dict[str, float] = {}  # base58 peer id -> token expiry (seconds)
        self._last_refresh = -float("inf")
        self._lock: asyncio.Lock | None = None

    def _is_cached(self, peer_id: str, now: float) -> bool:
        return self._valid_until.get(peer_id, 0.0) > now

    async def _refresh(self, dht: hivemind.DHT) -> None:
        self._last_refresh = time.monotonic()
        found = await dht.get(self.registry_key, latest=True, return_future=True)
        if found is None or not isinstance(found.value, dict):
            return
        now = time.time()
        for peer_id, item in found.value.items():
            try:
                token = pb.AccessToken.FromString(item.value)
            except (DecodeError, TypeError):
                continue
            if isinstance(peer_id, str) and is_valid_access_token(token, self.coordinator_public_key, self.run_id,
                                                                  now, peer_id=peer_id):
                self._valid_until[peer_id] = max(self._valid_until.get(peer_id, 0.0), token.expires_at_ms / 1000)

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
            logger.warning("refused averaging peer %s: no valid access token for run %r", peer, self.run_id)
        return allowed


AllReduceRunnerFactory = Callable[..., AllReduceRunner]


class AccessControlledAveragerMixin:
    """Adds token checks to a hivemind ``DecentralizedAverager`` subclass (put it first in the bases).

    - ``rpc_join_group``: a leader answers a peer without a valid token with ``PROTOCOL_VIOLATION``;
    - ``rpc_aggregate_part``: a sender without a valid token gets ``PROTOCOL_VIOLATION`` and its part is dropped;
    - ``rpc_download_state``: a peer without a valid token gets nothing (hivemind's "not sharing" answer);
    - before an all-reduce, every member of the assembled group must hold a valid token, else the round fails
      before any tensor leaves this peer.

    It also records how many senders' parts it reduced in its last all-reduce (``last_group_size``, 0 = none
    yet; senders that never sent are not counted), counts rounds with more than itself, and lets
    the all-reduce runner be replaced (``allreduce_runner``, e.g. a robust reducer).

    :param access: the :class:`PeerAccessGate` of the run
    :param allreduce_runner: a callable with ``AllReduceRunner``'s keyword arguments; default: hivemind's
    """

    # hivemind caches the RPC table per class and inherits it; each subclass must build its own
    _rpc_handlers = None
    _stub_type = None

    def __init__(self, *args, access: PeerAccessGate, allreduce_runner: AllReduceRunnerFactory | None = None,
                 **kwargs):
        # set before super().__init__: hivemind may fork the averager process from inside it (start=True)
        self.access = access
        self.allreduce_runner = allreduce_runner or AllReduceRunner
        self._last_group_size = mp.Value(ctypes.c_int, 0)
        self._rounds_averaged = mp.Value(ctypes.c_int, 0)
        super().__init__(*args, **kwargs)

    async def _is_member(self, peer_id: PeerID) -> bool:
        return peer_id == self.peer_id or await self.access.is_allowed(self.dht, peer_id)

    @property
    def last_group_size(self) -> int:
        """Senders whose parts this peer reduced in its last all-reduce, itself included (0 if none yet)."""
        return self._last_group_size.value

    @property
    def rounds_averaged(self) -> int:
        """All-reduce rounds of this averager in which it reduced parts of at least one other peer."""
        return self._rounds_averaged.value

    async def rpc_join_group(self, request: averaging_pb2.JoinRequest, context: P2PContext
                             ) -> typing.AsyncIterator[averaging_pb2.MessageFromLeader]:
        if not await self._is_member(context.remote_id):
            yield averaging_pb2.MessageFromLeader(code=averaging_pb2.PROTOCOL_VIOLATION)
            return
        async for message in super().rpc_join_group(request, context):
            yield message

    async def rpc_aggregate_part(self, stream: typing.AsyncIterator[averaging_pb2.AveragingData], context: P2PContext
                                 ) -> typing.AsyncIterator[averaging_pb2.AveragingData]:
        if not await self._is_member(context.remote_id):
            yield averaging_pb2.AveragingData(code=averaging_pb2.PROTOCOL_VIOLATION)
            return
        async for message in super().rpc_aggregate_part(stream, context):
            yield message

    async def rpc_download_state(self, request: averaging_pb2.DownloadRequest, context: P2PContext
                                 ) -> typing.AsyncIterator[averaging_pb2.DownloadData]:
        if not await self._is_member(context.remote_id):
            return
        async for message in super().rpc_download_state(request, context):
            yield message

    async def _aggregate_with_group(self, group_info: GroupInfo, min_vector_size: int, **kwargs):
        for peer_id in group_info.peer_ids:
            if not await self._is_member(peer_id):
                raise AllReduceRefused(f"group member {peer_id} has no valid access token")
        result = await super()._aggregate_with_group(group_info, min_vector_size, **kwargs)
        if self._last_group_size.value > 1:
            with self._rounds_averaged.get_lock():
                self._rounds_averaged.value += 1
        return result

    async def _run_allreduce_inplace_(self, tensors, group_info: GroupInfo, group_id: bytes | None = None,
                                      **kwargs):
        # hivemind's method with AllReduceRunner replaced by self.allreduce_runner
        group_id = group_info.group_id if group_id is None else group_id
        runner = self.allreduce_runner(p2p=self._p2p, servicer_type=type(self), prefix=self.prefix, tensors=tensors,
                                       group_id=group_id, ordered_peer_ids=group_info.peer_ids, **kwargs)
        assert group_id in self._running_groups, f"Group id {group_id} was not registered in _register_allreduce_group"
        failed_reducers = _record_failed_reducers(runner)
        self._running_groups[group_id].set_result(runner)
        if runner.modes[group_info.peer_ids.index(self.peer_id)] != AveragingMode.AUX:
            async for tensor, update in azip(as_aiter(*tensors), runner):
                tensor.add_(update, alpha=self._averaging_alpha)
                self.last_updated = get_dht_time()
                self._state_updated.set()
        else:
            async for _ in runner:
                raise ValueError("aux peers should not receive averaged tensors")
        # the peers this one really exchanged tensors with, itself included: senders whose parts it received, and
        # reducers that returned its parts averaged (a peer may reduce nothing yet get every part averaged). A
        # group whose members all refused it counts 1. (The group's senders minus those hivemind banned also
        # counted members that had refused and sent nothing when the round ended before their timeout: an
        # intruder then "saw" a group of 3 whose honest members had refused it.)
        received = runner.tensor_part_reducer.num_parts_received
        senders = {runner.sender_peer_ids[i] for i, parts in enumerate(received) if parts > 0}
        by_peer = runner.tensor_part_container.num_parts_by_peer
        reducers = {peer for i, peer in enumerate(runner.ordered_peer_ids)
                    if by_peer[i] > 0 and i not in failed_reducers}
        self._last_group_size.value = len(senders | reducers | {self.peer_id})


def _record_failed_reducers(runner: AllReduceRunner) -> set[int]:
    """The indices (in the group's order) of the peers that failed to reduce ``runner``'s parts, filled as it runs."""
    failed: set[int] = set()
    container = runner.tensor_part_container
    register = container.register_failed_reducer

    def register_failed_reducer(peer_index: int):
        failed.add(peer_index)
        register(peer_index)

    container.register_failed_reducer = register_failed_reducer
    return failed


class AllReduceRefused(AllreduceException):
    """The assembled group contains a peer without a valid access token."""


class AccessControlledGradientAverager(AccessControlledAveragerMixin, GradientAverager):
    """hivemind ``GradientAverager`` that averages only with token holders (:class:`AccessControlledAveragerMixin`)."""


class AccessControlledTrainingStateAverager(AccessControlledAveragerMixin, TrainingStateAverager):
    """hivemind ``TrainingStateAverager`` that averages with and serves state only to token holders."""
