"""Read-only views of a run for the dashboard: status, history, contributors, checkpoints and the data card, as
plain dataclasses.

Every function here only reads: the coordinator's in-memory state (runs, heartbeats) and the store. The
dashboard's JSON API and its Prometheus ``/metrics`` both build on these, so the two always agree.

>>> from omi.coordinator.core import Coordinator
>>> from omi.coordinator.store import Store
>>> from omi.protos.signing import generate_key
>>> coordinator = Coordinator(Store("sqlite://"), generate_key())
>>> _ = coordinator.runs.create('[run]\\nid = "demo"\\nmodel = "unet-digits-16"\\n', start=True)
>>> run_status(coordinator, "demo").state, contributors(coordinator, "demo")
('running', [])
"""

import hashlib
import logging
import math
from dataclasses import dataclass, field
from pathlib import Path

from omi.coordinator.core import Coordinator
from omi.coordinator.errors import NotFound
from omi.coordinator.runs import data_url_path
from omi.coordinator.states import OPEN_AUDIT_STATES, RUN_STATE_NAMES, AuditState, ContributionStatus
from omi.coordinator.store import Audit, Ban, Checkpoint, Contribution, Node, RunMetric, Token, int_sum
from omi.protos import pb
from omi.protos.clock import now_ms
from omi.protos.data_ref import DataRef
from omi.protos.dataset import DATA_CARD_NAME, DATASET_MANIFEST_NAME, ManifestError, parse_manifest
from omi.protos.manifest import (
    CHECKPOINT_MANIFEST_NAME,
    CheckpointManifest,
    CheckpointManifestError,
    read_checkpoint_manifest,
)
from sqlalchemy import case, func, select

logger = logging.getLogger(__name__)

SHORT_ID = 12  # characters of a node id shown to people
RECENT_CONTRIBUTIONS = 500  # round figures per volunteer come from the run's latest this many contributions


@dataclass
class AuditCounts:
    """Audits of a run by state; one field per :class:`~omi.coordinator.states.AuditState`."""

    awaiting_records: int = 0  # sampled; the node has not handed over its records yet
    pending: int = 0   # records check passed, not yet handed to a validator
    assigned: int = 0  # a validator is recomputing it
    disputed: int = 0  # two validators disagreed; the coordinator's own validator decides
    passed: int = 0
    failed: int = 0


@dataclass
class CheckpointFile:
    name: str        # path inside the checkpoint folder, as in its manifest
    url: str         # download URL on the coordinator's HTTP port
    sha256: str = ""
    size_bytes: int = 0


@dataclass
class CheckpointView:
    round: int
    total_samples: int
    manifest_sha256: str
    size_bytes: int
    created_at_ms: int
    milestone: bool
    manifest_url: str  # /runs/{run}/checkpoints/{round}/manifest.json
    preview_url: str | None = None  # the preview grid PNG listed in the manifest, if any
    files: list[CheckpointFile] = field(default_factory=list)  # from the manifest, when it is readable here
    # a text-to-image preview: the prompt of each cell (left to right, top to bottom) and the cells per row
    preview_prompts: list[str] = field(default_factory=list)
    preview_columns: int | None = None


@dataclass
class RunStatusView:
    run_id: str
    name: str
    model: str
    state: str                 # created | running | paused | stopped
    round: int
    total_samples: int         # samples trained, voided contributions excluded
    volunteers_online: int
    samples_per_second: float  # the ledger's growth over the last minute
    loss: float | None         # mean of the latest loss of the volunteers online
    contributions: int         # contributions not voided
    verified_samples: int
    created_at_ms: int
    contributions_refused: int          # refused by the ledger since the coordinator started
    contributions_by_status: dict[str, int]  # accepted | verified | voided
    audits: AuditCounts
    latest_checkpoint: CheckpointView | None
    server_time_ms: int


@dataclass
class HistoryPoint:
    at_ms: int
    round: int
    total_samples: int
    loss: float | None
    samples_per_second: float
    volunteers_online: int


@dataclass
class HistoryView:
    run_id: str
    since_ms: int
    points: list[HistoryPoint]  # oldest first, all with at_ms > since_ms
    next_since_ms: int          # pass as ``since`` to get only newer points
    downsampled: bool           # True when there were more points than the limit and every n-th is shown


@dataclass
class ContributorView:
    node_id: str
    short_id: str
    display_name: str
    samples: int           # samples of its contributions, voided ones excluded
    verified_samples: int
    contributions: int     # contributions not voided
    audits_passed: int
    audits_failed: int
    audits_pending: int    # sampled for audit, no verdict yet
    last_seen_ms: int      # latest heartbeat, contribution or registration
    online: bool
    banned: bool
    # compute seconds its contributions report / wall seconds between its first and last contribution as received
    # here (the first one's compute excluded); None before two contributions
    utilization: float | None = None
    micro_batches_per_contribution: float | None = None  # inner steps per round (recent contributions)
    bytes_per_sample: float | None = None  # all-reduce bytes it reports per sample (recent contributions)


