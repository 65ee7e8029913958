"""Starting a run's DHT peers: a volunteer's (:func:`start_dht`), the coordinator's bootstrap peer, any peer.

Every DHT peer of a run carries the token authorizer (:mod:`omi.swarm.tokens`) and the token registry validator
(:mod:`omi.swarm.access`), publishes its own token in the registry, and ends with the process that started it.
"""

from __future__ import annotations

import asyncio
import concurrent.futures
import functools
import gc
import logging
import multiprocessing as mp
import os
import signal
import tempfile
import time
from collections.abc import Sequence

import hivemind
from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PrivateKey
from hivemind.p2p import P2PDaemonError
from hivemind.utils.crypto import RSAPrivateKey
from omi.protos import pb, signing
from omi.protos.tokens import TokenProvider, is_valid_access_token
from omi.swarm.access import (
    RevocationValidator,
    TokenRegistryValidator,
    start_revocation_watch,
    start_token_publisher,
)
from omi.swarm.keys import generated_here, load_or_create_peer_identity, load_or_create_swarm_key, swarm_public_key
from omi.swarm.lifetime import end_with_parent
from omi.swarm.tokens import AccessDenied, CoordinatorTokenAuthorizer, MintingTokenProvider

logger = logging.getLogger(__name__)

DHT_START_TIMEOUT = 180.0  # seconds a DHT process may take to come up (its libp2p daemon too) on a loaded machine
# hivemind joins the initial peers with one ping each, lost after its wait_timeout (3 s): a busy bootstrap peer or a
# slow link misses it now and then (seen: a volunteer started beside three others on a loaded machine exited)
DHT_START_TRIES = 3
DHT_START_BACKOFF = 2.0  # seconds before the second try; each later one waits that much longer


class _DHT(hivemind.DHT):
    """``hivemind.DHT`` whose process gets SIGKILL from the kernel when the process that started it dies, even while
    it is still starting (:func:`exit_with_parent`, the graceful way, runs only once the DHT is up); its libp2p
    daemon ends by itself when the DHT process's connection to it closes."""

    def run(self) -> None:
        # hivemind.DHT.run, preceded by end_with_parent
        end_with_parent(mp.parent_process().pid)
        super().run()


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



def _start(dht: hivemind.DHT, timeout: float = DHT_START_TIMEOUT) -> None:
    """Fork ``dht``'s process and wait until it serves; a process that dies while starting, or does not come up in
    ``timeout`` seconds, is a clear error here rather than a wait without end (hivemind waits with no bound).

    Garbage is collected before the fork: gRPC objects do not survive a fork, and a cycle holding one (a finished
    coordinator call) collected in the child crashed it (seen in the test suite: a segfault in the child's garbage
    collection, after gRPC servers and channels had run in the parent)."""
    gc.collect()
    dht.run_in_background(await_ready=False)
    deadline = time.monotonic() + timeout
    while True:
        try:
            dht.wait_until_ready(timeout=1.0)
            return
        except concurrent.futures.TimeoutError:
            if not dht.is_alive() or time.monotonic() > deadline:
                code = dht.exitcode
                dht.terminate()
                raise RuntimeError(f"the DHT process did not start (exit code {code})" if code is not None else
                                   f"the DHT process did not start within {timeout:.0f} s") from None


