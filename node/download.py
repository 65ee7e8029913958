"""Fetch a published checkpoint over HTTP, resumably, and refuse it unless the coordinator's signature and every sha256
check out; and resume an empty swarm from the latest checkpoint.

    omi-node download digits --checkpoint latest --coordinator 127.0.0.1:50051 --out digits-latest

How a download goes: the signed ``manifest.json`` first (refused unless its Ed25519 signature verifies under the
coordinator's public key, from ``GetRunSpec`` or pinned with ``--coordinator-key``); then every file it lists into
``<name>.part`` (an interrupted download continues with an HTTP ``Range`` request from the bytes already there),
hashed while written; a file whose size or sha256 differs is renamed ``<name>.corrupt`` and the download refused.
A verified file gets its real name; ``manifest.json`` is written last, so a folder holding it is complete.
With a ``seen`` file (``omi-node download`` keeps it in the state dir) the newest round ever verified per coordinator
key and run is remembered, and a ``latest`` that is older is refused: a mirror or a man in the middle cannot roll a
user back to an older (still validly signed) checkpoint.
"""

from __future__ import annotations

import json
import logging
import os
import time
from dataclasses import dataclass
from pathlib import Path

from omi.models.fetch import DownloadError, fetch_file, open_url
from omi.protos import pb
from omi.protos.files import sha256_file
from omi.protos.manifest import (
    CHECKPOINT_MANIFEST_NAME,
    CheckpointManifest,
    CheckpointManifestError,
    read_checkpoint_manifest,
)
from rich.console import Console
from rich.progress import BarColumn, DownloadColumn, Progress, TextColumn, TimeRemainingColumn, TransferSpeedColumn

logger = logging.getLogger(__name__)

MAX_MANIFEST_BYTES = 16 << 20  # a manifest names files and contributors: far below this


@dataclass
class DownloadResult:
    folder: Path
    round: int
    manifest: CheckpointManifest
    downloaded_bytes: int  # bytes fetched by this call (less than the total when resuming)
    total_bytes: int
    seconds: float


def fetch_manifest(folder_url: str, public_key: bytes, run_id: str,
                   round_number: int | None) -> tuple[CheckpointManifest, bytes]:
    """The checkpoint's manifest and its bytes, refused unless signed by ``public_key`` for ``run_id`` (and
    ``round_number`` if given); the manifest's own checks refuse a path outside the folder."""
    url = f"{folder_url}/{CHECKPOINT_MANIFEST_NAME}"
    with open_url(url) as response:
        data = response.read(MAX_MANIFEST_BYTES + 1)
    if len(data) > MAX_MANIFEST_BYTES:
        raise DownloadError(f"refused: {url} is larger than {MAX_MANIFEST_BYTES} bytes")
    try:
        manifest = read_checkpoint_manifest(data, public_key)
    except CheckpointManifestError as e:
        raise DownloadError(f"refused: {url}: {e}") from None
    if manifest.run_id != run_id or (round_number is not None and manifest.round != round_number):
        raise DownloadError(f"refused: the manifest is of run {manifest.run_id!r} round {manifest.round}, not what "
                            "was asked")
    return manifest, data


class SeenCheckpoints:
    """The newest checkpoint round verified so far per (coordinator key, run), in a small JSON file."""

    def __init__(self, path: Path):
        self.path = Path(path)

    def _read(self) -> dict:
        try:
            data = json.loads(self.path.read_text())
        except (OSError, ValueError):
            return {}  # none yet (or unreadable: it only ever makes the check stricter, so start afresh)
        return data if isinstance(data, dict) else {}

    @staticmethod
    def _key(public_key: bytes, run_id: str) -> str:
        return f"{public_key.hex()}/{run_id}"

    def newest(self, public_key: bytes, run_id: str) -> int | None:
        value = self._read().get(self._key(public_key, run_id))
        return value if isinstance(value, int) else None

    def remember(self, public_key: bytes, run_id: str, round_number: int) -> None:
        data = self._read()
        key = self._key(public_key, run_id)
        if not isinstance(data.get(key), int) or data[key] < round_number:
            data[key] = round_number
            self.path.parent.mkdir(parents=True, exist_ok=True)
            tmp = self.path.with_name(self.path.name + ".part")
            tmp.write_text(json.dumps(data, indent=1, sort_keys=True))
            os.replace(tmp, self.path)


