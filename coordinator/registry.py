"""Who may take part: challenges, registration, coordinator-signed access tokens, request authentication, bans.

A node proves it holds its Ed25519 key by signing a RegisterRequest that contains a fresh, single-use
nonce, and that it holds the libp2p key of the peer id it names by signing the nonce, its Ed25519 key and the
run with that key (:mod:`omi.protos.peer_ids`). A peer id is bound to the first identity that proves it and to
no other, ever (``peer_bindings``): two identities cannot share one peer id, and a banned node cannot come back
under a new Ed25519 key with its old libp2p identity. The node receives an AccessToken signed by the
coordinator. Every later request carries that token, a timestamp and the node's signature over the request.
"""

import logging
import secrets
import unicodedata
from collections.abc import Callable
from dataclasses import dataclass

from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PrivateKey
from omi.coordinator.config import RegistryConfig
from omi.coordinator.errors import (
    FailedPrecondition,
    InvalidArgument,
    PermissionDenied,
    ResourceExhausted,
    Unauthenticated,
)
from omi.coordinator.liveness import Beat, Liveness
from omi.coordinator.ratelimit import RateLimiter
from omi.coordinator.runs import Runs
from omi.coordinator.states import BanKind
from omi.coordinator.store import Ban, Node, PeerBinding, Store, Token
from omi.protos import pb, peer_ids, signing
from omi.protos.clock import now_ms
from sqlalchemy import delete, select
from sqlalchemy.exc import IntegrityError

logger = logging.getLogger(__name__)

MAX_PEER_ID = 128
MAX_DISPLAY_NAME = 64


def clean_display_name(name: str) -> str:
    """A display name as logs and the dashboard may show it: NFKC-normalised, without control, format (bidi
    overrides, zero-width) or unassigned characters, whitespace runs as one space.

    >>> clean_display_name("alice\\n2026-11-30 INFO banned node bob\\u202e  ")
    'alice 2026-11-30 INFO banned node bob'
    """
    kept = "".join(c if not unicodedata.category(c).startswith("C") else " "
                   for c in unicodedata.normalize("NFKC", name))
    return " ".join(kept.split())[:MAX_DISPLAY_NAME]
MAX_SWARM_KEY = 1024
MAX_CHALLENGES = 100_000


@dataclass(frozen=True)
class Caller:
    """A node whose request carried a valid token and signature."""

    node_id: str
    run_id: str
    peer_id: str
    public_key: bytes
    token: pb.AccessToken