@dataclass
class DataCardView:
    """A text-to-image run's prepared data set, as its ``manifest.json`` (a
    :class:`~omi.protos.dataset.DatasetManifest`) describes it."""

    run_id: str
    name: str                 # the data set's name
    model: str                # the model whose frozen parts made its latents and caption embeddings
    resolution: int           # side of the images, in pixels
    source: str               # the data card: where the images come from
    license_terms: str        # what the licences allow and require
    filtering: str            # what was left out, and why ("" if not stated)
    caption_origin: str       # who or what wrote the captions ("" if not stated)
    samples: int
    shards: int               # prepared shards
    licenses: dict[str, int]  # licence (SPDX id) -> samples
    refused: dict[str, int]   # reason -> samples left out at preparation
    parts_sha256: str         # the frozen autoencoder and text encoder the data set was made with
    manifest_sha256: str      # what a checkpoint's manifest names as ``data.manifest_sha256``
    manifest_url: str         # /runs/{run}/data/manifest.json
    card_url: str | None      # /runs/{run}/data/DATA_CARD.md, when the data set has one


def state_name(state: int) -> str:
    return RUN_STATE_NAMES.get(state, "unknown")


def finite_or_none(value: float | None) -> float | None:
    """A loss as JSON can carry it: None for no value, NaN or infinity (a diverged node's report)."""
    return value if value is not None and math.isfinite(value) else None


def run_status(coordinator: Coordinator, run_id: str) -> RunStatusView:
    """The headline of a run (``NotFound`` for an unknown run)."""
    status = coordinator.run_status(run_id)
    summary = status.summary
    with coordinator.store.session() as s:
        by_status = dict(s.execute(select(Contribution.status, func.count()).where(
            Contribution.run_id == run_id).group_by(Contribution.status)).all())
        by_state = dict(s.execute(select(Audit.state, func.count()).where(
            Audit.run_id == run_id).group_by(Audit.state)).all())
    checkpoints = checkpoint_views(coordinator, run_id)
    return RunStatusView(
        run_id=run_id, name=summary.name, model=summary.model, state=state_name(summary.state), round=summary.round,
        total_samples=summary.total_samples, volunteers_online=summary.volunteers_online,
        samples_per_second=status.samples_per_second, loss=finite_or_none(status.last_loss or None),
        contributions=status.contributions, verified_samples=status.verified_samples,
        created_at_ms=summary.created_at_ms, contributions_refused=refused(coordinator, run_id),
        contributions_by_status={k.value: by_status.get(k, 0) for k in ContributionStatus},
        audits=AuditCounts(**{k.value: by_state.get(k, 0) for k in AuditState}),
        latest_checkpoint=checkpoints[-1] if checkpoints else None, server_time_ms=now_ms())


def refused(coordinator: Coordinator, run_id: str) -> int:
    """Contributions to ``run_id`` the ledger refused since the coordinator started."""
    return sum(n for (run, _code), n in coordinator.ledger.refused.items() if run == run_id)


def history(coordinator: Coordinator, run_id: str, since_ms: int = 0, limit: int = 2000) -> HistoryView:
    """Points of the run's history recorded after ``since_ms``; beyond ``limit`` points, every n-th one."""
    assert limit >= 1, "limit must be >= 1"
    coordinator.runs.get(run_id)
    where = (RunMetric.run_id == run_id, RunMetric.at_ms > since_ms)
    with coordinator.store.session() as s:
        count = s.scalar(select(func.count()).select_from(RunMetric).where(*where))
        query = select(RunMetric).where(*where)
        stride = math.ceil(count / limit) if count > limit else 1
        if stride > 1:  # ids grow with time, so every stride-th id spreads the points over the whole run
            query = query.where(RunMetric.id % stride == 0)
        rows = s.scalars(query.order_by(RunMetric.at_ms)).all()
        last = s.scalar(select(func.max(RunMetric.at_ms)).where(*where))
    points = [HistoryPoint(r.at_ms, r.round, r.total_samples, finite_or_none(r.loss), r.samples_per_second,
                           r.volunteers_online)
              for r in rows]
    return HistoryView(run_id=run_id, since_ms=since_ms, points=points, next_since_ms=last or since_ms,
                       downsampled=stride > 1)


