"""A state dir made by a coordinator from before the round was called ``round`` (it was ``epoch``) keeps working and
loses nothing: its database (SQLite or PostgreSQL) and its checkpoint folders."""

import json
import logging

import pytest
from omi.coordinator.checkpointer import write_checkpoint
from omi.coordinator.checkpoints import folder_name
from omi.coordinator.core import Coordinator
from omi.coordinator.store import (
    AssignedShard,
    AssignmentSource,
    Audit,
    Base,
    Checkpoint,
    Contribution,
    Heartbeat,
    Run,
    RunMetric,
    Store,
    WorkAssignment,
    sqlite_url,
)
from omi.models import build_model
from omi.protos import signing
from omi.protos.manifest import (
    CHECKPOINT_MANIFEST_NAME,
    MANIFEST_FORMAT_V1,
    SIGNATURE_KEY,
    sign_checkpoint_manifest,
    verify_folder,
)
from sqlalchemy import (
    BigInteger,
    Boolean,
    Column,
    Float,
    ForeignKey,
    Index,
    Integer,
    LargeBinary,
    MetaData,
    String,
    Table,
    Text,
    UniqueConstraint,
    create_engine,
    insert,
    inspect,
    select,
    update,
)
from sqlalchemy.exc import IntegrityError

# The tables that had an ``epoch`` column (and ``nodes``, which they refer to), as coordinators before the rename
# defined them in omi/coordinator/store.py.
BEFORE = MetaData()
Table("runs", BEFORE, Column("run_id", String(64), primary_key=True), Column("name", String(256)),
      Column("model", String(128)), Column("state", Integer), Column("spec", LargeBinary), Column("spec_toml", Text),
      Column("epoch", Integer, default=0), Column("total_samples", BigInteger, default=0),
      Column("created_at_ms", BigInteger), Column("updated_at_ms", BigInteger))
Table("nodes", BEFORE, Column("node_id", String(64), primary_key=True), Column("public_key", LargeBinary),
      Column("display_name", String(128), default=""), Column("strikes", Integer, default=0),
      Column("created_at_ms", BigInteger))
Table("heartbeats", BEFORE, Column("node_id", String(64), primary_key=True),
      Column("run_id", String(64), primary_key=True), Column("epoch", Integer), Column("samples_per_second", Float),
      Column("swarm_peers", Integer), Column("loss", Float), Column("at_ms", BigInteger))
Table("work_assignments", BEFORE, Column("assignment_id", String(64), primary_key=True),
      Column("run_id", String(64), ForeignKey("runs.run_id")), Column("epoch", Integer),
      Column("node_id", String(64), ForeignKey("nodes.node_id")), Column("num_samples", BigInteger),
      Column("seed", BigInteger), Column("message", LargeBinary), Column("created_at_ms", BigInteger),
      Column("released_at_ms", BigInteger, nullable=True),
      Index("ix_assignments_run_epoch_node", "run_id", "epoch", "node_id"))
Table("assigned_shards", BEFORE, Column("run_id", String(64), primary_key=True),
      Column("epoch", Integer, primary_key=True), Column("shard_id", Integer, primary_key=True),
      Column("assignment_id", String(64), ForeignKey("work_assignments.assignment_id")))
Table("assignment_sources", BEFORE,
      Column("assignment_id", String(64), ForeignKey("work_assignments.assignment_id"), primary_key=True),
      Column("run_id", String(64)), Column("epoch", Integer), Column("address", String(128)),
      Index("ix_assignment_sources_run_epoch_address", "run_id", "epoch", "address"))
Table("contributions", BEFORE, Column("contribution_id", String(64), primary_key=True),
      Column("run_id", String(64), ForeignKey("runs.run_id")),
      Column("node_id", String(64), ForeignKey("nodes.node_id")), Column("epoch", Integer),
      Column("assignment_id", String(64), ForeignKey("work_assignments.assignment_id")),
      Column("samples", BigInteger), Column("mean_loss", Float), Column("compute_seconds", Float),
      Column("status", String(16)), Column("message", LargeBinary), Column("received_at_ms", BigInteger),
      UniqueConstraint("node_id", "run_id", "epoch", name="uq_contribution_node_run_epoch"))
Table("audits", BEFORE, Column("task_id", String(64), primary_key=True),
      Column("contribution_id", String(64), ForeignKey("contributions.contribution_id")),
      Column("run_id", String(64)), Column("node_id", String(64)), Column("epoch", Integer),
      Column("micro_batch_indices", Text), Column("audit_seed", BigInteger), Column("state", String(16)),
      Column("validator_node_id", String(64), nullable=True), Column("assigned_at_ms", BigInteger, nullable=True),
      Column("verdict", LargeBinary, nullable=True), Column("created_at_ms", BigInteger),
      Column("decided_at_ms", BigInteger, nullable=True), Index("ix_audits_run_state", "run_id", "state"))
