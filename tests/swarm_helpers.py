"""Swarm test helpers: a test run's tokens and peer files, in-process DHT peers, peer processes and swarms of them.

A peer process is a whole peer (hivemind forks its DHT and averagers from the main thread); the test process
talks to it through files: a peer writes ``ready.json`` once its DHT is up and ``result.json`` when done,
and stops when its stdin is closed.

    python tests/swarm_helpers.py bootstrap CONFIG.json
    python tests/swarm_helpers.py trainer CONFIG.json
"""

from __future__ import annotations

import json
import logging
import os
import subprocess
import sys
import time
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path

from omi import swarm
from omi.protos import pb, signing

logger = logging.getLogger(__name__)

HERE = Path(__file__).resolve().parent
RUN_ID = "swarmtest"


def make_spec(coordinator_key, *, run_id: str = RUN_ID, reducer: str = "mean", matchmaking_time: float = 2.0,
              averaging_timeout: float = 8.0, learning_rate: float = 0.01, clip_tau: float = 1.0,
              clip_iterations: int = 5, initial_peers: tuple[str, ...] = (), inner_steps: int = 5,
              overlap: bool = False, round_compression: str = "none", topk_density: float = 1.0,
              max_round_seconds: float = 0.0, outer_learning_rate: float = 0.7, outer_momentum: float = 0.9,
              outer_nesterov: bool = True) -> pb.RunSpec:
    """A RunSpec of a tiny test run in rounds of ``inner_steps`` (the settings the swarm layer reads)."""
    return pb.RunSpec(
        rounds=pb.RoundsSpec(inner_steps=inner_steps, outer_learning_rate=outer_learning_rate,
                             outer_momentum=outer_momentum, outer_nesterov=outer_nesterov, overlap=overlap,
                             compression=round_compression, topk_density=topk_density,
                             max_round_seconds=max_round_seconds),
        run_id=run_id, dht_prefix=f"{run_id}_v1", model="tiny-mlp",
        coordinator_public_key=signing.public_bytes(coordinator_key), initial_peers=list(initial_peers),
        training=pb.TrainingSpec(learning_rate=learning_rate, micro_batch_size=8),
        averaging=pb.AveragingSpec(matchmaking_time=matchmaking_time, averaging_timeout=averaging_timeout,
                                   reducer=reducer, clip_tau=clip_tau, clip_iterations=clip_iterations),
    )


@dataclass
class PeerFiles:
    """Everything a peer keeps on disk: libp2p identity, swarm RSA key, token file; and its peer id."""

    identity_path: str
    swarm_key_path: str
    token_path: str
    peer_id: str


def make_peer_files(directory: Path, coordinator_key, spec: pb.RunSpec, *, ttl: float = 600.0,
                    token_peer_id: str | None = None, expired: bool = False) -> PeerFiles:
    """Create a peer's identity and swarm key and write a coordinator-signed token for it.

    :param token_peer_id: bind the token to this peer id instead of the peer's own (a token of someone else)
    :param expired: issue a token that expired a minute ago
    """
    directory.mkdir(parents=True, exist_ok=True)
    identity_path, key_path = str(directory / "p2p.id"), str(directory / "swarm_rsa.pem")
    peer_id = swarm.load_or_create_peer_identity(identity_path)
    swarm_key = swarm.load_or_create_swarm_key(key_path)
    now = time.time() - (ttl + 60 if expired else 0)
    token = swarm.mint_access_token(
        coordinator_key, run_id=spec.run_id, peer_id=token_peer_id or peer_id,
        swarm_public_key=swarm.swarm_public_key(swarm_key),
        node_public_key=signing.public_bytes(signing.generate_key()), ttl=ttl, now=now)
    token_path = str(directory / "token.bin")
    swarm.TokenFile(token_path).write(token)
    return PeerFiles(identity_path, key_path, token_path, peer_id)


