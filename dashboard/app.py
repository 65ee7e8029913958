"""The dashboard's FastAPI app: health and a JSON list of runs, read from the coordinator's domain objects."""

import logging

from fastapi import FastAPI
from google.protobuf import json_format
from omi.coordinator.core import Coordinator

logger = logging.getLogger(__name__)


def create_app(coordinator: Coordinator) -> FastAPI:
    """The HTTP side of ``omi-coordinator serve``.

    :param coordinator: the running coordinator whose runs are shown
    """
    app = FastAPI(title="omi-swarm dashboard")

    @app.get("/healthz")
    async def healthz() -> dict:
        return {"status": "ok"}

    @app.get("/api/runs")
    async def runs() -> list[dict]:  # async: reads the coordinator in its own event loop
        return [json_format.MessageToDict(summary, preserving_proto_field_name=True,
                                          always_print_fields_with_no_presence=True)
                for summary in coordinator.list_runs()]

    return app