class Registry:
    """Registration and authentication of nodes.

    :param store: the database
    :param key: the coordinator's Ed25519 key, which signs access tokens
    :param runs: the runs nodes register for
    :param liveness: registration counts as a first sign of life
    :param config: TTLs and rate limits
    :param clock: wall-clock milliseconds that challenges, tokens and request timestamps are judged by (tests pass
      one they move forward instead of sleeping past an expiry)
    """

    def __init__(self, store: Store, key: Ed25519PrivateKey, runs: Runs, liveness: Liveness,
                 config: RegistryConfig | None = None, *, clock: Callable[[], int] = now_ms):
        self.store, self.key, self.runs, self.liveness, self.clock = store, key, runs, liveness, clock
        self.config = config or RegistryConfig()
        self.public_key = signing.public_bytes(key)
        # Per process, never in the store: a challenge must be answered to the process that gave it (two
        # coordinator processes behind one address need sticky connections); rate limits count per process.
        self._challenges: dict[bytes, int] = {}  # nonce -> expires_at_ms
        self._node_limiter = RateLimiter(self.config.node_rate, self.config.node_burst)
        self._register_limiter = RateLimiter(self.config.register_rate, self.config.register_burst)
        # Serialized tokens whose coordinator signature checked out: a fact about the bytes, true in any process.
        self._verified_tokens: set[bytes] = set()
        # The bans table: this process's bans at once, other processes' at the next refresh_bans (every flush
        # interval), so a ban made by another coordinator process on the same database holds here within it.
        self._banned: set[str] = set()
        self.refresh_bans()
        # Nonces of accepted node requests, until their timestamp can no longer pass the skew check (per process:
        # two coordinator processes behind one address need sticky connections for this too, as for challenges).
        self._seen_nonces: dict[bytes, int] = {}  # nonce -> forget after (ms); insertion order = that order

    def refresh_bans(self) -> None:
        """Re-read the ban list from the store."""
        with self.store.session() as s:
            self._banned = set(s.scalars(select(Ban.node_id)))

    # ---------------------------------------------------------------- registration

    def challenge(self, source: str) -> pb.Challenge:
        """A fresh random nonce, valid for ``challenge_ttl`` seconds and for one registration."""
        self._limit_source(source)
        now = self.clock()
        if len(self._challenges) >= MAX_CHALLENGES:
            self._challenges = {n: t for n, t in self._challenges.items() if t > now}
            if len(self._challenges) >= MAX_CHALLENGES:
                raise ResourceExhausted("too many open challenges, try again shortly")
        nonce = secrets.token_bytes(32)
        expires = now + int(self.config.challenge_ttl * 1000)
        self._challenges[nonce] = expires
        return pb.Challenge(nonce=nonce, expires_at_ms=expires)

    def register(self, request: pb.RegisterRequest, source: str) -> pb.RegisterResponse:
        """Check the signed answer to a challenge; store the node and return its token and the RunSpec."""
        self._limit_source(source)
        expires = self._challenges.pop(request.nonce, None)  # single use, even if what follows fails
        if expires is None:
            raise Unauthenticated("unknown or already used challenge nonce")
        if expires < self.clock():
            raise Unauthenticated("challenge expired, ask for a new one")
        if len(request.public_key) != 32:
            raise InvalidArgument(f"public_key must be a raw 32-byte Ed25519 key, got {len(request.public_key)} bytes")
        if not signing.verify(request, request.public_key):
            raise Unauthenticated("bad signature on RegisterRequest")
        if not request.peer_id or len(request.peer_id) > MAX_PEER_ID:
            raise InvalidArgument(f"peer_id must have 1 to {MAX_PEER_ID} characters")
        try:
            proven = peer_ids.verify_binding(request.peer_public_key, request.peer_signature, request.nonce,
                                             request.public_key, request.run_id)
        except ValueError as e:
            raise Unauthenticated(f"no proof of the libp2p key of peer {request.peer_id}: {e}") from None
        if proven != request.peer_id:
            raise Unauthenticated(f"peer_id {request.peer_id} is not the peer id of peer_public_key ({proven})")
        if len(request.display_name) > MAX_DISPLAY_NAME:
            raise InvalidArgument(f"display_name has more than {MAX_DISPLAY_NAME} characters")
        display_name = clean_display_name(request.display_name)
        if len(request.swarm_public_key) > MAX_SWARM_KEY:
            raise InvalidArgument(f"swarm_public_key has more than {MAX_SWARM_KEY} bytes")
        node_id = signing.node_id(request.public_key)
        if node_id in self._banned:
            raise PermissionDenied(f"node {node_id[:12]} is banned", reason=pb.REFUSAL_BANNED)
        run = self.runs.get(request.run_id)
        if run.state == pb.RUN_STATE_STOPPED:
            raise FailedPrecondition(f"run '{request.run_id}' is stopped", reason=pb.REFUSAL_RUN_STOPPED)
        spec = self.runs.spec_for_nodes(request.run_id)  # before anything is stored: its swarm peer may be starting
        now = self.clock()
        try:
            with self.store.transaction() as s:
                self._bind_peer(s, request.peer_id, node_id, now)
                node = s.get(Node, node_id)
                if node is None:
                    s.add(Node(node_id=node_id, public_key=request.public_key, display_name=display_name,
                               strikes=0, created_at_ms=now))
                else:
                    node.display_name = display_name
                token = self._issue(s, node_id, request.run_id, request.peer_id, request.public_key,
                                    request.swarm_public_key, now)
        except IntegrityError:  # another coordinator process bound the peer id (or stored the node) meanwhile
            raise FailedPrecondition(f"peer {request.peer_id} was registered at the same time elsewhere; "
                                     "try again") from None
        self.liveness.beat(request.run_id, node_id, Beat(run.round, 0.0, 0, 0.0, now))
        logger.info("registered node %s (%s) for run %s", node_id[:12], display_name or "-", request.run_id)
        return pb.RegisterResponse(node_id=node_id, token=token, run_spec=spec)

    def _bind_peer(self, session, peer_id: str, node_id: str, now: int) -> None:
        """Bind ``peer_id`` to ``node_id``, or refuse it if another identity holds it (banned or not)."""
        binding = session.get(PeerBinding, peer_id)
        if binding is None:
            session.add(PeerBinding(peer_id=peer_id, node_id=node_id, bound_at_ms=now))
        elif binding.node_id != node_id:
            banned = binding.node_id in self._banned
            why = " (a banned node: a ban covers its libp2p identity too)" if banned else ""
            raise PermissionDenied(f"peer {peer_id} belongs to node {binding.node_id[:12]}{why}; one peer id, "
                                   "one identity", reason=pb.REFUSAL_BANNED if banned else pb.REFUSAL_UNSPECIFIED)

    def peers_of(self, node_ids) -> dict[str, list[str]]:
        """Node id -> the peer ids bound to it."""
        found: dict[str, list[str]] = {}
        with self.store.session() as s:
            for peer_id, node_id in s.execute(select(PeerBinding.peer_id, PeerBinding.node_id).where(
                    PeerBinding.node_id.in_(list(node_ids)))):
                found.setdefault(node_id, []).append(peer_id)
        return found

    def renew(self, request: pb.RenewTokenRequest) -> pb.AccessToken:
        """A new token for the same node, peer and run; refused to banned nodes and for stopped runs."""
        caller = self.authenticate(request, allow_expired=True)
        if self.runs.get(caller.run_id).state == pb.RUN_STATE_STOPPED:
            raise FailedPrecondition(f"run '{caller.run_id}' is stopped", reason=pb.REFUSAL_RUN_STOPPED)
        with self.store.transaction() as s:
            return self._issue(s, caller.node_id, caller.run_id, caller.peer_id, caller.public_key,
                               caller.token.swarm_public_key, self.clock())

    def _issue(self, session, node_id: str, run_id: str, peer_id: str, public_key: bytes, swarm_public_key: bytes,
               now: int) -> pb.AccessToken:
        ttl_ms = int(self.runs.get(run_id).spec.liveness.token_ttl * 1000)
        token = pb.AccessToken(node_id=node_id, peer_id=peer_id, run_id=run_id, issued_at_ms=now,
                               expires_at_ms=now + ttl_ms, node_public_key=public_key,
                               swarm_public_key=swarm_public_key)
        signing.sign(token, self.key)
        # the node's expired tokens of this run go: one row per renewal would grow without end
        session.execute(delete(Token).where(Token.node_id == node_id, Token.run_id == run_id,
                                            Token.expires_at_ms < now))
        session.add(Token(node_id=node_id, run_id=run_id, peer_id=peer_id, swarm_public_key=swarm_public_key,
                          issued_at_ms=now, expires_at_ms=token.expires_at_ms))
        return token

    def _limit_source(self, source: str) -> None:
        if not self._register_limiter.allow(source):
            raise ResourceExhausted(f"too many registration attempts from {source}, slow down")

    # ---------------------------------------------------------------- authentication

    def authenticate(self, request, *, allow_expired: bool = False) -> Caller:
        """Check the token, timestamp and node signature of a node's request; rate-limit the node.

        ``request`` is any message with ``token``, ``timestamp_ms`` and ``signature`` fields.
        """
        if not request.HasField("token"):
            raise Unauthenticated("missing access token")
        token = request.token
        now = self.clock()
        if abs(now - request.timestamp_ms) > self.config.max_clock_skew * 1000:
            raise Unauthenticated(f"stale timestamp: more than {self.config.max_clock_skew:g} s from the "
                                  "coordinator's clock")
        serialized = token.SerializeToString(deterministic=True)
        if serialized not in self._verified_tokens:
            if not signing.verify(token, self.public_key):
                raise Unauthenticated("access token not signed by this coordinator")
            if len(self._verified_tokens) > 200_000:
                self._verified_tokens.clear()
            self._verified_tokens.add(serialized)
        if token.expires_at_ms < now and not allow_expired:
            raise Unauthenticated("access token expired, renew it", reason=pb.REFUSAL_TOKEN_EXPIRED)
        if not signing.verify_request(request, token.node_public_key):
            raise Unauthenticated(f"bad request signature (a {type(request).__name__} signed for this RPC, with a "
                                  f"{signing.NONCE_BYTES}-byte nonce, is expected)")
        if token.node_id in self._banned:
            raise PermissionDenied(f"node {token.node_id[:12]} is banned", reason=pb.REFUSAL_BANNED)
        if not self._node_limiter.allow(token.node_id):
            raise ResourceExhausted(f"node {token.node_id[:12]} sends too many requests, slow down")
        self._accept_nonce(request.nonce, now)
        return Caller(token.node_id, token.run_id, token.peer_id, token.node_public_key, token)

    def _accept_nonce(self, nonce: bytes, now: int) -> None:
        """Refuse a request whose nonce was accepted before (a replay); remember this one while its timestamp
        could still pass the skew check. Bounded: each node's requests pass its rate limiter first."""
        while self._seen_nonces:
            oldest, forget_at = next(iter(self._seen_nonces.items()))
            if forget_at > now:
                break
            del self._seen_nonces[oldest]
        if nonce in self._seen_nonces:
            raise Unauthenticated("replayed request: this nonce was used before")
        self._seen_nonces[nonce] = now + 2 * int(self.config.max_clock_skew * 1000) + 1

    # ---------------------------------------------------------------- bans

    def is_banned(self, node_id: str) -> bool:
        return node_id in self._banned

    def ban(self, node_id: str, reason: str) -> bool:
        """An admin's ban of a node (it may be unknown yet); False if it was already banned."""
        with self.store.transaction() as s:
            changed = self.ban_in(s, node_id, reason, BanKind.ADMIN)
        if changed:
            self._banned.add(node_id)
        return changed

    def ban_in(self, session, node_id: str, reason: str, kind: BanKind) -> bool:
        """Ban inside the caller's transaction; call ``banned_committed`` once it is committed."""
        if len(node_id) != 64:
            raise InvalidArgument("node_id must be 64 hex characters")
        if session.get(Ban, node_id) is not None:
            return False
        session.add(Ban(node_id=node_id, reason=reason, kind=kind, created_at_ms=self.clock()))
        logger.warning("banned node %s: %s", node_id[:12], reason or "no reason given")
        return True

    def banned_committed(self, node_id: str) -> None:
        self._banned.add(node_id)

    def unbanned_committed(self, node_id: str) -> None:
        self._banned.discard(node_id)

    def unban(self, node_id: str) -> bool:
        """Lift a ban (and clear the node's strikes); False if the node was not banned."""
        with self.store.transaction() as s:
            ban = s.get(Ban, node_id)
            if ban is None:
                return False
            s.delete(ban)
            node = s.get(Node, node_id)
            if node is not None:
                node.strikes = 0
        self._banned.discard(node_id)
        logger.info("unbanned node %s", node_id[:12])
        return True