class PeerProcess:
    """A peer running ``swarm_helpers.py ROLE CONFIG`` in a subprocess; ``stop()`` always reaps it."""

    def __init__(self, role: str, directory: Path, **config):
        self.directory = directory
        directory.mkdir(parents=True, exist_ok=True)
        self.ready_path, self.result_path = directory / "ready.json", directory / "result.json"
        config.update(ready_path=str(self.ready_path), result_path=str(self.result_path))
        config_path = directory / f"{role}.json"
        config_path.write_text(json.dumps(config))
        self.log = open(directory / f"{role}.log", "wb")
        env = dict(os.environ, OMP_NUM_THREADS="1", PYTHONUNBUFFERED="1")
        from processes import zygote  # forked from the pre-imported zygote (tests/zygote.py)

        read_end, write_end = os.pipe()
        try:
            self.proc = zygote().spawn("swarm_helpers:main", [str(HERE / "swarm_helpers.py"), role, str(config_path)],
                                       stdin=read_end, stdout=self.log.fileno(), stderr=self.log.fileno(), env=env,
                                       cwd=str(HERE))
        finally:
            os.close(read_end)
        self.stdin = os.fdopen(write_end, "wb")  # closed: the peer stops

    def wait_ready(self, timeout: float = 60.0) -> dict:
        return self._wait_file(self.ready_path, timeout)

    def wait_result(self, timeout: float) -> dict:
        return self._wait_file(self.result_path, timeout)

    def _wait_file(self, path: Path, timeout: float) -> dict:
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            if path.exists():
                return json.loads(path.read_text())
            if self.proc.poll() is not None:
                raise RuntimeError(f"peer exited with {self.proc.returncode} before writing {path.name}:\n"
                                   + self.tail())
            time.sleep(0.1)
        raise TimeoutError(f"no {path.name} after {timeout}s:\n{self.tail()}")

    def tail(self, lines: int = 40) -> str:
        self.log.flush()
        text = (self.directory / Path(self.log.name).name).read_text(errors="replace")
        return "\n".join(text.splitlines()[-lines:])

    def stop(self, timeout: float = 20.0) -> None:
        if self.proc.poll() is None:
            try:
                self.stdin.close()
                self.proc.wait(timeout)
            except (subprocess.TimeoutExpired, BrokenPipeError):
                self.proc.kill()
                self.proc.wait(10)
        self.log.close()


def start_swarm(directory: Path, coordinator_key, spec: pb.RunSpec, trainers: list[dict],
                witness: bool = False) -> tuple[list[PeerProcess], list[PeerFiles]]:
    """A bootstrap peer and one trainer process per dict in ``trainers``; returns [bootstrap, *trainers] and files
    (with ``witness``, the coordinator's round witness last: [bootstrap, *trainers, witness]).

    Each dict is the trainer's extra config (see ``run_trainer``), plus ``token_peer_id`` (its token names another
    peer) and ``intruder`` (the honest trainers do not wait for it to show up).
    """
    signing.save_key(coordinator_key, directory / "coordinator.pem")
    (directory / "spec.bin").write_bytes(spec.SerializeToString())
    procs = [PeerProcess("bootstrap", directory / "bootstrap", coordinator_key_path=str(directory / "coordinator.pem"),
                         spec_path=str(directory / "spec.bin"))]
    files = []
    maddrs = procs[0].wait_ready()["maddrs"]
    if witness:  # up before the trainers, as the coordinator's is
        f = make_peer_files(directory / "witness", coordinator_key, spec)
        watcher = PeerProcess("witness", directory / "witness", spec_path=str(directory / "spec.bin"),
                              token_path=f.token_path, identity_path=f.identity_path,
                              swarm_key_path=f.swarm_key_path, initial_peers=maddrs)
        watcher.wait_ready()
    for i, extra in enumerate(trainers):
        files.append(make_peer_files(directory / f"peer{i}", coordinator_key, spec,
                                     token_peer_id=extra.pop("token_peer_id", None)))
    honest_ids = [f.peer_id for f, extra in zip(files, trainers, strict=True) if not extra.get("intruder")]
    for i, (f, extra) in enumerate(zip(files, trainers, strict=True)):
        extra.pop("intruder", None)
        procs.append(PeerProcess("trainer", directory / f"peer{i}", spec_path=str(directory / "spec.bin"),
                                 token_path=f.token_path, identity_path=f.identity_path,
                                 swarm_key_path=f.swarm_key_path, initial_peers=maddrs, seed=i,
                                 expected_peers=len(honest_ids), trainer_peer_ids=honest_ids, **extra))
    if witness:
        procs.append(watcher)
    return procs, files


@contextmanager
def dht_peers(coordinator_key, directory: Path, count: int = 2):
    """A bootstrap DHT peer (the coordinator's) and ``count`` token-holding peers, in DHT processes of this process.

    Yields ``(spec, bootstrap, peers)``; every peer is shut down on exit.
    """
    spec = make_spec(coordinator_key)
    bootstrap, maddrs = swarm.start_bootstrap_dht(coordinator_key, spec)
    spec.initial_peers.extend(maddrs)
    peers = []
    try:
        for i in range(count):
            files = make_peer_files(directory / f"peer{i}", coordinator_key, spec)
            peers.append(swarm.start_dht(spec, swarm.TokenFile(files.token_path),
                                         swarm_key=swarm.load_or_create_swarm_key(files.swarm_key_path),
                                         identity_path=files.identity_path))
        yield spec, bootstrap, peers
    finally:
        for dht in peers + [bootstrap]:
            dht.shutdown()


