"""Published checkpoints of a run: the ``checkpoints`` table, the folders under the state dir, retention, and repair.

A checkpoint of run R at round E is the folder ``<state dir>/checkpoints/R/round-<E>`` (a stock diffusers
``DDPMPipeline`` folder plus ``manifest.json`` and ``preview.png``) and one row of the ``checkpoints`` table (its
``path`` column holds the folder; the ``Checkpoint`` message's ``path`` is the URL path it is served at). The
checkpointer (:mod:`omi.coordinator.checkpointer`, its own process) writes the folder under a temporary name and
renames it into place, then calls :meth:`Checkpoints.publish`, which inserts the row and applies retention in one
transaction. What is listed (``ListCheckpoints``, ``GET /runs/R/checkpoints``) is exactly the table.

A crash can leave: a temporary folder (never listed; removed by :meth:`Checkpoints.repair`), a complete folder
whose row was not yet inserted (repair verifies its manifest and lists it), a row whose folder retention already
moved away (repair drops the row), or a dropped checkpoint's folder (repair lists it again, then retention runs).

A state dir from before the round was called round holds ``epoch-<E>`` folders whose manifests are format v1
(:mod:`omi.protos.manifest` reads them): :meth:`Checkpoints.rename_epoch_folders` renames them once, at start.

Retention keeps the last ``checkpoints.keep`` checkpoints plus the milestones: a checkpoint is a milestone when it
is the first at or after a multiple of ``checkpoints.milestone_every`` (0: no milestones).
"""

from __future__ import annotations

import logging
import shutil
from dataclasses import dataclass
from pathlib import Path

from omi.coordinator.runs import Runs
from omi.coordinator.states import ContributionStatus
from omi.coordinator.store import AssignedShard, Checkpoint, Contribution, Node, Store, int_sum
from omi.protos import pb
from omi.protos.files import sha256_file
from omi.protos.manifest import CHECKPOINT_MANIFEST_NAME, CheckpointManifest, verify_folder
from sqlalchemy import delete, func, select, update

logger = logging.getLogger(__name__)

CHECKPOINTS_DIR = "checkpoints"
TMP_PREFIX = ".tmp-"
TRASH_PREFIX = ".trash-"
EPOCH_PREFIX = "epoch-"  # what a checkpoint folder's name began with before the round was called round


def folder_name(round_number: int) -> str:
    return f"round-{round_number:08d}"


def url_path(run_id: str, round_number: int) -> str:
    """Where a checkpoint's files are served on the coordinator's HTTP port."""
    return f"/runs/{run_id}/checkpoints/{round_number}"


def is_milestone(round_number: int, previous_round: int | None, milestone_every: int) -> bool:
    """True if ``round_number`` is the first checkpoint at or after a multiple of ``milestone_every``.

    >>> [e for e, p in [(1, None), (2, 1), (3, 2), (5, 3), (6, 5)] if is_milestone(e, p, 2)]
    [2, 5, 6]
    """
    if milestone_every <= 0:
        return False
    return round_number // milestone_every > (previous_round or 0) // milestone_every


def retained(rounds_and_milestones: list[tuple[int, bool]], keep: int) -> set[int]:
    """Rounds retention keeps: the last ``keep`` plus every milestone.

    >>> sorted(retained([(1, False), (2, True), (3, False), (4, True), (5, False), (6, False)], keep=2))
    [2, 4, 5, 6]
    """
    rounds = sorted(e for e, _ in rounds_and_milestones)
    return set(rounds[-keep:] if keep > 0 else []) | {e for e, milestone in rounds_and_milestones if milestone}


@dataclass
class LedgerSummary:
    """What the ledger says about the work that produced the state at a round (contributions of earlier rounds)."""

    total_samples: int
    loss: float | None  # sample-weighted mean loss of the last round with contributions
    contributors: list[dict]  # node_id, display_name, samples, verified_samples; most samples first
    data_shards: list[list[int]]  # [first, last] runs of the shard ids trained on


def shard_runs(shard_ids: list[int]) -> list[list[int]]:
    """Sorted shard ids as inclusive ``[first, last]`` runs.

    >>> shard_runs([5, 0, 1, 2, 7, 6])
    [[0, 2], [5, 7]]
    """
    runs: list[list[int]] = []
    for shard in sorted(set(shard_ids)):
        if runs and shard == runs[-1][1] + 1:
            runs[-1][1] = shard
        else:
            runs.append([shard, shard])
    return runs


