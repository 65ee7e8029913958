"""The coordinator's built-in validator: one ``omi-node validate --token-file`` process per running run.

The coordinator trusts its own validator, so it does not register it: it mints the validator's access token
itself (like the bootstrap peer's) for a key pair kept under ``state_dir/validator/<run id>/``, writes it to
``token.bin`` there and starts the process, which follows the run's swarm and takes audit tasks over gRPC. It is
not a volunteer: it sends no heartbeats and gets no work. hivemind must be created in the main thread of a process,
and the coordinator's main thread runs the asyncio server, so the validator is a separate process (its own
session; stopped with the coordinator).
"""

import logging
import os
import signal
import subprocess
import sys
from pathlib import Path

from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PrivateKey
from omi.protos import pb, signing
from omi.protos.tokens import TokenFile, mint_access_token
from omi.swarm.keys import load_or_create_peer_identity, load_or_create_swarm_key, swarm_public_key
from omi.swarm.lifetime import signal_when_parent_dies

logger = logging.getLogger(__name__)

TOKEN_TTL = 30 * 24 * 3600.0  # seconds; the coordinator mints a fresh one at every start


class BuiltinValidators:
    """Starts and stops the built-in validator processes.

    :param key: the coordinator's Ed25519 key (signs the validators' tokens)
    :param state_dir: the coordinator's state dir; each run's validator keeps its keys under ``validator/<run>/``
    """

    def __init__(self, key: Ed25519PrivateKey, state_dir: str | Path):
        self.key, self.state_dir = key, Path(state_dir)
        self._processes: dict[str, subprocess.Popen] = {}

    def start(self, spec: pb.RunSpec, coordinator_address: str) -> str | None:
        """Mint the run's validator token and start its process (once per run); returns the validator's node id
        (None if it runs already), which the coordinator grants the validator role."""
        if spec.run_id in self._processes:
            return None
        folder = self.state_dir / "validator" / spec.run_id
        folder.mkdir(parents=True, exist_ok=True)
        node_key = signing.load_or_create_key(folder / "node_key.pem")
        peer_id = load_or_create_peer_identity(folder / "p2p.id")
        swarm_key = load_or_create_swarm_key(folder / "swarm_rsa.pem")
        token = mint_access_token(self.key, run_id=spec.run_id, peer_id=peer_id,
                                  swarm_public_key=swarm_public_key(swarm_key),
                                  node_public_key=signing.public_bytes(node_key), ttl=TOKEN_TTL)
        TokenFile(folder / "token.bin").write(token)
        log = open(folder / "validator.log", "ab")  # noqa: SIM115 - the child writes to it until it stops
        command = [str(Path(sys.executable).parent / "omi-node"), "validate", "--coordinator", coordinator_address,
                   "--state-dir", str(folder), "--token-file", str(folder / "token.bin"), "--threads", "1"]
        self._processes[spec.run_id] = subprocess.Popen(command, stdout=log, stderr=subprocess.STDOUT,
                                                        start_new_session=True,
                                                        # SIGTERM when the coordinator dies, even by SIGKILL
                                                        preexec_fn=lambda: signal_when_parent_dies(signal.SIGTERM))
        log.close()
        logger.info("run %s: built-in validator %s started (log %s)", spec.run_id, token.node_id[:12],
                    folder / "validator.log")
        return token.node_id

    def shutdown(self, timeout: float = 20.0) -> None:
        for run_id, process in self._processes.items():
            if process.poll() is None:
                process.send_signal(signal.SIGTERM)
                try:
                    process.wait(timeout)
                except subprocess.TimeoutExpired:
                    os.killpg(process.pid, signal.SIGKILL)
                    process.wait()
            logger.info("run %s: built-in validator stopped", run_id)
        self._processes.clear()