def _write_json(path: str, data: dict) -> None:
    tmp = path + ".tmp"
    Path(tmp).write_text(json.dumps(data))
    os.replace(tmp, path)


# ---------------------------------------------------------------- peer entry points (subprocesses)


def run_bootstrap(config: dict) -> None:
    """A coordinator's bootstrap DHT peer; writes its multiaddrs, serves until stdin closes."""
    coordinator_key = signing.load_key(config["coordinator_key_path"])
    spec = pb.RunSpec.FromString(Path(config["spec_path"]).read_bytes())
    dht, maddrs = swarm.start_bootstrap_dht(coordinator_key, spec, identity_path=config.get("identity_path"))
    _write_json(config["ready_path"], dict(maddrs=maddrs, peer_id=dht.peer_id.to_base58()))
    try:
        sys.stdin.read()
    finally:
        dht.shutdown()


def tiny_model():
    import torch

    torch.manual_seed(0)  # every peer starts from the same parameters
    return torch.nn.Sequential(torch.nn.Linear(16, 32), torch.nn.Tanh(), torch.nn.Linear(32, 1))


def regression_batch(generator, batch_size: int):
    """Samples of y = <w, x> with one fixed w for every peer (a task all peers agree on)."""
    import torch

    w = torch.linspace(-1, 1, 16)
    x = torch.randn(batch_size, 16, generator=generator)
    return x, (x @ w).unsqueeze(1)


def _trainer_peer(config: dict):
    """A trainer's RunSpec (with the test's initial peers) and its DHT peer, from its config."""
    spec = pb.RunSpec.FromString(Path(config["spec_path"]).read_bytes())
    spec.initial_peers[:] = config["initial_peers"]
    dht = swarm.start_dht(spec, swarm.TokenFile(config["token_path"]),
                          swarm_key=swarm.load_or_create_swarm_key(config["swarm_key_path"]),
                          identity_path=config["identity_path"])
    return spec, dht


def _wait_for_trainers(dht, spec: pb.RunSpec, config: dict) -> None:
    """Wait until the other trainers published their tokens (they are up), so the first rounds are less often
    stepped alone; the progress tracker sees a peer only after that peer reported samples."""
    registry_key, expected = swarm.token_registry_key(spec.dht_prefix), config.get("expected_peers", 1)
    deadline = time.monotonic() + config.get("wait_peers_timeout", 30.0)
    while time.monotonic() < deadline:
        found = dht.get(registry_key, latest=True)
        if found is not None and len(set(found.value) & set(config.get("trainer_peer_ids", []))) >= expected:
            return
        time.sleep(0.2)


def _confirmed_hash(path: str, round_number: int, timeout: float) -> str:
    """The θ hash a witness's result file confirms for ``round_number`` ('' if none within ``timeout``; 0: one look;
    '' at once if the witness holds that round unconfirmed, as the node stops waiting once the run's round is there)."""
    deadline = time.monotonic() + timeout
    while True:
        try:
            held = json.loads(Path(path).read_text())["rounds"]
        except (OSError, ValueError, KeyError):
            held = []
        entries = [entry for entry in held if entry["round"] == round_number]
        confirmed = [entry["state_hash"] for entry in entries if entry["confirmed"]]
        if confirmed or entries:
            return confirmed[0] if confirmed else ""
        if time.monotonic() >= deadline:
            return ""
        time.sleep(0.2)