class Checkpoints:
    """The checkpoints of every run: table, folders, retention.

    :param store: the database
    :param runs: run specs (retention settings) and to refuse unknown runs
    :param state_dir: the coordinator's state dir (checkpoint folders live in ``state_dir/checkpoints``);
      None: nothing on disk (listing still works)
    :param public_url: base URL of the coordinator's HTTP port (``http://host:port``) for ``Checkpoint.url``
    """

    def __init__(self, store: Store, runs: Runs, state_dir: str | Path | None = None, public_url: str = ""):
        self.store, self.runs = store, runs
        self.state_dir = None if state_dir is None else Path(state_dir)
        self.public_url = public_url.rstrip("/")

    # ---------------------------------------------------------------- reading

    def run_folder(self, run_id: str) -> Path:
        assert self.state_dir is not None, "Checkpoints needs a state dir to hold checkpoint folders"
        return self.state_dir / CHECKPOINTS_DIR / run_id

    def _to_proto(self, row: Checkpoint) -> pb.Checkpoint:
        return pb.Checkpoint(run_id=row.run_id, round=row.round, total_samples=row.total_samples,
                             manifest_sha256=row.manifest_sha256, size_bytes=row.size_bytes,
                             created_at_ms=row.created_at_ms, path=url_path(row.run_id, row.round),
                             milestone=row.milestone,
                             url=f"{self.public_url}{url_path(row.run_id, row.round)}" if self.public_url else "")

    def list(self, run_id: str) -> list[pb.Checkpoint]:
        """The run's checkpoints, oldest first."""
        self.runs.get(run_id)
        with self.store.session() as s:
            rows = s.scalars(select(Checkpoint).where(Checkpoint.run_id == run_id).order_by(Checkpoint.round))
            return [self._to_proto(r) for r in rows]

    def get(self, run_id: str, round_number: int | None = None) -> pb.Checkpoint | None:
        """The run's checkpoint at ``round_number`` (None: the latest), or None if there is none."""
        self.runs.get(run_id)
        query = select(Checkpoint).where(Checkpoint.run_id == run_id)
        query = query.order_by(Checkpoint.round.desc()).limit(1) if round_number is None else query.where(
            Checkpoint.round == round_number)
        with self.store.session() as s:
            row = s.scalars(query).first()
            return None if row is None else self._to_proto(row)

    def folder(self, run_id: str, round_number: int) -> Path:
        return self.run_folder(run_id) / folder_name(round_number)

    def ledger_summary(self, run_id: str, round_number: int) -> LedgerSummary:
        """Samples, loss, contributors and shards of the contributions to rounds before ``round_number`` (not
        voided)."""
        counted = (Contribution.run_id == run_id, Contribution.round < round_number,
                   Contribution.status != ContributionStatus.VOIDED)
        with self.store.session() as s:
            total = s.scalar(select(int_sum(Contribution.samples)).where(*counted))
            last = s.scalar(select(func.max(Contribution.round)).where(*counted))
            loss = None
            if last is not None:
                weighted, samples = s.execute(select(func.sum(Contribution.mean_loss * Contribution.samples),
                                                     func.sum(Contribution.samples))
                                              .where(*counted, Contribution.round == last)).one()
                loss = float(weighted) / float(samples) if samples else None
            verified = func.sum(Contribution.samples).filter(Contribution.status == ContributionStatus.VERIFIED)
            rows = s.execute(select(Contribution.node_id, Node.display_name, func.sum(Contribution.samples),
                                    func.coalesce(verified, 0))
                             .join(Node, Node.node_id == Contribution.node_id).where(*counted)
                             .group_by(Contribution.node_id, Node.display_name)).all()
            shards = s.scalars(select(AssignedShard.shard_id).distinct()
                               .join(Contribution, Contribution.assignment_id == AssignedShard.assignment_id)
                               .where(*counted)).all()
        contributors = [dict(node_id=node_id, display_name=name or "", samples=int(samples),
                             verified_samples=int(verified_samples))
                        for node_id, name, samples, verified_samples in rows]
        contributors.sort(key=lambda c: (-c["samples"], c["node_id"]))
        return LedgerSummary(int(total), loss, contributors, shard_runs(list(shards)))

    # ---------------------------------------------------------------- writing (the checkpointer's process)

    def publish(self, run_id: str, round_number: int, folder: Path, manifest: CheckpointManifest) -> list[int]:
        """List the complete checkpoint ``folder`` (already renamed into place) and apply retention.

        :returns: the rounds retention dropped (their folders are removed after the commit)
        """
        assert folder == self.folder(run_id, round_number), "publish the folder at its final place"
        spec = self.runs.get(run_id).spec.checkpoints
        manifest_path = folder / CHECKPOINT_MANIFEST_NAME
        size = sum(entry.size for entry in manifest.files) + manifest_path.stat().st_size
        with self.store.transaction() as s:
            if s.scalar(select(Checkpoint.id).where(Checkpoint.run_id == run_id, Checkpoint.round == round_number)):
                return []
            previous = s.scalar(select(func.max(Checkpoint.round)).where(Checkpoint.run_id == run_id,
                                                                         Checkpoint.round < round_number))
            s.add(Checkpoint(run_id=run_id, round=round_number, total_samples=manifest.total_samples,
                             manifest_sha256=sha256_file(manifest_path), size_bytes=size,
                             path=str(folder.resolve()), created_at_ms=manifest.created_at_ms,
                             milestone=is_milestone(round_number, previous, spec.milestone_every)))
            s.flush()
            dropped = self._retain(s, run_id, spec.keep)
        self._remove_folders(run_id, dropped)
        logger.info("run %s: checkpoint round %d listed (%d bytes)%s", run_id, round_number, size,
                    f"; retention dropped rounds {dropped}" if dropped else "")
        return dropped

    def _retain(self, session, run_id: str, keep: int) -> list[int]:
        rows = session.execute(select(Checkpoint.round, Checkpoint.milestone).where(Checkpoint.run_id == run_id)).all()
        kept = retained([(e, m) for e, m in rows], keep)
        dropped = sorted(e for e, _ in rows if e not in kept)
        if dropped:
            session.execute(delete(Checkpoint).where(Checkpoint.run_id == run_id, Checkpoint.round.in_(dropped)))
        return dropped

    def _remove_folders(self, run_id: str, rounds: list[int]) -> None:
        for round_number in rounds:
            folder = self.folder(run_id, round_number)
            if folder.exists():
                # renamed first, so a crash mid-delete leaves a trash folder, never a half checkpoint in place
                trash = folder.with_name(f"{TRASH_PREFIX}{folder.name}")
                shutil.rmtree(trash, ignore_errors=True)
                folder.rename(trash)
                shutil.rmtree(trash, ignore_errors=True)

    def rename_epoch_folders(self) -> None:
        """Rename every run's ``epoch-<E>`` checkpoint folders (from before the round was called round) to
        :func:`folder_name`, and the ``path`` of their rows; safe to call at any start."""
        renamed = []
        for old in sorted((self.state_dir / CHECKPOINTS_DIR).glob(f"*/{EPOCH_PREFIX}*")):
            new = old.with_name(folder_name(int(old.name.removeprefix(EPOCH_PREFIX))))
            old_path = str(old.resolve())
            old.rename(new)
            with self.store.transaction() as s:
                s.execute(update(Checkpoint).where(Checkpoint.path == old_path).values(path=str(new.resolve())))
            renamed.append(f"{old.parent.name}/{new.name}")
        if renamed:
            logger.info("renamed the checkpoint folders epoch-* to round-*: %s", ", ".join(renamed))

    def repair(self, run_id: str, public_key: bytes) -> None:
        """Make folders and table agree after a crash (see the module docstring); safe to call at any start."""
        base = self.run_folder(run_id)
        base.mkdir(parents=True, exist_ok=True)
        for leftover in base.iterdir():
            if leftover.name.startswith((TMP_PREFIX, TRASH_PREFIX)):
                logger.info("run %s: removing unfinished %s", run_id, leftover.name)
                shutil.rmtree(leftover, ignore_errors=True)
        with self.store.transaction() as s:
            listed = set(s.scalars(select(Checkpoint.round).where(Checkpoint.run_id == run_id)))
            missing = [e for e in listed if not self.folder(run_id, e).is_dir()]
            if missing:
                logger.warning("run %s: checkpoints %s have no folder; unlisting them", run_id, missing)
                s.execute(delete(Checkpoint).where(Checkpoint.run_id == run_id, Checkpoint.round.in_(missing)))
        for folder in sorted(base.glob("round-*")):
            round_number = int(folder.name.split("-", 1)[1])
            if round_number in listed:
                continue
            manifest = verify_folder(folder, public_key)
            if manifest is None or manifest.run_id != run_id or manifest.round != round_number:
                logger.warning("run %s: %s does not verify; removing it", run_id, folder.name)
                shutil.rmtree(folder, ignore_errors=True)
                continue
            logger.info("run %s: listing complete checkpoint %s found on disk", run_id, folder.name)
            self.publish(run_id, round_number, folder, manifest)
