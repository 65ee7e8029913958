"""The checkpointer: the run's witness (a weight-0 member of every round) that publishes signed diffusers checkpoints.

``omi-coordinator serve`` starts one checkpointer process per running run (:class:`CheckpointerSupervisor`):

    python -c "from omi.coordinator.checkpointer import main; main()" --state-dir state --run digits \
        --initial-peer /ip4/127.0.0.1/tcp/...

It runs in its own process because hivemind must be created in a main thread, while the coordinator's main thread
runs the gRPC API's event loop. The process joins the run's swarm with a token the coordinator mints for it (it
holds the coordinator's key), builds the run's model and takes part in every round's all-reduce as the run's
:class:`omi.swarm.RoundWitness`: each round it sees moves the run's round in the database, with the hash of the θ it
confirmed; every ``checkpoints.every_rounds`` rounds it writes the confirmed θ as a checkpoint folder atomically
(:func:`write_checkpoint`), then lists it in the same database
(:meth:`omi.coordinator.checkpoints.Checkpoints.publish`; SQLite in WAL mode takes the two writers).

Test hook: ``OMI_CHECKPOINT_STALL=ROUND:SECONDS`` pauses the write of every checkpoint of round >= ROUND for
SECONDS after the weights are on disk (so a test can kill the coordinator mid-write).
"""

from __future__ import annotations

import argparse
import json
import logging
import os
import sys
import threading
import time
from pathlib import Path

import torch
from omi.coordinator.bootstrap import STARTUP_TIMEOUT
from omi.coordinator.checkpoints import TMP_PREFIX, Checkpoints, folder_name
from omi.coordinator.credentials import KEY_FILENAME
from omi.coordinator.runs import Runs
from omi.coordinator.store import Run, Store, sqlite_url
from omi.coordinator.supervisor import Launch, RunProcesses
from omi.protos import pb, signing
from omi.protos.clock import now_ms
from omi.protos.data_ref import DataRef
from omi.protos.files import sha256_file
from omi.protos.manifest import (
    CHECKPOINT_MANIFEST_NAME,
    MANIFEST_FORMAT,
    CheckpointManifest,
    sign_checkpoint_manifest,
)
from sqlalchemy import select

logger = logging.getLogger(__name__)

POLL_INTERVAL = 1.0  # seconds between two reads of the run's round
RETRY_INTERVAL = 5.0  # seconds before the witness tries again after it failed
PREVIEW_STEPS = 25  # DDIM steps of the preview grid
PREVIEW_SEED = 0  # fixed: previews of successive checkpoints show the same noise
PREVIEW_FILENAME = "preview.png"
STALL_ENV = "OMI_CHECKPOINT_STALL"


def _fsync_tree(folder: Path) -> None:
    for path in sorted(folder.rglob("*"), reverse=True):  # files before their folders
        fd = os.open(path, os.O_RDONLY)
        try:
            os.fsync(fd)
        finally:
            os.close(fd)