def contributors(coordinator: Coordinator, run_id: str) -> list[ContributorView]:
    """Every node registered for the run or with a contribution to it, most samples first."""
    coordinator.runs.get(run_id)
    now = now_ms()
    online_cutoff = now - int(coordinator.runs.get(run_id).spec.liveness.heartbeat_timeout * 1000)
    live = Contribution.status != ContributionStatus.VOIDED
    verified = Contribution.status == ContributionStatus.VERIFIED
    with coordinator.store.session() as s:
        registered = dict(s.execute(select(Token.node_id, func.max(Token.issued_at_ms)).where(
            Token.run_id == run_id).group_by(Token.node_id)).all())
        work = {row.node_id: row for row in s.execute(select(
            Contribution.node_id,
            int_sum(case((live, Contribution.samples), else_=0)).label("samples"),
            int_sum(case((verified, Contribution.samples), else_=0)).label("verified"),
            int_sum(case((live, 1), else_=0)).label("count"),
            func.max(Contribution.received_at_ms).label("last"),
            func.min(Contribution.received_at_ms).label("first"),
            func.coalesce(func.sum(Contribution.compute_seconds), 0.0).label("compute")).where(
            Contribution.run_id == run_id).group_by(Contribution.node_id))}
        reported = _reported_round_figures(s, run_id)
        audits: dict[str, dict[str, int]] = {}
        for node_id, state, n in s.execute(select(Audit.node_id, Audit.state, func.count()).where(
                Audit.run_id == run_id).group_by(Audit.node_id, Audit.state)):
            audits.setdefault(node_id, {})[state] = n
        node_ids = set(registered) | set(work)
        names = dict(s.execute(select(Node.node_id, Node.display_name).where(Node.node_id.in_(node_ids))).all())
        banned = set(s.scalars(select(Ban.node_id).where(Ban.node_id.in_(node_ids))))
    views = []
    for node_id in node_ids:
        w, a = work.get(node_id), audits.get(node_id, {})
        beat = coordinator.liveness.last_seen_ms(run_id, node_id)
        views.append(ContributorView(
            node_id=node_id, short_id=node_id[:SHORT_ID], display_name=names.get(node_id, ""),
            samples=int(w.samples) if w else 0, verified_samples=int(w.verified) if w else 0,
            contributions=int(w.count) if w else 0, audits_passed=a.get(AuditState.PASSED, 0),
            audits_failed=a.get(AuditState.FAILED, 0),
            audits_pending=sum(a.get(k, 0) for k in OPEN_AUDIT_STATES),
            last_seen_ms=max(beat, w.last if w else 0, registered.get(node_id) or 0),
            online=beat >= online_cutoff, banned=node_id in banned,
            utilization=_utilization(w), **reported.get(node_id, {})))
    views.sort(key=lambda v: (-v.samples, v.node_id))
    return views


def _utilization(work) -> float | None:
    """Compute over wall time between a node's first and last contribution: (n−1)/n of its compute seconds (the
    first contribution's compute happened before the first report) over the received-at span."""
    if work is None or work.count < 2 or work.last <= work.first:
        return None
    return float(work.compute) * (work.count - 1) / work.count / ((work.last - work.first) / 1000)


def _reported_round_figures(session, run_id: str, recent: int = RECENT_CONTRIBUTIONS) -> dict[str, dict[str, float]]:
    """Per node, from the run's ``recent`` latest signed contributions: inner steps per round and the
    all-reduce bytes it reports per sample."""
    totals: dict[str, list[float]] = {}
    for node_id, message in session.execute(select(Contribution.node_id, Contribution.message).where(
            Contribution.run_id == run_id, Contribution.status != ContributionStatus.VOIDED).order_by(
            Contribution.received_at_ms.desc()).limit(recent)):
        c = pb.Contribution.FromString(message)
        t = totals.setdefault(node_id, [0, 0, 0, 0])
        t[0], t[1], t[2], t[3] = t[0] + 1, t[1] + c.micro_batches, t[2] + c.bytes_sent, t[3] + c.samples
    return {node: dict(micro_batches_per_contribution=steps / n, bytes_per_sample=sent / max(samples, 1))
            for node, (n, steps, sent, samples) in totals.items()}


