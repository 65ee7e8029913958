"""The dashboard's FastAPI app: the page (``/``, ``/runs/{run}``), its JSON API, Prometheus ``/metrics``, health."""

import logging
import time
from collections.abc import Callable
from pathlib import Path

from fastapi import FastAPI, Response
from fastapi.responses import FileResponse
from fastapi.staticfiles import StaticFiles
from omi.coordinator import views
from omi.coordinator.core import Coordinator
from omi.dashboard.api import Snapshots, create_router
from omi.dashboard.downloads import checkpoint_router
from omi.dashboard.metrics import RunCollector
from prometheus_client import CONTENT_TYPE_LATEST, CollectorRegistry, generate_latest

logger = logging.getLogger(__name__)

STATIC = Path(__file__).resolve().parent / "static"


def create_app(coordinator: Coordinator, *, clock: Callable[[], float] = time.monotonic) -> FastAPI:
    """The HTTP side of ``omi-coordinator serve``.

    :param coordinator: the running coordinator whose runs are shown
    :param clock: monotonic seconds that the API's reused answers age by (:class:`~omi.dashboard.api.Snapshots`)
    """
    app = FastAPI(title="omi-swarm dashboard", description="Community training progress: read-only JSON API, "
                  "Prometheus metrics and a live page.")
    snapshots = Snapshots(clock=clock)
    app.include_router(create_router(coordinator, snapshots))
    app.include_router(checkpoint_router(coordinator))  # /runs/{run}/checkpoints/...: downloads (issue 5)
    registry = CollectorRegistry(auto_describe=False)
    # /metrics reads the API's cached status, so a scrape and the API show the same figures
    registry.register(RunCollector(coordinator, lambda run: snapshots.get(
        ("status", run), lambda: views.run_status(coordinator, run))[0]))
    app.mount("/static", StaticFiles(directory=STATIC), name="static")

    @app.get("/healthz", include_in_schema=False)
    async def healthz() -> dict:
        return {"status": "ok"}

    @app.get("/metrics", summary="Prometheus metrics of every run", response_class=Response,
             responses={200: {"content": {CONTENT_TYPE_LATEST: {}}}})
    async def metrics() -> Response:
        # collected in the coordinator's worker thread, like the API's answers (they share the snapshots)
        return Response(await coordinator.call(generate_latest, registry), media_type=CONTENT_TYPE_LATEST)

    @app.get("/", include_in_schema=False)
    async def all_runs_page() -> FileResponse:
        return FileResponse(STATIC / "index.html")

    @app.get("/runs/{run}", include_in_schema=False)
    async def run_page(run: str) -> FileResponse:
        # an unknown run still gets the page (it says so, from the API's 404) but with the right status
        return FileResponse(STATIC / "index.html", status_code=200 if coordinator.runs.exists(run) else 404)

    return app
