"""The dashboard's read-only JSON API (``/api/...``), documented by FastAPI's OpenAPI schema.

Each answer is computed from ``omi.coordinator.views`` at most once per ``ttl`` seconds and served as
cached bytes in between: a crowd of viewers polling the same run costs the coordinator one query per second,
not one per viewer. Answers are computed in the coordinator's worker thread (``Coordinator.call``), where its
state lives, so the event loop that also carries the volunteers' gRPC calls never waits on the database.
"""

import json
import logging
import math
import time
from collections.abc import Callable
from dataclasses import asdict
from typing import Any

from fastapi import APIRouter, HTTPException, Query, Response
from omi.coordinator import views
from omi.coordinator.core import Coordinator
from omi.coordinator.errors import NotFound

logger = logging.getLogger(__name__)

DEFAULT_TTL = 1.0     # seconds an answer is reused
MAX_ENTRIES = 1024    # cached answers kept at most (the oldest go first)
MAX_BYTES = 64 << 20  # and at most this much JSON: one history answer can be megabytes, and every `since` differs
NOT_FOUND = {404: {"description": "no such run", "content": {"application/json": {"example": {
    "detail": "no run 'x'"}}}}}
NO_DATA_SET = {404: {"description": "no such run, or the run has no prepared data set on this coordinator",
                     "content": {"application/json": {"example": {"detail": (
                         "run 'x' has no prepared data set on this coordinator (its data: builtin:digits)")}}}}}


def _clean(value: Any) -> Any:
    """Non-finite floats become null: JSON has no NaN, and a diverged node may report one."""
    if isinstance(value, float):
        return value if math.isfinite(value) else None
    if isinstance(value, dict):
        return {k: _clean(v) for k, v in value.items()}
    if isinstance(value, list):
        return [_clean(v) for v in value]
    return value


def to_json(view: Any) -> bytes:
    """A view dataclass (or list of them) as compact JSON bytes."""
    data = [asdict(v) for v in view] if isinstance(view, list) else asdict(view)
    return json.dumps(_clean(data), separators=(",", ":")).encode()


class Snapshots:
    """Views and their JSON, reused for ``ttl`` seconds per key.

    :param ttl: seconds a computed view is served before it is computed again
    :param clock: monotonic seconds (tests pass a fake one)
    """

    def __init__(self, ttl: float = DEFAULT_TTL, clock: Callable[[], float] = time.monotonic, *,
                 max_entries: int = MAX_ENTRIES, max_bytes: int = MAX_BYTES):
        assert ttl >= 0, "ttl must be >= 0"
        self.ttl, self.clock, self.max_entries, self.max_bytes = ttl, clock, max_entries, max_bytes
        self._entries: dict[tuple, tuple[float, Any, bytes]] = {}  # oldest first
        self._bytes = 0  # JSON held

    def fresh(self, key: tuple) -> tuple[Any, bytes] | None:
        """(view, its JSON) for ``key`` if the cache has it younger than ``ttl``, else None; never computes."""
        entry = self._entries.get(key)
        if entry is not None and self.clock() - entry[0] < self.ttl:
            return entry[1], entry[2]
        return None

    def get(self, key: tuple, compute: Callable[[], Any]) -> tuple[Any, bytes]:
        """(view, its JSON) for ``key``, from the cache if younger than ``ttl``."""
        cached = self.fresh(key)
        if cached is not None:
            return cached
        now = self.clock()
        view = compute()
        body = to_json(view)
        old = self._entries.pop(key, None)
        self._bytes += len(body) - (len(old[2]) if old else 0)
        self._entries[key] = (now, view, body)
        while len(self._entries) > 1 and (len(self._entries) > self.max_entries or self._bytes > self.max_bytes):
            self._bytes -= len(self._entries.pop(next(iter(self._entries)))[2])  # the oldest answer
        return view, body


def json_response(body: bytes) -> Response:
    # no-cache: browsers revalidate every poll; the server-side snapshot already bounds the cost
    return Response(content=body, media_type="application/json", headers={"Cache-Control": "no-cache"})


def create_router(coordinator: Coordinator, snapshots: Snapshots) -> APIRouter:
    """The ``/api`` routes over ``coordinator`` (every one a GET: the dashboard never changes state).

    :param coordinator: the running coordinator
    :param snapshots: the cache shared with ``/metrics``
    """
    router = APIRouter(prefix="/api", tags=["dashboard API"])

    def known(run: str) -> str:
        if not coordinator.runs.exists(run):
            raise HTTPException(status_code=404, detail=f"no run '{run}'")
        return run

    async def answer(key: tuple, compute: Callable[[], Any]) -> Response:
        # a fresh answer is served from the loop; computing one (and storing it) happens in the worker thread
        cached = snapshots.fresh(key) or await coordinator.call(snapshots.get, key, compute)
        return json_response(cached[1])

    @router.get("/runs", response_model=list[views.RunStatusView], summary="All runs with their headline")
    async def list_runs() -> Response:
        def compute():
            return [views.run_status(coordinator, run) for run in coordinator.runs.run_ids()]
        return await answer(("runs",), compute)

    @router.get("/runs/{run}/status", response_model=views.RunStatusView, responses=NOT_FOUND,
                summary="Headline of a run: state, round, samples, volunteers online, throughput, loss, audits")
    async def run_status(run: str) -> Response:
        known(run)
        return await answer(("status", run), lambda: views.run_status(coordinator, run))

    @router.get("/runs/{run}/history", response_model=views.HistoryView, responses=NOT_FOUND,
                summary="Points of the run's history (loss, throughput, volunteers online) recorded after `since`")
    async def run_history(run: str,
                          since: int = Query(0, ge=0, description="only points with at_ms > since (ms since epoch)"),
                          limit: int = Query(2000, ge=1, le=20000, description="at most this many points")
                          ) -> Response:
        known(run)
        key = ("history", run, since, limit)
        return await answer(key, lambda: views.history(coordinator, run, since, limit))

    @router.get("/runs/{run}/contributors", response_model=list[views.ContributorView], responses=NOT_FOUND,
                summary="Volunteers of the run: samples, verified samples, audits passed/failed, last seen")
    async def run_contributors(run: str) -> Response:
        known(run)
        return await answer(("contributors", run), lambda: views.contributors(coordinator, run))

    @router.get("/runs/{run}/checkpoints", response_model=list[views.CheckpointView], responses=NOT_FOUND,
                summary="Published checkpoints, oldest first, with download URLs, sha256 and preview grid")
    async def run_checkpoints(run: str) -> Response:
        known(run)
        return await answer(("checkpoints", run), lambda: views.checkpoint_views(coordinator, run))

    @router.get("/runs/{run}/data-card", response_model=views.DataCardView, responses=NO_DATA_SET,
                summary="A text-to-image run's prepared data set: its data card, licence tally, refusals, sizes and "
                        "hashes, with links to its manifest.json and DATA_CARD.md")
    async def run_data_card(run: str) -> Response:
        known(run)
        try:
            return await answer(("data-card", run), lambda: views.data_card(coordinator, run))
        except NotFound as e:
            raise HTTPException(status_code=404, detail=str(e)) from None

    return router
