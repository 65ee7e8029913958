"""The coordinator's hivemind bootstrap peers: one token-gated DHT peer per run, whose addresses go into the RunSpec.

Volunteers join a run's swarm through the ``initial_peers`` of the RunSpec they receive at registration; the
coordinator is such a peer itself (it never trains and is never on the gradient path). hivemind forks the DHT
from the thread that creates it and must be created in the main thread: the grpc.aio handlers that ask for
the peers run in the server's event loop, which ``serve()`` runs in the main thread.
"""

import logging
from pathlib import Path

import hivemind
from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PrivateKey
from omi.protos import pb
from omi.swarm.dht import start_bootstrap_dht

logger = logging.getLogger(__name__)


class SwarmBootstrap:
    """Starts a run's bootstrap peer on first need and keeps it until shutdown.

    :param key: the coordinator's Ed25519 key (the peer mints its own access token with it)
    :param state_dir: the peer's libp2p identity and RSA key live in ``state_dir/swarm/<run id>/``, so its
      peer id (and so the RunSpec's initial peers, up to the port) stays the same across restarts
    :param host: address the peers listen on (volunteers must be able to reach it)
    """

    def __init__(self, key: Ed25519PrivateKey, state_dir: str | Path, host: str = "127.0.0.1"):
        self.key, self.state_dir, self.host = key, Path(state_dir), host
        self._peers: dict[str, tuple[hivemind.DHT, list[str]]] = {}

    def initial_peers(self, spec: pb.RunSpec) -> list[str]:
        """Multiaddrs of the run's bootstrap peer, starting it if it is not running yet."""
        if spec.run_id not in self._peers:
            folder = self.state_dir / "swarm" / spec.run_id
            folder.mkdir(parents=True, exist_ok=True)
            dht, maddrs = start_bootstrap_dht(self.key, spec, host=self.host, identity_path=str(folder / "p2p.id"),
                                              swarm_key_path=str(folder / "swarm_rsa.pem"),
                                              token_ttl=spec.liveness.token_ttl)
            self._peers[spec.run_id] = (dht, maddrs)
            logger.info("run %s: swarm bootstrap peer on %s", spec.run_id, ", ".join(maddrs))
        return list(self._peers[spec.run_id][1])

    def shutdown(self) -> None:
        for run_id, (dht, _) in self._peers.items():
            dht.shutdown()
            logger.info("run %s: swarm bootstrap peer stopped", run_id)
        self._peers.clear()