def make_dht(spec: pb.RunSpec, token_provider: TokenProvider, swarm_key: RSAPrivateKey, *,
             initial_peers: Sequence[str] = (), identity_path: str | None = None, host: str = "127.0.0.1",
             port: int = 0, client_mode: bool = False, announce_host: str | None = None,
             publish_token: bool = True) -> hivemind.DHT:
    """Start a hivemind DHT peer of ``spec``'s run with the token authorizer and the token registry validator."""
    if announce_host is not None and port == 0:
        raise ValueError("announce_host needs an explicit port (libp2p cannot announce port 0)")
    authorizer = CoordinatorTokenAuthorizer(token_provider, spec.coordinator_public_key, spec.run_id, swarm_key)
    validators = [TokenRegistryValidator(spec.coordinator_public_key, spec.run_id, spec.dht_prefix),
                  RevocationValidator(spec.coordinator_public_key, spec.run_id, spec.dht_prefix)]
    dht = _DHT(
        initial_peers=list(initial_peers) or None, start=False, client_mode=client_mode, authorizer=authorizer,
        record_validators=validators, identity_path=identity_path,
        # an identity generated by this process is free: hivemind's check would start another libp2p daemon
        check_if_identity_free=identity_path is None or not generated_here(identity_path),
        host_maddrs=[f"/ip4/{host}/tcp/{port}"],
        announce_maddrs=[f"/ip4/{announce_host}/tcp/{port}"] if announce_host else None,
    )
    _start(dht)
    exit_with_parent(dht)
    start_revocation_watch(dht, spec)
    if publish_token:
        start_token_publisher(dht, spec.dht_prefix)
    return dht



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



def start_dht(spec: pb.RunSpec, token_provider: TokenProvider, *, swarm_key: RSAPrivateKey,
              identity_path: str | os.PathLike | None = None, host: str = "127.0.0.1", port: int = 0,
              client_mode: bool = False, announce_host: str | None = None) -> hivemind.DHT:
    """Start this node's DHT peer of ``spec``'s run, joined to ``spec.initial_peers``, with the token authorizer.

    :param spec: the RunSpec (``coordinator_public_key``, ``run_id``, ``dht_prefix``, ``initial_peers`` are used)
    :param token_provider: returns the node's current coordinator-signed token; called in the DHT process, so
      renewals must reach it across processes (use :class:`omi.protos.tokens.TokenFile`)
    :param swarm_key: the RSA key bound in the token as ``swarm_public_key``; signs every DHT request
    :param identity_path: libp2p private key file: a stable peer id across restarts (created if missing)
    :param host: address to listen on
    :param port: TCP port to listen on (0: any free port)
    :param client_mode: for volunteers behind NAT: make outgoing connections only, serve no RPCs
    :param announce_host: the address other peers should dial (needs an explicit ``port``)
    :returns: a started ``hivemind.DHT``; it re-publishes the node's token in the run's token registry
    :raises AccessDenied: if the provider's token is not valid now (a banned node cannot renew it)
    :raises RuntimeError: if no initial peer answered in ``DHT_START_TRIES`` tries (P2PDaemonError: none reachable)
    """
    if not spec.dht_prefix or "." in spec.dht_prefix:
        raise ValueError(f"RunSpec.dht_prefix must be non-empty and without '.', got {spec.dht_prefix!r}")
    token = token_provider()
    if not is_valid_access_token(token, spec.coordinator_public_key, spec.run_id,
                                 swarm_public_key=swarm_public_key(swarm_key)):
        # every peer would refuse us; say why instead of hivemind's "bootstrap failed"
        raise AccessDenied(f"the access token of node {token.node_id or '?'} is not valid for run {spec.run_id!r} "
                           "(expired, of another run, or not bound to this swarm key): renew it first")
    start = functools.partial(make_dht, spec, token_provider, swarm_key, initial_peers=list(spec.initial_peers),
                              identity_path=None if identity_path is None else str(identity_path), host=host,
                              port=port, client_mode=client_mode, announce_host=announce_host)
    for attempt in range(1, DHT_START_TRIES):
        try:
            return start()
        except (RuntimeError, P2PDaemonError) as e:  # no initial peer answered (or reachable), or no DHT process
            logger.warning("the DHT peer did not start (%s); trying again in %.0f s (try %d of %d)", e,
                           DHT_START_BACKOFF * attempt, attempt + 1, DHT_START_TRIES)
            time.sleep(DHT_START_BACKOFF * attempt)
    return start()  # the last try: its error is the caller's

