"""The coordinator's tables (SQLAlchemy 2): SQLite in WAL mode under the state dir by default, or any URL.

Every acknowledged registration, run change, assignment, contribution, audit and ban is committed
before the reply; heartbeats are soft state kept in memory and flushed here periodically.

>>> store = Store("sqlite://")
>>> store.row_counts()["runs"]
0
"""

import logging
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path

from omi.coordinator.states import BanKind, ContributionStatus
from sqlalchemy import (
    BigInteger,
    Boolean,
    Float,
    ForeignKey,
    Index,
    Integer,
    LargeBinary,
    String,
    Text,
    UniqueConstraint,
    cast,
    create_engine,
    event,
    func,
    inspect,
    select,
    text,
    update,
)
from sqlalchemy.orm import DeclarativeBase, Mapped, Session, mapped_column, sessionmaker
from sqlalchemy.schema import CreateIndex, CreateTable

logger = logging.getLogger(__name__)


def int_sum(expression):
    """SUM of an integer expression, 0 over no rows, an ``int`` on every database (PostgreSQL's SUM of a bigint is a
    numeric, which psycopg returns as a ``Decimal``: ``Decimal / float`` raised in the throughput)."""
    return cast(func.coalesce(func.sum(expression), 0), BigInteger)

DB_FILENAME = "coordinator.db"


class Base(DeclarativeBase):
    pass


class Run(Base):
    __tablename__ = "runs"
    run_id: Mapped[str] = mapped_column(String(64), primary_key=True)
    name: Mapped[str] = mapped_column(String(256))
    model: Mapped[str] = mapped_column(String(128))
    state: Mapped[int] = mapped_column(Integer)  # pb.RunState value
    spec: Mapped[bytes] = mapped_column(LargeBinary)  # serialized RunSpec as parsed (no coordinator key)
    spec_toml: Mapped[str] = mapped_column(Text)
    round: Mapped[int] = mapped_column(Integer, default=0)
    total_samples: Mapped[int] = mapped_column(BigInteger, default=0)
    created_at_ms: Mapped[int] = mapped_column(BigInteger)
    updated_at_ms: Mapped[int] = mapped_column(BigInteger)


class Node(Base):
    __tablename__ = "nodes"
    node_id: Mapped[str] = mapped_column(String(64), primary_key=True)
    public_key: Mapped[bytes] = mapped_column(LargeBinary)
    display_name: Mapped[str] = mapped_column(String(128), default="")
    strikes: Mapped[int] = mapped_column(Integer, default=0)
    created_at_ms: Mapped[int] = mapped_column(BigInteger)


class Token(Base):
    """One AccessToken issued to a node for a run (registration or renewal)."""

    __tablename__ = "tokens"
    id: Mapped[int] = mapped_column(Integer, primary_key=True, autoincrement=True)
    node_id: Mapped[str] = mapped_column(ForeignKey("nodes.node_id"))
    run_id: Mapped[str] = mapped_column(ForeignKey("runs.run_id"))
    peer_id: Mapped[str] = mapped_column(String(128))
    swarm_public_key: Mapped[bytes] = mapped_column(LargeBinary)
    issued_at_ms: Mapped[int] = mapped_column(BigInteger)
    expires_at_ms: Mapped[int] = mapped_column(BigInteger)
    __table_args__ = (Index("ix_tokens_node_run", "node_id", "run_id"),)


class Heartbeat(Base):
    """The latest heartbeat of a node in a run (flushed from memory every few seconds)."""

    __tablename__ = "heartbeats"
    node_id: Mapped[str] = mapped_column(String(64), primary_key=True)
    run_id: Mapped[str] = mapped_column(String(64), primary_key=True)
    round: Mapped[int] = mapped_column(Integer)
    samples_per_second: Mapped[float] = mapped_column(Float)
    swarm_peers: Mapped[int] = mapped_column(Integer)
    loss: Mapped[float] = mapped_column(Float)
    at_ms: Mapped[int] = mapped_column(BigInteger)