def download_checkpoint(folder_url: str, run_id: str, out: Path | None, public_key: bytes, *,
                        round_number: int | None = None, console: Console | None = None,
                        progress: bool = True, seen: SeenCheckpoints | None = None) -> DownloadResult:
    """Download and verify the checkpoint served at ``folder_url`` (``…/runs/RUN/checkpoints/ROUND|latest``).

    :param folder_url: URL of the checkpoint folder on the coordinator's HTTP port
    :param run_id: the run the manifest must name
    :param out: the folder to write (None: ``RUN-round-E`` in the working directory)
    :param public_key: the coordinator's raw Ed25519 key the manifest must be signed with
    :param round_number: the round the manifest must name (None: any, e.g. for ``latest``)
    :param console: where the progress bar goes
    :param progress: show a progress bar
    :param seen: the newest rounds verified before; a ``latest`` (``round_number`` None) older than the newest is
      refused
    :raises DownloadError: on any mismatch (nothing is presented as complete) or transfer failure
    """
    started = time.perf_counter()
    manifest, manifest_bytes = fetch_manifest(folder_url, public_key, run_id, round_number)
    newest = seen.newest(public_key, run_id) if seen is not None else None
    if round_number is None and newest is not None and manifest.round < newest:
        raise DownloadError(f"refused: 'latest' of run {run_id} is served as round {manifest.round}, older than "
                            f"round {newest} verified before from this coordinator (a rollback); ask for "
                            f"--checkpoint {manifest.round} to take it anyway")
    round_number = manifest.round
    folder_url = folder_url.rsplit("/", 1)[0] + f"/{round_number}"  # "latest" may move on while the files come
    out = Path(out) if out is not None else Path(f"{run_id}-round-{round_number}")
    out.mkdir(parents=True, exist_ok=True)
    complete = out / CHECKPOINT_MANIFEST_NAME
    if complete.exists():
        complete.unlink()  # the folder is being (re)written: it stops counting as complete until the end
    total = sum(entry.size for entry in manifest.files)
    fetched = 0
    columns = (TextColumn("[bold]{task.description}"), BarColumn(), DownloadColumn(), TransferSpeedColumn(),
               TimeRemainingColumn())
    with Progress(*columns, console=console, disable=not progress, transient=False) as bar:
        task = bar.add_task(f"{run_id} round {round_number}", total=total)
        for entry in manifest.files:
            target = out / entry.path
            target.parent.mkdir(parents=True, exist_ok=True)
            if target.exists() and target.stat().st_size == entry.size and sha256_file(target) == entry.sha256:
                bar.advance(task, entry.size)
                continue
            target.unlink(missing_ok=True)
            fetched += fetch_file(f"{folder_url}/{entry.path}", target, entry.size, entry.sha256,
                                   lambda n: bar.advance(task, n))
    tmp = out / (CHECKPOINT_MANIFEST_NAME + ".part")
    tmp.write_bytes(manifest_bytes)
    os.replace(tmp, complete)
    if seen is not None:
        seen.remember(public_key, run_id, round_number)
    return DownloadResult(out, round_number, manifest, fetched, total, time.perf_counter() - started)


# ---------------------------------------------------------------- resume an empty swarm


def load_into_optimizer(optimizer, model, loaded_model, round_number: int) -> None:
    """Make ``loaded_model``'s parameters θ of ``round_number`` in a fresh round optimizer (the outer momentum starts
    afresh: a checkpoint holds the weights only)."""
    names = [name for name, _ in model.named_parameters()]
    loaded = dict(loaded_model.named_parameters())
    if sorted(names) != sorted(loaded):
        raise DownloadError("the checkpoint's model has other parameters than the run's model", 2)
    optimizer.set_state(round_number, [loaded[name].detach().float() for name, param in model.named_parameters()
                                       if param.requires_grad])


def resume_from_checkpoint(client, spec: pb.RunSpec, model, optimizer, cache_dir: Path) -> int | None:
    """If the swarm holds no state as new as the run's latest checkpoint, start from that checkpoint.

    Called right after the :class:`omi.swarm.RoundOptimizer` is made: hivemind's tracker has read the swarm's progress
    by then. When some peer serves the checkpoint's round or a later one, its state is loaded and nothing else
    happens here. Otherwise (every volunteer left, or this is the first to come back) the checkpoint is
    downloaded and verified like ``omi-node download`` does, and the node continues at
    ``max(checkpoint round, run round)``: the run's round never goes back, so the coordinator's round and
    hivemind's agree and no (node, round) of the ledger is reused.

    :returns: the round the node resumed at, or None if it did not resume
    """
    import grpc
    from omi.models.sampling import load_model

    try:
        checkpoints = client.list_checkpoints(spec.run_id)
        run_round = client.get_run_status(spec.run_id).summary.round
    except grpc.RpcError as e:
        logger.warning("could not ask the coordinator for checkpoints: %s", e.details())
        return None
    if not checkpoints or not checkpoints[-1].url:
        return None
    latest = checkpoints[-1]
    swarm_round = max(optimizer.round, optimizer.tracker.global_epoch)
    if swarm_round >= latest.round:
        # The progress records say some peer is that far; they outlive peers that just left (seen: a newcomer
        # dialling two departed peers, then training alone from scratch). Load the state now: only a peer that
        # really serves it counts.
        optimizer.load_state_from_peers(min_round=latest.round)
        if optimizer.round >= latest.round:
            optimizer.tracker.report_local_progress(local_epoch=optimizer.round, samples_accumulated=0)
            return None
        logger.warning("the swarm's progress records say round %d, but no peer served state past round %d",
                       swarm_round, optimizer.round)
    try:
        result = download_checkpoint(latest.url, spec.run_id, Path(cache_dir) / f"{spec.run_id}-round-{latest.round}",
                                     spec.coordinator_public_key, round_number=latest.round, progress=False)
    except DownloadError as e:  # never train on weights that do not verify; hivemind's own start is still sound
        logger.error("could not resume from checkpoint round %d: %s", latest.round, e)
        return None
    loaded, _ = load_model(result.folder)
    round_number = max(latest.round, run_round)
    load_into_optimizer(optimizer, model, loaded, round_number)
    logger.info("the swarm had no state past round %d: resumed from checkpoint round %d (verified, %d bytes "
                "fetched), continuing at round %d", swarm_round, latest.round, result.downloaded_bytes, round_number)
    return round_number