def checkpoint_views(coordinator: Coordinator, run_id: str) -> list[CheckpointView]:
    """The run's checkpoints, oldest first, with their download URLs (served under ``/runs/{run}/checkpoints``).

    The files and the preview grid come from each checkpoint's ``manifest.json`` in its folder under the
    coordinator's state dir; a checkpoint whose folder is not readable here is still listed, without them.
    """
    coordinator.runs.get(run_id)
    with coordinator.store.session() as s:
        rows = s.scalars(select(Checkpoint).where(Checkpoint.run_id == run_id).order_by(Checkpoint.round)).all()
    has_folders = coordinator.checkpoints.state_dir is not None
    views = []
    for r in rows:
        base = f"/runs/{run_id}/checkpoints/{r.round}"
        manifest = checkpoint_manifest(coordinator.checkpoints.folder(run_id, r.round), r.manifest_sha256,
                                       coordinator.public_key) if has_folders else None
        files, prompts, columns = [], [], None
        if manifest is not None:
            files = [CheckpointFile(entry.path, f"{base}/{entry.path}", entry.sha256, entry.size)
                     for entry in sorted(manifest.files, key=lambda entry: entry.path)]
            prompts, columns = list(manifest.preview_prompts or []), manifest.preview_columns
        preview = next((f.url for f in files if f.name.lower().endswith(".png")), None)
        views.append(CheckpointView(round=r.round, total_samples=r.total_samples, manifest_sha256=r.manifest_sha256,
                                    size_bytes=r.size_bytes, created_at_ms=r.created_at_ms, milestone=r.milestone,
                                    manifest_url=f"{base}/{CHECKPOINT_MANIFEST_NAME}", preview_url=preview,
                                    files=files, preview_prompts=prompts, preview_columns=columns))
    return views


# (folder, manifest sha256) -> its manifest, None if it does not verify: keyed by the manifest's hash, so an entry is
# never stale, in any process
_MANIFESTS: dict[tuple[str, str], CheckpointManifest | None] = {}


def checkpoint_manifest(folder: Path, manifest_sha256: str, public_key: bytes) -> CheckpointManifest | None:
    """A listed checkpoint's manifest, read from its folder and signed by ``public_key``; None if it is not readable
    here or does not verify. A manifest read once is kept by its hash: a checkpoint never changes once written."""
    key = (str(folder), manifest_sha256)
    if key not in _MANIFESTS:
        try:
            data = (folder / CHECKPOINT_MANIFEST_NAME).read_bytes()
        except OSError:
            return None  # retention removed it since the listing was read
        try:
            _MANIFESTS[key] = read_checkpoint_manifest(data, public_key)
        except CheckpointManifestError as e:
            logger.warning("checkpoint %s is listed, its manifest is not shown: %s", folder, e)
            _MANIFESTS[key] = None
    return _MANIFESTS[key]


def data_card(coordinator: Coordinator, run_id: str) -> DataCardView:
    """The prepared data set of a text-to-image run, from its ``manifest.json``: the one in the run's folder
    (``manifest:FOLDER``, served by this coordinator), or for a ``manifest:URL`` run the manifest this coordinator
    fetched (and checked against the run's pin) when it opened the run; ``NotFound`` for an unknown run and for a
    run without a prepared data set (a built-in source)."""
    from omi.models.data_cache import fetched_manifest  # imported late: it pulls in torch and the data libraries

    folder = coordinator.runs.data_folder(run_id)
    source = coordinator.runs.get(run_id).spec.data.source
    ref = DataRef.parse(source)
    fetched = fetched_manifest(ref) if folder is None and ref.is_manifest else None
    if folder is None and fetched is None:
        raise NotFound(f"run '{run_id}' has no prepared data set on this coordinator (its data: {source})")
    try:
        raw = fetched[1] if fetched is not None else (folder / DATASET_MANIFEST_NAME).read_bytes()
        manifest = parse_manifest(raw)
    except (OSError, ManifestError) as e:
        raise NotFound(f"the data set of run '{run_id}' is not readable: {e}") from None
    if fetched is not None:  # the mirror serves the manifest; whether it has a DATA_CARD.md is not known here
        return _card_view(run_id, manifest, raw, manifest_url=f"{fetched[0]}/{DATASET_MANIFEST_NAME}", card_url=None)
    base = data_url_path(run_id)
    return _card_view(run_id, manifest, raw, manifest_url=f"{base}/{DATASET_MANIFEST_NAME}",
                      card_url=f"{base}/{DATA_CARD_NAME}" if (folder / DATA_CARD_NAME).is_file() else None)


def _card_view(run_id: str, manifest, raw: bytes, *, manifest_url: str, card_url: str | None) -> DataCardView:
    card = manifest.card
    return DataCardView(
        run_id=run_id, name=manifest.name, model=manifest.model, resolution=manifest.resolution,
        source=card.source, license_terms=card.license_terms, filtering=card.filtering,
        caption_origin=card.caption_origin, samples=manifest.samples, shards=len(manifest.shards),
        licenses=dict(manifest.licenses), refused=dict(manifest.refused), parts_sha256=manifest.parts.sha256,
        manifest_sha256=hashlib.sha256(raw).hexdigest(), manifest_url=manifest_url, card_url=card_url)