class WorkAssignment(Base):
    __tablename__ = "work_assignments"
    assignment_id: Mapped[str] = mapped_column(String(64), primary_key=True)
    run_id: Mapped[str] = mapped_column(ForeignKey("runs.run_id"))
    round: Mapped[int] = mapped_column(Integer)
    node_id: Mapped[str] = mapped_column(ForeignKey("nodes.node_id"))
    num_samples: Mapped[int] = mapped_column(BigInteger)
    seed: Mapped[int] = mapped_column(BigInteger)
    message: Mapped[bytes] = mapped_column(LargeBinary)  # the coordinator-signed WorkAssignment as sent
    created_at_ms: Mapped[int] = mapped_column(BigInteger)
    released_at_ms: Mapped[int | None] = mapped_column(BigInteger, nullable=True)  # node went offline
    __table_args__ = (Index("ix_assignments_run_round_node", "run_id", "round", "node_id"),)


class AssignedShard(Base):
    """A shard taken in one round: the primary key is what forbids handing it out twice."""

    __tablename__ = "assigned_shards"
    run_id: Mapped[str] = mapped_column(String(64), primary_key=True)
    round: Mapped[int] = mapped_column(Integer, primary_key=True)
    shard_id: Mapped[int] = mapped_column(Integer, primary_key=True)
    assignment_id: Mapped[str] = mapped_column(ForeignKey("work_assignments.assignment_id"))


class AssignmentSource(Base):
    """The address an assignment was asked for from (per-address caps per round, issue 12 point 6)."""

    __tablename__ = "assignment_sources"
    assignment_id: Mapped[str] = mapped_column(ForeignKey("work_assignments.assignment_id"), primary_key=True)
    run_id: Mapped[str] = mapped_column(String(64))
    round: Mapped[int] = mapped_column(Integer)
    address: Mapped[str] = mapped_column(String(128))
    __table_args__ = (Index("ix_assignment_sources_run_round_address", "run_id", "round", "address"),)


class Contribution(Base):
    __tablename__ = "contributions"
    contribution_id: Mapped[str] = mapped_column(String(64), primary_key=True)
    run_id: Mapped[str] = mapped_column(ForeignKey("runs.run_id"))
    node_id: Mapped[str] = mapped_column(ForeignKey("nodes.node_id"))
    round: Mapped[int] = mapped_column(Integer)
    assignment_id: Mapped[str] = mapped_column(ForeignKey("work_assignments.assignment_id"))
    samples: Mapped[int] = mapped_column(BigInteger)
    mean_loss: Mapped[float] = mapped_column(Float)
    compute_seconds: Mapped[float] = mapped_column(Float)
    status: Mapped[str] = mapped_column(String(16))  # a ContributionStatus (omi.coordinator.states)
    message: Mapped[bytes] = mapped_column(LargeBinary)  # the node-signed Contribution as received
    received_at_ms: Mapped[int] = mapped_column(BigInteger)
    __table_args__ = (UniqueConstraint("node_id", "run_id", "round", name="uq_contribution_node_run_round"),)


class Audit(Base):
    __tablename__ = "audits"
    task_id: Mapped[str] = mapped_column(String(64), primary_key=True)
    contribution_id: Mapped[str] = mapped_column(ForeignKey("contributions.contribution_id"))
    run_id: Mapped[str] = mapped_column(String(64))
    node_id: Mapped[str] = mapped_column(String(64))
    round: Mapped[int] = mapped_column(Integer)
    micro_batch_indices: Mapped[str] = mapped_column(Text)  # JSON list
    audit_seed: Mapped[int] = mapped_column(BigInteger)
    state: Mapped[str] = mapped_column(String(16))  # an AuditState (omi.coordinator.states)
    validator_node_id: Mapped[str | None] = mapped_column(String(64), nullable=True)
    assigned_at_ms: Mapped[int | None] = mapped_column(BigInteger, nullable=True)
    verdict: Mapped[bytes | None] = mapped_column(LargeBinary, nullable=True)  # the validator-signed AuditVerdict
    created_at_ms: Mapped[int] = mapped_column(BigInteger)
    decided_at_ms: Mapped[int | None] = mapped_column(BigInteger, nullable=True)
    __table_args__ = (Index("ix_audits_run_state", "run_id", "state"),)


