"""HTTP download routes of published checkpoints (on the coordinator's HTTP port, beside the dashboard).

    GET /runs/{run}/checkpoints                           the run's checkpoints (JSON, oldest first)
    GET /runs/{run}/checkpoints/{round|latest}/manifest.json
    GET /runs/{run}/checkpoints/{round|latest}/{file}     a file the manifest lists; ``Range`` requests honoured
    GET /runs/{run}/data/{file}                           a text-to-image run's prepared data set: its
                                                          manifest.json, the files it lists (shards) and
                                                          DATA_CARD.md

Only checkpoints listed in the ``checkpoints`` table are served, and of them only the files their manifest
names, so a checkpoint being written (a temporary folder) or a path outside it is never reachable. Byte ranges
are Starlette's ``FileResponse`` (206 with ``Content-Range``, 416 past the end), which is what lets
``omi-node download`` resume.
"""

import logging

from fastapi import APIRouter, HTTPException
from fastapi.responses import FileResponse
from google.protobuf import json_format
from omi.coordinator.core import Coordinator
from omi.coordinator.errors import NotFound
from omi.coordinator.views import checkpoint_manifest
from omi.protos import pb
from omi.protos.dataset import DATA_CARD_NAME, DATASET_MANIFEST_NAME, ManifestError, read_manifest
from omi.protos.manifest import CHECKPOINT_MANIFEST_NAME

logger = logging.getLogger(__name__)


def checkpoint_router(coordinator: Coordinator) -> APIRouter:
    """The download routes of ``coordinator``'s checkpoints.

    :param coordinator: the running coordinator (its ``checkpoints`` must have a state dir)
    """
    router = APIRouter()
    checkpoints = coordinator.checkpoints

    def find(run_id: str, ref: str) -> pb.Checkpoint:
        if ref != "latest" and not ref.isdigit():
            raise HTTPException(404, f"checkpoint must be a round number or 'latest', got {ref!r}")
        try:
            checkpoint = checkpoints.get(run_id, None if ref == "latest" else int(ref))
        except NotFound as e:
            raise HTTPException(404, str(e)) from None
        if checkpoint is None:
            raise HTTPException(404, f"run {run_id!r} has no checkpoint {ref}")
        return checkpoint

    @router.get("/runs/{run_id}/checkpoints")
    def list_checkpoints(run_id: str) -> list[dict]:
        try:
            listed = checkpoints.list(run_id)
        except NotFound as e:
            raise HTTPException(404, str(e)) from None
        return [json_format.MessageToDict(c, preserving_proto_field_name=True,
                                          always_print_fields_with_no_presence=True) for c in listed]

    @router.get("/runs/{run_id}/checkpoints/{ref}/manifest.json")
    def manifest(run_id: str, ref: str) -> FileResponse:
        checkpoint = find(run_id, ref)
        path = checkpoints.folder(run_id, checkpoint.round) / CHECKPOINT_MANIFEST_NAME
        if not path.is_file():  # retention removed it between the lookup and now
            raise HTTPException(404, f"checkpoint {checkpoint.round} of run {run_id!r} is gone")
        return FileResponse(path, media_type="application/json")

    @router.get("/runs/{run_id}/checkpoints/{ref}/{file_path:path}")
    def checkpoint_file(run_id: str, ref: str, file_path: str) -> FileResponse:
        checkpoint = find(run_id, ref)
        folder = checkpoints.folder(run_id, checkpoint.round)
        manifest = checkpoint_manifest(folder, checkpoint.manifest_sha256, coordinator.public_key)
        if manifest is None:
            raise HTTPException(404, f"checkpoint {checkpoint.round} of run {run_id!r} is gone (or its manifest does "
                                     "not verify)")
        listed = {entry.path for entry in manifest.files}
        if file_path not in listed:
            raise HTTPException(404, f"checkpoint {checkpoint.round} of run {run_id!r} has no file {file_path!r}")
        return FileResponse(folder / file_path, media_type="application/octet-stream")

    @router.get("/runs/{run_id}/data/{file_path:path}")
    def data_file(run_id: str, file_path: str) -> FileResponse:
        try:
            folder = coordinator.runs.data_folder(run_id)
        except NotFound as e:
            raise HTTPException(404, str(e)) from None
        if folder is None:
            raise HTTPException(404, f"run {run_id!r} has no prepared data set here")
        try:
            manifest = read_manifest(folder)
        except ManifestError as e:
            raise HTTPException(404, str(e)) from None
        listed = {DATASET_MANIFEST_NAME, DATA_CARD_NAME, manifest.null_caption.file,
                  *(shard.file for shard in manifest.shards)}
        if file_path not in listed or not (folder / file_path).is_file():
            raise HTTPException(404, f"the data set of run {run_id!r} has no file {file_path!r}")
        if file_path == DATA_CARD_NAME:  # text, so that the dashboard's link opens it in the browser
            return FileResponse(folder / file_path, media_type="text/plain; charset=utf-8")
        return FileResponse(folder / file_path, media_type="application/octet-stream")

    return router