def _fsync_dir(folder: Path) -> None:
    fd = os.open(folder, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def _stall(round_number: int) -> None:
    value = os.environ.get(STALL_ENV)
    if not value:
        return
    from_round, seconds = value.split(":")
    if round_number >= int(from_round):
        logger.warning("stalling the write of checkpoint round %d for %s s (%s)", round_number, seconds, STALL_ENV)
        time.sleep(float(seconds))


def write_checkpoint(model: torch.nn.Module, scheduler, *, spec: pb.RunSpec, round_number: int, run_folder: Path,
                     checkpoints: Checkpoints, key, preview: bool = True, source=None,
                     state_hash: str | None = None) -> tuple[Path, CheckpointManifest]:
    """Write the checkpoint of ``model`` at ``round_number`` under ``run_folder`` atomically; returns (folder,
    manifest).

    Order: weights and configs (diffusers ``save_pretrained``), the preview grid, then the signed manifest, all in a
    temporary folder that is fsynced and renamed to ``round-<E>``. Until the rename nothing is at the final name,
    and nothing is listed until the caller publishes the folder. The manifest of a text-to-image run's preview also
    says what each cell shows: ``preview_prompts`` (one per cell, left to right, top to bottom) and
    ``preview_columns`` (cells per row), which the dashboard prints under the grid.

    :param model: the UNet holding the swarm's parameters
    :param scheduler: the run's DDPM scheduler
    :param spec: the RunSpec (run id, model name, preview size)
    :param round_number: the round of these parameters θ
    :param run_folder: the run's checkpoint folder
    :param checkpoints: reads the ledger for the manifest
    :param key: the coordinator's Ed25519 key, which signs the manifest
    :param preview: also draw the preview grid
    :param source: the run's data source (opened from the RunSpec if not given); a text-to-image data set gives the
        frozen parts saved beside the transformer, the preview prompts, and the data provenance of the manifest
    :param state_hash: the witness's hash of θ at ``round_number`` (:func:`omi.swarm.diloco.theta_hash`), signed in the
        manifest as ``state_hash``
    """
    from omi.models import open_source, params_hash, save_grid
    from omi.models.sampling import cell_prompts, draw, grid_columns, run_drawing, save_model

    final = run_folder / folder_name(round_number)
    tmp = run_folder / f"{TMP_PREFIX}{folder_name(round_number)}-{os.getpid()}"
    run_folder.mkdir(parents=True, exist_ok=True)
    model = model.to("cpu").eval()
    source = source if source is not None else (open_source(spec.data) if DataRef.parse(spec.data.source).is_manifest
                                                else None)
    parts, prompts = run_drawing(source)
    save_model(model, scheduler, tmp, parts=parts)
    _stall(round_number)
    shown = {}  # a grid drawn from prompts: what each of its cells shows
    if preview:
        n = spec.checkpoints.preview_samples
        columns = grid_columns(n)
        images = draw(model, scheduler, n, PREVIEW_STEPS, PREVIEW_SEED, parts=parts, prompts=prompts)
        save_grid(images, tmp / PREVIEW_FILENAME, nrow=columns)
        if prompts:
            shown = dict(preview_prompts=cell_prompts(prompts, n), preview_columns=columns)
    files = [dict(path=path.relative_to(tmp).as_posix(), size=path.stat().st_size, sha256=sha256_file(path))
             for path in sorted(tmp.rglob("*")) if path.is_file()]
    summary = checkpoints.ledger_summary(spec.run_id, round_number)
    manifest, manifest_bytes = sign_checkpoint_manifest(dict(
        format=MANIFEST_FORMAT, run_id=spec.run_id, model=spec.model, round=round_number,
        total_samples=summary.total_samples, loss=summary.loss, created_at_ms=now_ms(),
        params_hash=params_hash(model).hex(), files=files, contributors=summary.contributors,
        data_shards=summary.data_shards, data_source=spec.data.source,
        coordinator_public_key=signing.public_bytes(key).hex(),
        **({"data": source.provenance(summary.data_shards)} if parts is not None else {}), **shown,
        **({"state_hash": state_hash} if state_hash else {}),
    ), key)
    (tmp / CHECKPOINT_MANIFEST_NAME).write_bytes(manifest_bytes)
    _fsync_tree(tmp)
    os.replace(tmp, final)
    _fsync_dir(run_folder)
    return final, manifest


class Checkpointer:
    """Follows one run and publishes its checkpoints; create and run it in the main thread of its own process.

    :param state_dir: the coordinator's state dir (its key, and the checkpoint folders)
    :param db_url: the coordinator's database (None: SQLite under ``state_dir``)
    :param run_id: the run to follow
    :param initial_peers: multiaddrs of the run's swarm (the coordinator's bootstrap peer)
    :param host: address the checkpointer's swarm peer listens on
    :param public_url: base URL of the coordinator's HTTP port, for the ``url`` of listed checkpoints

    >>> Checkpointer("state", None, "digits", ["/ip4/127.0.0.1/tcp/4001/p2p/Qm..."]).run()  # doctest: +SKIP
    """

    def __init__(self, state_dir: str | Path, db_url: str | None, run_id: str, initial_peers: list[str], *,
                 host: str = "127.0.0.1", public_url: str = ""):
        self.state_dir, self.run_id, self.host = Path(state_dir), run_id, host
        self.key = signing.load_key(self.state_dir / KEY_FILENAME)
        self.store = Store(db_url or sqlite_url(self.state_dir))
        self.runs = Runs(self.store, signing.public_bytes(self.key))
        self.checkpoints = Checkpoints(self.store, self.runs, self.state_dir, public_url)
        self.spec = self.runs.spec_for_nodes(run_id)
        self.spec.initial_peers.extend(initial_peers)
        self._stop = threading.Event()
        self.dht = self.witness = self.source = None

    def stop(self) -> None:
        self._stop.set()

    def _start_swarm_peer(self) -> None:
        from omi.models import build_for_spec, open_source
        from omi.swarm import (
            MintingTokenProvider,
            RoundWitness,
            load_or_create_peer_identity,
            load_or_create_swarm_key,
            make_dht,
            swarm_public_key,
        )

        spec = self.spec
        folder = self.state_dir / "swarm" / self.run_id / "checkpointer"
        folder.mkdir(parents=True, exist_ok=True)
        swarm_key = load_or_create_swarm_key(folder / "swarm_rsa.pem")
        peer_id = load_or_create_peer_identity(folder / "p2p.id")
        tokens = MintingTokenProvider(self.key, run_id=self.run_id, peer_id=peer_id,
                                      swarm_public_key=swarm_public_key(swarm_key), ttl=spec.liveness.token_ttl)
        self.dht = make_dht(spec, tokens, swarm_key, initial_peers=list(spec.initial_peers),
                            identity_path=str(folder / "p2p.id"), host=self.host)
        self.model, self.scheduler = build_for_spec(spec)
        # a prepared data set is opened once: its frozen parts are hashed and loaded at the first checkpoint only
        self.source = open_source(spec.data) if DataRef.parse(spec.data.source).is_manifest else None
        self.witness = RoundWitness(self.dht, spec, self.model)  # the run's round and its checkpoints come from it
        logger.info("run %s: checkpointer peer %s joined the swarm as the rounds' witness", self.run_id, peer_id)

    def _run_row(self) -> tuple[int, int]:
        with self.store.session() as s:
            state, round_number = s.execute(select(Run.state, Run.round).where(Run.run_id == self.run_id)).one()
        return state, round_number

    def run(self) -> None:
        """Repair, join the swarm, then move the run's round and checkpoint every ``every_rounds``, until stopped."""
        self.checkpoints.repair(self.run_id, signing.public_bytes(self.key))
        self._start_swarm_peer()
        latest = self.checkpoints.get(self.run_id)
        self._last_round = latest.round if latest is not None else 0
        threading.Thread(target=self._witness, name="witness", daemon=True).start()
        while not self._stop.wait(POLL_INTERVAL):
            if self._run_row()[0] == pb.RUN_STATE_RUNNING:
                self._checkpoint_witnessed()

    def _witness(self) -> None:
        """The witness's loop (a thread): each round it saw moves the run's round; a confirmed one publishes θ's
        hash."""
        while not self._stop.is_set():
            try:
                seen = self.witness.follow_round(self._stop)
            except Exception:
                logger.exception("run %s: the witness failed; retrying", self.run_id)
                self._stop.wait(RETRY_INTERVAL)
                continue
            if seen is not None:
                self.runs.advance(self.run_id, seen.round, seen.state_hash if seen.confirmed else None)

    def _checkpoint_witnessed(self) -> None:
        """Checkpoint the θ the witness holds once it is confirmed at a due round."""
        seen = self.witness.snapshot()
        if not seen.confirmed or seen.round < self._due():
            return
        started = time.perf_counter()
        seen = self.witness.copy_into(self.model)  # the round may have moved on since the snapshot
        self._write(seen.round, time.perf_counter() - started, state_hash=seen.state_hash)

    def _due(self) -> int:
        every = self.spec.checkpoints.every_rounds
        return (self._last_round // every + 1) * every

    def _write(self, round_number: int, copied_seconds: float, state_hash: str) -> None:
        started = time.perf_counter()
        folder, manifest = write_checkpoint(self.model, self.scheduler, spec=self.spec, round_number=round_number,
                                            run_folder=self.checkpoints.run_folder(self.run_id),
                                            checkpoints=self.checkpoints, key=self.key, source=self.source,
                                            state_hash=state_hash)
        written = time.perf_counter()
        self.checkpoints.publish(self.run_id, round_number, folder, manifest)
        self._last_round = round_number
        logger.info("run %s: checkpoint of round %d written (witnessed θ copied in %.1f s, written in %.1f s, %d "
                    "samples, loss %s)", self.run_id, round_number, copied_seconds, written - started,
                    manifest.total_samples, manifest.loss)

    def shutdown(self) -> None:
        self._stop.set()
        if self.witness is not None:
            self.witness.shutdown()
        if self.dht is not None:
            self.dht.shutdown()
        self.store.close()


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description="The coordinator's checkpointer of one run (started by serve).")
    parser.add_argument("--state-dir", type=Path, required=True)
    parser.add_argument("--db", default=None, help="SQLAlchemy URL (default: SQLite under the state dir)")
    parser.add_argument("--run", required=True)
    parser.add_argument("--initial-peer", action="append", default=[])
    parser.add_argument("--initial-peers-on-stdin", action="store_true",
                        help="read the run's bootstrap multiaddrs as one JSON line on stdin, after start-up")
    parser.add_argument("--host", default="127.0.0.1")
    parser.add_argument("--public-url", default="")
    parser.add_argument("--log-level", default="INFO")
    args = parser.parse_args(argv)
    logging.basicConfig(level=args.log_level.upper(), format="%(asctime)s %(levelname)s %(name)s: %(message)s")
    torch.set_num_threads(1)  # shares the coordinator's machine; pulling state and writing files is I/O-bound
    initial_peers = args.initial_peer
    if args.initial_peers_on_stdin:  # started beside the run's bootstrap peer: import while it starts (~4 s)
        import omi.models.registry  # noqa: F401 - what _start_swarm_peer imports: diffusers' models, ~7 s of CPU
        import omi.swarm  # noqa: F401

        line = sys.stdin.readline()
        if not line.strip():
            raise SystemExit(f"run {args.run}: the coordinator handed no bootstrap peer to the checkpointer")
        initial_peers += json.loads(line)
    checkpointer = Checkpointer(args.state_dir, args.db, args.run, initial_peers, host=args.host,
                                public_url=args.public_url)
    from omi.swarm.signals import install_stop_signals

    install_stop_signals(checkpointer.stop)
    try:
        checkpointer.run()
    finally:
        checkpointer.shutdown()


class CheckpointerSupervisor:
    """Inside ``omi-coordinator serve``: one checkpointer process per running run, stopped once the run no longer
    runs, restarted if it dies (:class:`omi.coordinator.supervisor.RunProcesses`).

    :param state_dir: the coordinator's state dir
    :param db_url: the coordinator's database URL (None: SQLite under ``state_dir``)
    :param runs: the coordinator's runs
    :param initial_peers: ``(RunSpec, timeout=seconds)`` -> multiaddrs of the run's bootstrap peer (starts it if
        needed; raises Unavailable if it does not listen within the timeout)
    :param host: address the checkpointers' swarm peers listen on
    :param public_url: base URL of the coordinator's HTTP port
    """

    def __init__(self, state_dir: Path, db_url: str | None, runs: Runs, initial_peers, *, host: str = "127.0.0.1",
                 public_url: str = ""):
        self.state_dir, self.db_url, self.runs, self.initial_peers = Path(state_dir), db_url, runs, initial_peers
        self.host, self.public_url = host, public_url
        self.processes = RunProcesses("checkpointer", self._launch, wanted=self._running)

    def _running(self) -> list[str]:
        return [run_id for run_id in self.runs.run_ids() if self.runs.get(run_id).state == pb.RUN_STATE_RUNNING]

    def _launch(self, run_id: str) -> Launch:
        # -c rather than -m: the package imports this module, and runpy would warn about running it twice
        command = [sys.executable, "-c", "from omi.coordinator.checkpointer import main; main()",
                   "--state-dir", str(self.state_dir), "--run", run_id, "--host", self.host]
        if self.db_url:
            command += ["--db", self.db_url]
        if self.public_url:
            command += ["--public-url", self.public_url]
        # it starts beside the run's bootstrap peer and gets its addresses once it listens
        spec = self.runs.get(run_id).spec
        command.append("--initial-peers-on-stdin")
        return Launch(command, stdin=lambda: json.dumps(self.initial_peers(spec, timeout=STARTUP_TIMEOUT)))

    def shutdown(self) -> None:
        self.processes.shutdown()


if __name__ == "__main__":
    main()