class AuditOpinion(Base):
    """One validator's signed verdict on an audit: a volunteer validator's failing verdict (and a share of its
    passing ones) waits for a second opinion; a disagreement goes to the coordinator's own validator."""

    __tablename__ = "audit_opinions"
    task_id: Mapped[str] = mapped_column(ForeignKey("audits.task_id"), primary_key=True)
    validator_node_id: Mapped[str] = mapped_column(String(64), primary_key=True, index=True)
    passed: Mapped[bool] = mapped_column(Boolean)
    verdict: Mapped[bytes] = mapped_column(LargeBinary)  # the validator-signed AuditVerdict
    at_ms: Mapped[int] = mapped_column(BigInteger)


class AuditRecords(Base):
    """The records an audited node handed over for the micro-batches chosen for recomputation, with Merkle proofs."""

    __tablename__ = "audit_records"
    task_id: Mapped[str] = mapped_column(ForeignKey("audits.task_id"), primary_key=True)
    records: Mapped[bytes] = mapped_column(LargeBinary)  # an AuditTask message holding only ``records``


class Ban(Base):
    __tablename__ = "bans"
    node_id: Mapped[str] = mapped_column(String(64), primary_key=True)
    reason: Mapped[str] = mapped_column(Text, default="")  # for people: the admin's words, or "3 failed audits"
    kind: Mapped[str] = mapped_column(String(16))  # a BanKind: what decides, never the reason's wording
    created_at_ms: Mapped[int] = mapped_column(BigInteger)


class PeerBinding(Base):
    """A libp2p peer id and the one node identity that proved it holds its key (one peer id, one identity)."""

    __tablename__ = "peer_bindings"
    peer_id: Mapped[str] = mapped_column(String(128), primary_key=True)
    node_id: Mapped[str] = mapped_column(String(64), index=True)
    bound_at_ms: Mapped[int] = mapped_column(BigInteger)


class ValidatorGrant(Base):
    """A node the coordinator lets take audit tasks and report verdicts (issue 12: validator is a granted role)."""

    __tablename__ = "validator_grants"
    node_id: Mapped[str] = mapped_column(String(64), primary_key=True)
    reason: Mapped[str] = mapped_column(Text, default="")
    granted_at_ms: Mapped[int] = mapped_column(BigInteger)


class Checkpoint(Base):
    __tablename__ = "checkpoints"
    id: Mapped[int] = mapped_column(Integer, primary_key=True, autoincrement=True)
    run_id: Mapped[str] = mapped_column(ForeignKey("runs.run_id"))
    round: Mapped[int] = mapped_column(Integer)
    total_samples: Mapped[int] = mapped_column(BigInteger)
    manifest_sha256: Mapped[str] = mapped_column(String(64))
    size_bytes: Mapped[int] = mapped_column(BigInteger)
    path: Mapped[str] = mapped_column(Text)
    milestone: Mapped[bool] = mapped_column(Boolean, default=False)
    created_at_ms: Mapped[int] = mapped_column(BigInteger)


class RoundState(Base):
    """The hash of a round's start state θ_r, as the coordinator's witness computed it (the newest rounds only)."""

    __tablename__ = "round_states"
    run_id: Mapped[str] = mapped_column(ForeignKey("runs.run_id"), primary_key=True)
    round: Mapped[int] = mapped_column(Integer, primary_key=True)
    state_hash: Mapped[str] = mapped_column(String(64))
    at_ms: Mapped[int] = mapped_column(BigInteger)


