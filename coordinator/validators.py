"""The coordinator's built-in validator: one ``omi-node validate --token-file`` process per running run.

The coordinator trusts its own validator, so it does not register it: it mints the validator's access token
itself (like the bootstrap peer's) for a key pair kept under ``state_dir/validator/<run id>/``, writes it to
``token.bin`` there and starts the process, which follows the run's swarm and takes audit tasks over gRPC. It is
not a volunteer: it sends no heartbeats and gets no work. hivemind must be created in the main thread of a process,
and the coordinator's main thread runs the asyncio server, so the validator is a separate process, kept running by
:class:`omi.coordinator.supervisor.RunProcesses` (restarted if it dies, stopped with the coordinator).
"""

import logging
import sys
from pathlib import Path

from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PrivateKey
from omi.coordinator.supervisor import Launch, RunProcesses
from omi.protos import pb, signing
from omi.protos.tokens import TokenFile, mint_access_token
from omi.swarm.keys import load_or_create_peer_identity, load_or_create_swarm_key, swarm_public_key

logger = logging.getLogger(__name__)

TOKEN_TTL = 30 * 24 * 3600.0  # seconds; the coordinator mints a fresh one at every start of the process


class BuiltinValidators:
    """Starts the built-in validator processes and stops them with the coordinator.

    :param key: the coordinator's Ed25519 key (signs the validators' tokens)
    :param state_dir: the coordinator's state dir; each run's validator keeps its keys under ``validator/<run>/``
    """

    def __init__(self, key: Ed25519PrivateKey, state_dir: str | Path):
        self.key, self.state_dir = key, Path(state_dir)
        self._runs: dict[str, tuple[pb.RunSpec, str]] = {}  # run id -> its spec, the coordinator's gRPC address
        self.processes = RunProcesses("built-in validator", self._launch, grace=20.0)

    def start(self, spec: pb.RunSpec, coordinator_address: str) -> str | None:
        """Start the run's validator process (once per run; restarted if it dies); returns the validator's node id
        (None if it runs already), which the coordinator grants the validator role."""
        if spec.run_id in self._runs:
            return None
        node_key = signing.load_or_create_key(self._folder(spec.run_id) / "node_key.pem")
        self._runs[spec.run_id] = spec, coordinator_address
        try:
            self.processes.start(spec.run_id)
        except Exception:  # the run's validator stays wanted: the supervisor tries again
            logger.exception("run %s: starting the built-in validator failed; retrying", spec.run_id)
        return signing.node_id(signing.public_bytes(node_key))

    def _folder(self, run_id: str) -> Path:
        folder = self.state_dir / "validator" / run_id
        folder.mkdir(parents=True, exist_ok=True)
        return folder

    def _launch(self, run_id: str) -> Launch:
        """Mint the run's validator token and say how to start its process."""
        spec, coordinator_address = self._runs[run_id]
        folder = self._folder(run_id)
        node_key = signing.load_or_create_key(folder / "node_key.pem")
        peer_id = load_or_create_peer_identity(folder / "p2p.id")
        swarm_key = load_or_create_swarm_key(folder / "swarm_rsa.pem")
        token = mint_access_token(self.key, run_id=spec.run_id, peer_id=peer_id,
                                  swarm_public_key=swarm_public_key(swarm_key),
                                  node_public_key=signing.public_bytes(node_key), ttl=TOKEN_TTL)
        TokenFile(folder / "token.bin").write(token)
        command = [str(Path(sys.executable).parent / "omi-node"), "validate", "--coordinator", coordinator_address,
                   "--state-dir", str(folder), "--token-file", str(folder / "token.bin"), "--threads", "1"]
        return Launch(command, log=folder / "validator.log")

    def shutdown(self) -> None:
        self.processes.shutdown()