Table("checkpoints", BEFORE, Column("id", Integer, primary_key=True, autoincrement=True),
      Column("run_id", String(64), ForeignKey("runs.run_id")), Column("epoch", Integer),
      Column("total_samples", BigInteger), Column("manifest_sha256", String(64)), Column("size_bytes", BigInteger),
      Column("path", Text), Column("milestone", Boolean, default=False), Column("created_at_ms", BigInteger))
Table("run_metrics", BEFORE, Column("id", Integer, primary_key=True, autoincrement=True),
      Column("run_id", String(64), ForeignKey("runs.run_id")), Column("at_ms", BigInteger), Column("epoch", Integer),
      Column("total_samples", BigInteger), Column("loss", Float, nullable=True), Column("samples_per_second", Float),
      Column("volunteers_online", Integer), Index("ix_run_metrics_run_at", "run_id", "at_ms"))

NODE, OTHER = "n" * 64, "o" * 64


def write_rows_before_the_rename(url: str) -> None:
    """One row or two in each table of BEFORE, every ``epoch`` a different number."""
    engine = create_engine(url)
    BEFORE.create_all(engine)
    t = BEFORE.tables
    with engine.begin() as c:
        c.execute(insert(t["runs"]).values(run_id="r", name="r", model="m", state=2, spec=b"", spec_toml="",
                                           epoch=7, total_samples=640, created_at_ms=1, updated_at_ms=2))
        c.execute(insert(t["nodes"]), [dict(node_id=node, public_key=b"k", created_at_ms=1) for node in (NODE, OTHER)])
        c.execute(insert(t["heartbeats"]).values(node_id=NODE, run_id="r", epoch=6, samples_per_second=1.5,
                                                 swarm_peers=2, loss=0.5, at_ms=3))
        c.execute(insert(t["work_assignments"]).values(assignment_id="a", run_id="r", epoch=5, node_id=NODE,
                                                       num_samples=64, seed=9, message=b"w", created_at_ms=4))
        c.execute(insert(t["assigned_shards"]).values(run_id="r", epoch=5, shard_id=3, assignment_id="a"))
        c.execute(insert(t["assignment_sources"]).values(assignment_id="a", run_id="r", epoch=5, address="10.0.0.1"))
        c.execute(insert(t["contributions"]).values(contribution_id="c", run_id="r", node_id=NODE, epoch=5,
                                                    assignment_id="a", samples=64, mean_loss=0.5, compute_seconds=1.0,
                                                    status="accepted", message=b"m", received_at_ms=5))
        c.execute(insert(t["audits"]).values(task_id="t", contribution_id="c", run_id="r", node_id=NODE, epoch=5,
                                             micro_batch_indices="[0]", audit_seed=1, state="pending",
                                             created_at_ms=6))
        c.execute(insert(t["checkpoints"]).values(run_id="r", epoch=4, total_samples=256, manifest_sha256="0" * 64,
                                                  size_bytes=10, path="/state/checkpoints/r/epoch-00000004",
                                                  milestone=True, created_at_ms=7))
        c.execute(insert(t["run_metrics"]).values(run_id="r", at_ms=8, epoch=3, total_samples=192, loss=None,
                                                  samples_per_second=2.0, volunteers_online=1))
    engine.dispose()