class RunMetric(Base):
    """One point of a run's history, for the dashboard's charts."""

    __tablename__ = "run_metrics"
    id: Mapped[int] = mapped_column(Integer, primary_key=True, autoincrement=True)
    run_id: Mapped[str] = mapped_column(ForeignKey("runs.run_id"))
    at_ms: Mapped[int] = mapped_column(BigInteger)
    round: Mapped[int] = mapped_column(Integer)
    total_samples: Mapped[int] = mapped_column(BigInteger)
    loss: Mapped[float | None] = mapped_column(Float, nullable=True)
    samples_per_second: Mapped[float] = mapped_column(Float)
    volunteers_online: Mapped[int] = mapped_column(Integer)
    __table_args__ = (Index("ix_run_metrics_run_at", "run_id", "at_ms"),)


def has_verified_contribution(session: Session, run_id: str, node_id: str) -> bool:
    """Whether the node has verified work in the run (else it is on probation: a smaller share of a round and a
    higher audit rate)."""
    return session.scalar(select(Contribution.contribution_id).where(
        Contribution.node_id == node_id, Contribution.run_id == run_id,
        Contribution.status == ContributionStatus.VERIFIED).limit(1)) is not None


def sqlite_url(state_dir: str | Path) -> str:
    """The default database: one SQLite file under the state dir."""
    return f"sqlite:///{Path(state_dir).resolve() / DB_FILENAME}"


class Store:
    """The coordinator's database.

    :param url: an SQLAlchemy URL, e.g. ``sqlite:////var/omi/coordinator.db`` or ``postgresql://user@host/omi``
    """

    def __init__(self, url: str):
        self.url = url
        self.engine = create_engine(url)
        if self.engine.dialect.name == "sqlite":
            event.listen(self.engine, "connect", _sqlite_pragmas)
        Base.metadata.create_all(self.engine)
        _rename_epoch_to_round(self.engine)
        _add_ban_kinds(self.engine)
        self._sessions = sessionmaker(self.engine, expire_on_commit=False)

    @contextmanager
    def transaction(self) -> Iterator[Session]:
        """A session whose work is committed when the block ends (rolled back if it raises)."""
        with self._sessions() as session, session.begin():
            yield session

    def session(self) -> Session:
        """A session for reads (``with store.session() as s: ...``)."""
        return self._sessions()

    def row_counts(self) -> dict[str, int]:
        """Rows per table: what the tests compare before and after a refused request."""
        with self.session() as s:
            return {name: s.scalar(select(func.count()).select_from(table))
                    for name, table in Base.metadata.tables.items()}

    def close(self) -> None:
        self.engine.dispose()


def _add_ban_kinds(engine) -> None:
    """Give ``bans`` of a database from before ``Ban.kind`` the column (``create_all`` adds missing tables, never
    missing columns): bans for failed audits were those whose reason said "N failed audits", every other an admin's."""
    if "kind" in {column["name"] for column in inspect(engine).get_columns("bans")}:
        return
    with engine.begin() as connection:
        connection.execute(text(f"ALTER TABLE bans ADD COLUMN kind VARCHAR(16) NOT NULL DEFAULT '{BanKind.ADMIN}'"))
        connection.execute(update(Ban).where(Ban.reason.like("% failed audits"))
                           .values(kind=BanKind.FAILED_AUDITS))
    logger.info("added bans.kind to the database's bans")