def run_trainer(config: dict) -> None:
    """Train ``tiny_model`` with RoundOptimizer until round ``rounds``; report each round's θ hash and group size.

    ``start_delay`` seconds before joining makes a late joiner (it loads the state from the others).
    ``delta_scale`` != 1 makes an attacker: before each round's end it moves its parameters so that its
    pseudo-gradient θ_r − θ_local is ``delta_scale`` times the one it trained (-1000: a x-1000 sign-flipper).
    ``forge_state`` makes another: it trains honestly but serves late joiners a θ shifted by 1, announcing the top
    priority. ``witness_file`` (a witness's result file) stands in for the coordinator's published hashes: each
    round starts with ``check_state`` against the hash the witness confirmed for it, as every node's does.
    """
    import hashlib

    import torch
    from omi.swarm.rounds import RoundOptimizer

    torch.set_num_threads(1)
    time.sleep(config.get("start_delay", 0.0))
    spec, dht = _trainer_peer(config)
    model = tiny_model()
    opt = RoundOptimizer(model, spec, dht)
    if config.get("forge_state"):
        honest_state = opt.averager._state
        opt.averager._state = lambda: (lambda meta, tensors: (meta, [tensors[0] + 1.0, *tensors[1:]]))(*honest_state())
    _write_json(config["ready_path"], dict(peer_id=dht.peer_id.to_base58(),
                                           maddrs=[str(m) for m in dht.get_visible_maddrs()]))
    if not config.get("start_delay"):
        _wait_for_trainers(dht, spec, config)
    generator = torch.Generator().manual_seed(config.get("seed", 0))
    eval_x, eval_y = regression_batch(torch.Generator().manual_seed(12345), 256)
    batch_size, rounds, log = spec.training.micro_batch_size, [], []
    deadline = time.monotonic() + config.get("train_timeout", 90.0)

    def theta_hash() -> str:
        return hashlib.sha256(b"".join(p.numpy().tobytes() for p in opt.global_params)).hexdigest()

    while opt.round < config["rounds"] and time.monotonic() < deadline:
        started = opt.begin_round()
        for _ in range(2):  # as the node's trainer does: a refused θ is not trained from, the swarm's newest is checked
            if not config.get("witness_file"):
                break
            # a θ loaded from a peer waits for the round's published hash (node.trainer: _await_witnessed)
            wait = 2 * spec.averaging.matchmaking_time if opt.holds_served_state else 0.0
            if opt.check_state(_confirmed_hash(config["witness_file"], started, wait)):
                break
            started = opt.begin_round()
        if config.get("forge_state"):
            opt.averager.state_sharing_priority = 1e9
        log.append(dict(round=started, start_hash=theta_hash()))
        while not opt.round_closed() and time.monotonic() < deadline:
            x, y = regression_batch(generator, batch_size)
            torch.nn.functional.mse_loss(model(x), y).backward()
            opt.inner_step(batch_size)
            opt.zero_grad()
            time.sleep(config.get("step_sleep", 0.3))  # stands in for a real model's compute
        if config.get("delta_scale", 1.0) != 1.0:
            with torch.no_grad():
                for p, start in zip(model.parameters(), opt.global_params, strict=True):
                    p.copy_(start - config["delta_scale"] * (start - p))
        result = opt.end_round()
        if config.get("forge_state"):
            opt.averager.state_sharing_priority = 1e9  # end_round announced the honest priority again
        with torch.no_grad():
            loss = torch.nn.functional.mse_loss(model(eval_x), eval_y).item()
        # group_size: the trainers the group gathered (what the outer step decided on); exchanged: the senders whose
        # parts this peer's last all-reduce really reduced, itself included (an intruder's group may gather three,
        # but honest members refuse it before any tensor moves)
        rounds.append(dict(round=result.round, group_size=result.group_size, applied=result.applied,
                           exchanged=opt.averager.last_group_size,
                           inner_steps=result.inner_steps, bytes_sent=result.bytes_sent, end_hash=theta_hash(),
                           loss=loss))
    _write_json(config["result_path"], dict(rounds=rounds, starts=log, state_loads=opt.state_loads,
                                            bytes_sent=opt.averager.bytes_sent,
                                            rounds_averaged=opt.averager.rounds_averaged))
    try:
        sys.stdin.read()  # serve the state to late joiners until the test is done
    finally:
        opt.shutdown()
        dht.shutdown()


def run_witness(config: dict) -> None:
    """The coordinator's witness of a rounds run (omi.swarm.witness) beside the trainers; after every round it saw
    it rewrites the result file with everything it held so far, until stdin closes."""
    import dataclasses
    import threading

    import torch
    from omi.swarm.witness import RoundWitness

    torch.set_num_threads(1)
    spec, dht = _trainer_peer(config)
    witness = RoundWitness(dht, spec, tiny_model())
    _write_json(config["ready_path"], dict(peer_id=dht.peer_id.to_base58()))
    stop, seen = threading.Event(), []
    threading.Thread(target=lambda: (sys.stdin.read(), stop.set()), daemon=True).start()
    try:
        while not stop.is_set():
            held = witness.follow_round(stop)
            if held is not None:
                seen.append(dataclasses.asdict(held))
                _write_json(config["result_path"], dict(rounds=seen))
    finally:
        witness.shutdown()
        dht.shutdown()


def main() -> None:
    """``swarm_helpers.py ROLE CONFIG``: run one peer of a test swarm (as :class:`PeerProcess` starts it)."""
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(process)d %(name)s %(levelname)s %(message)s")
    role, config_path = sys.argv[1], sys.argv[2]
    roles = {"bootstrap": run_bootstrap, "trainer": run_trainer, "witness": run_witness}
    roles[role](json.loads(Path(config_path).read_text()))


if __name__ == "__main__":
    main()