def test_a_database_from_before_the_rename_keeps_every_row_under_round(tmp_path, db_url, caplog):
    url = db_url or sqlite_url(tmp_path)
    write_rows_before_the_rename(url)
    with caplog.at_level(logging.INFO, logger="omi.coordinator.store"):
        store = Store(url)
    try:
        renamed = ", ".join(sorted(BEFORE.tables.keys() - {"nodes"}))
        assert [r.message for r in caplog.records if "epoch" in r.message] == [
            f"renamed the column epoch to round in the database's {renamed}"]
        with store.session() as s:
            assert s.execute(select(Run.round, Run.total_samples)).one() == (7, 640)
            assert s.execute(select(Heartbeat.round, Heartbeat.loss)).one() == (6, 0.5)
            assert s.execute(select(WorkAssignment.round, WorkAssignment.message)).one() == (5, b"w")
            assert s.execute(select(AssignedShard.round, AssignedShard.shard_id)).one() == (5, 3)
            assert s.execute(select(AssignmentSource.round, AssignmentSource.address)).one() == (5, "10.0.0.1")
            assert s.execute(select(Contribution.round, Contribution.samples)).one() == (5, 64)
            assert s.execute(select(Audit.round, Audit.state)).one() == (5, "pending")
            assert s.execute(select(Checkpoint.round, Checkpoint.milestone)).one() == (4, True)
            assert s.execute(select(RunMetric.round, RunMetric.samples_per_second)).one() == (3, 2.0)
        # the indexes and the constraint have the names the code gives them, and the constraint still holds
        inspector = inspect(store.engine)
        for name, table in Base.metadata.tables.items():
            assert "epoch" not in {column["name"] for column in inspector.get_columns(name)}, name
            assert ({index["name"] for index in inspector.get_indexes(name) if not index.get("duplicates_constraint")}
                    == {index.name for index in table.indexes}), name
            assert ({constraint["name"] for constraint in inspector.get_unique_constraints(name)}
                    == {c.name for c in table.constraints if isinstance(c, UniqueConstraint)}), name
        with pytest.raises(IntegrityError), store.transaction() as s:
            s.add(Contribution(contribution_id="again", run_id="r", node_id=NODE, round=5, assignment_id="a",
                               samples=1, mean_loss=0.1, compute_seconds=0.1, status="accepted", message=b"",
                               received_at_ms=9))
        with pytest.raises(IntegrityError), store.transaction() as s:  # and so do the foreign keys
            s.add(Contribution(contribution_id="stray", run_id="r", node_id="nobody", round=6, assignment_id="a",
                               samples=1, mean_loss=0.1, compute_seconds=0.1, status="accepted", message=b"",
                               received_at_ms=9))
        with store.transaction() as s:
            s.add(Contribution(contribution_id="next", run_id="r", node_id=OTHER, round=5, assignment_id="a",
                               samples=1, mean_loss=0.1, compute_seconds=0.1, status="accepted", message=b"",
                               received_at_ms=9))
        caplog.clear()
        with caplog.at_level(logging.INFO, logger="omi.coordinator.store"):
            Store(url).close()  # opened again: nothing left to rename
        assert not [r for r in caplog.records if "epoch" in r.message]
    finally:
        store.close()


def test_checkpoint_folders_from_before_the_rename_are_renamed_listed_and_verified(tmp_path, one_torch_thread):
    state = tmp_path / "state"
    coordinator = Coordinator.open(state)
    coordinator.runs.create('[run]\nid = "digits"\nmodel = "unet-digits-16"\n', start=True)
    model, scheduler = build_model("unet-digits-16")
    run_folder = coordinator.checkpoints.run_folder("digits")
    for round_number in (2, 4):
        folder, manifest = write_checkpoint(model, scheduler, spec=coordinator.runs.spec_for_nodes("digits"),
                                            round_number=round_number, run_folder=run_folder,
                                            checkpoints=coordinator.checkpoints, key=coordinator.key, preview=False)
        coordinator.checkpoints.publish("digits", round_number, folder, manifest)
        # as the checkpointer wrote it before: an omi-checkpoint-v1 manifest naming the round "epoch", in epoch-<E>
        fields = json.loads((folder / CHECKPOINT_MANIFEST_NAME).read_text())
        fields = {("epoch" if key == "round" else key): value for key, value in fields.items() if key != SIGNATURE_KEY}
        fields["format"] = MANIFEST_FORMAT_V1
        (folder / CHECKPOINT_MANIFEST_NAME).write_bytes(sign_checkpoint_manifest(fields, coordinator.key)[1])
        old = folder.rename(run_folder / f"epoch-{round_number:08d}")
        with coordinator.store.transaction() as s:
            s.execute(update(Checkpoint).where(Checkpoint.round == round_number).values(path=str(old.resolve())))
    with coordinator.store.transaction() as s:  # as if the coordinator died before listing round 4
        s.delete(s.scalar(select(Checkpoint).where(Checkpoint.round == 4)))
    coordinator.close()

    coordinator = Coordinator.open(state)
    try:
        assert sorted(p.name for p in run_folder.iterdir()) == [folder_name(2), folder_name(4)]
        with coordinator.store.session() as s:
            assert s.scalar(select(Checkpoint.path)) == str((run_folder / folder_name(2)).resolve())
        public_key = signing.public_bytes(coordinator.key)
        coordinator.checkpoints.repair("digits", public_key)  # lists round 4 from its v1 manifest
        assert [c.round for c in coordinator.checkpoints.list("digits")] == [2, 4]
        for round_number in (2, 4):
            manifest = verify_folder(coordinator.checkpoints.folder("digits", round_number), public_key)
            assert (manifest.format, manifest.round) == (MANIFEST_FORMAT_V1, round_number)
    finally:
        coordinator.close()