def _rename_epoch_to_round(engine) -> None:
    """Give the tables of a database from before the round was called ``round`` everywhere their ``round`` column:
    it was named ``epoch``, and so were the indexes and the constraint over it (``ix_assignments_run_epoch_node``,
    ``ix_assignment_sources_run_epoch_address``, ``uq_contribution_node_run_epoch``). Every row is kept."""
    inspector = inspect(engine)
    tables = sorted(name for name in inspector.get_table_names() if name in Base.metadata.tables
                    and "epoch" in {column["name"] for column in inspector.get_columns(name)})
    if not tables:
        return
    if engine.dialect.name == "sqlite":
        _remake_sqlite_tables(engine, tables)
    else:  # PostgreSQL renames a column, an index and a constraint in place (indexes follow their column)
        statements = []
        for name in tables:
            statements.append(f'ALTER TABLE {name} RENAME COLUMN epoch TO "round"')
            statements += [f"ALTER TABLE {name} RENAME CONSTRAINT {c} TO {c.replace('epoch', 'round')}"
                           for c in (uc["name"] for uc in inspector.get_unique_constraints(name)) if "epoch" in c]
            statements += [f"ALTER INDEX {i['name']} RENAME TO {i['name'].replace('epoch', 'round')}"
                           for i in inspector.get_indexes(name)  # a constraint's index goes with its constraint
                           if "epoch" in i["name"] and not i.get("duplicates_constraint")]
        with engine.begin() as connection:
            for statement in statements:
                connection.execute(text(statement))
    logger.info("renamed the column epoch to round in the database's %s", ", ".join(tables))


def _remake_sqlite_tables(engine, names: list[str]) -> None:
    """Make each table of ``names`` again as :class:`Base` defines it now and copy its rows over (``epoch`` into
    ``round``), all in one transaction: SQLite renames a column but no constraint, whose name is part of the table's
    definition (SQLite's own procedure for any other change: https://www.sqlite.org/lang_altertable.html)."""
    raw = engine.raw_connection()
    db = raw.driver_connection
    try:
        db.execute("PRAGMA foreign_keys=OFF")  # outside the transaction (SQLite ignores it inside one): a table that
        db.execute("BEGIN IMMEDIATE")          # others refer to is dropped and made again
        try:
            for name in names:
                table = Base.metadata.tables[name]
                old = {row[1] for row in db.execute(f'PRAGMA table_info("{name}")')}
                create = str(CreateTable(table).compile(dialect=engine.dialect)).strip()
                assert create.startswith(f"CREATE TABLE {name} ("), create
                db.execute(f"CREATE TABLE _new_{name} (" + create.removeprefix(f"CREATE TABLE {name} ("))
                copied = [c.name for c in table.columns if ("epoch" if c.name == "round" else c.name) in old]
                new_columns = ", ".join(f'"{column}"' for column in copied)
                old_columns = ", ".join('"epoch"' if column == "round" else f'"{column}"' for column in copied)
                db.execute(f"INSERT INTO _new_{name} ({new_columns}) SELECT {old_columns} FROM {name}")
                db.execute(f"DROP TABLE {name}")
                db.execute(f"ALTER TABLE _new_{name} RENAME TO {name}")
                for index in table.indexes:
                    db.execute(str(CreateIndex(index).compile(dialect=engine.dialect)))
            broken = db.execute("PRAGMA foreign_key_check").fetchall()
            assert not broken, f"rows whose foreign key has no row after the rename: {broken[:5]}"
            db.execute("COMMIT")
        except BaseException:
            db.execute("ROLLBACK")
            raise
    finally:
        db.execute("PRAGMA foreign_keys=ON")
        raw.close()


def _sqlite_pragmas(dbapi_connection, _record) -> None:
    # WAL lets readers (dashboard) run beside the writer; synchronous=NORMAL in WAL mode keeps every
    # committed transaction across a process crash (kill -9), only an OS crash may lose the last ones.
    cursor = dbapi_connection.cursor()
    cursor.execute("PRAGMA journal_mode=WAL")
    cursor.execute("PRAGMA synchronous=NORMAL")
    cursor.execute("PRAGMA foreign_keys=ON")
    cursor.execute("PRAGMA busy_timeout=5000")
    cursor.close()
