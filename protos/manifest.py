"""The checkpoint manifest (``manifest.json``): its fields, its canonical bytes and the coordinator's signature.

The coordinator's checkpointer signs and writes it (:func:`sign_checkpoint_manifest`); ``omi-node download``, the
coordinator's repair and its dashboard read it with one reader (:func:`read_checkpoint_manifest`), which refuses it
unless the signature verifies and every field has its type. On disk a manifest is a JSON object; its canonical
bytes are the UTF-8 JSON of that object without its ``signature`` key, keys sorted, no whitespace. ``signature`` is
the hex Ed25519 signature of those bytes, so any edit of any other key (a hash, a size, the round, a contributor)
breaks it, whatever the file's formatting. The signature is checked over the JSON object as it was read, never
over a re-serialized :class:`CheckpointManifest`.

>>> from omi.protos import signing
>>> key = signing.generate_key()
>>> fields = dict(format=MANIFEST_FORMAT, run_id="digits", model="unet-digits-16", round=5, total_samples=640,
...     loss=0.25, created_at_ms=1_700_000_000_000, params_hash="0" * 64, files=[], contributors=[], data_shards=[],
...     data_source="digits", coordinator_public_key=signing.public_bytes(key).hex())
>>> manifest, data = sign_checkpoint_manifest(fields, key)
>>> read_checkpoint_manifest(data, signing.public_bytes(key)).round
5
>>> read_checkpoint_manifest(data.replace(b'"round": 5', b'"round": 6'), signing.public_bytes(key))
Traceback (most recent call last):
...
omi.protos.manifest.CheckpointManifestError: the manifest's signature does not verify under the coordinator's key ...
>>> sign_checkpoint_manifest({**fields, "round": "5"}, key)
Traceback (most recent call last):
...
omi.protos.manifest.CheckpointManifestError: not a checkpoint manifest: round: Input should be a valid integer
"""

import json
import logging
from pathlib import Path
from typing import Annotated, Any, Literal

from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PrivateKey
from omi.protos import signing
from omi.protos.files import RelativePath, Sha256, sha256_file
from pydantic import BaseModel, ConfigDict, Field, ValidationError, field_validator, model_validator

logger = logging.getLogger(__name__)

CHECKPOINT_MANIFEST_NAME = "manifest.json"  # in the checkpoint folder, beside the files it lists
MANIFEST_FORMAT = "omi-checkpoint-v2"
# v1 called the round "epoch"; milestones are kept for ever, so v1 manifests stay readable (as their round)
MANIFEST_FORMAT_V1 = "omi-checkpoint-v1"
SIGNATURE_KEY = "signature"

# strict: a JSON string is never taken for a number, nor a number for a string
_STRICT = ConfigDict(extra="forbid", strict=True, frozen=True, allow_inf_nan=False)
Count = Annotated[int, Field(ge=0)]


class CheckpointManifestError(ValueError):
    """A checkpoint manifest that cannot be used: not JSON, not signed by the expected key, or a field missing or of
    the wrong type (the message names it)."""


class CheckpointFile(BaseModel):
    """A file of the checkpoint folder: its path inside the folder, size and sha256."""

    model_config = _STRICT
    path: RelativePath
    size: Count
    sha256: Sha256


class Contributor(BaseModel):
    """A volunteer whose contributions trained the checkpoint (the ledger's sums, voided work left out)."""

    model_config = _STRICT
    node_id: str
    display_name: str
    samples: Count
    verified_samples: Count  # of ``samples``, those a validator's verdict verified


class ProvenanceShard(BaseModel):
    """A prepared shard of the data set that holds samples the checkpoint trained on."""

    model_config = _STRICT
    id: Count
    file: str
    sha256: Sha256
    samples: Count


class DataProvenance(BaseModel):
    """What a text-to-image checkpoint trained on (:meth:`omi.models.latent_source.LatentShardSource.provenance`)."""

    model_config = _STRICT
    dataset: str  # the data set's name
    manifest_sha256: Sha256  # of the data set's manifest
    shards: list[ProvenanceShard]
    licenses: dict[str, Count]  # licence -> samples of those shards


class CheckpointManifest(BaseModel):
    """``manifest.json`` of a checkpoint folder, as the checkpointer writes it (``format`` omi-checkpoint-v2; a
    v1 manifest, whose ``round`` was named ``epoch``, is read as well)."""

    model_config = _STRICT
    format: Literal["omi-checkpoint-v1", "omi-checkpoint-v2"]
    run_id: str
    model: str  # the registry model of the run
    round: Count  # the round of the parameters θ
    total_samples: Count  # samples of the contributions to earlier rounds (voided ones left out)
    loss: float | None  # sample-weighted mean loss of the last round with contributions; None before any
    created_at_ms: int
    params_hash: Sha256  # omi.models.params_hash of the saved model
    files: list[CheckpointFile]  # every file of the folder but the manifest
    contributors: list[Contributor]  # most samples first
    data_shards: list[Annotated[list[Count], Field(min_length=2, max_length=2)]]  # [first, last] work-shard runs
    data_source: str  # the run's [data] source
    coordinator_public_key: Annotated[str, Field(pattern=r"^[0-9a-f]{64}$")]  # raw Ed25519, hex
    data: DataProvenance | None = None  # a text-to-image run's data set
    preview_prompts: list[str] | None = None  # the prompt of each preview cell, in grid order (text-to-image runs)
    preview_columns: Annotated[int, Field(gt=0)] | None = None  # cells per row of the preview grid
    state_hash: Sha256 | None = None  # the witness's θ hash of the round (omi.swarm.diloco.theta_hash)
    signature: Annotated[str, Field(pattern=r"^[0-9a-f]{128}$")]  # Ed25519 over the canonical bytes, hex

    @model_validator(mode="before")
    @classmethod
    def _v1_named_the_round_epoch(cls, manifest: Any) -> Any:
        # only the field's name changed; the signature was checked over the JSON object as read, before this
        if isinstance(manifest, dict) and manifest.get("format") == MANIFEST_FORMAT_V1 and "epoch" in manifest:
            return {("round" if key == "epoch" else key): value for key, value in manifest.items()}
        return manifest

    @field_validator("files")
    @classmethod
    def _not_itself(cls, files: list[CheckpointFile]) -> list[CheckpointFile]:
        if any(entry.path == CHECKPOINT_MANIFEST_NAME for entry in files):
            raise ValueError(f"a manifest never lists {CHECKPOINT_MANIFEST_NAME} itself")
        return files


def canonical_manifest_bytes(manifest: dict[str, Any]) -> bytes:
    """UTF-8 JSON of ``manifest`` without its signature: sorted keys, no whitespace."""
    body = {k: v for k, v in manifest.items() if k != SIGNATURE_KEY}
    return json.dumps(body, sort_keys=True, separators=(",", ":"), ensure_ascii=False, allow_nan=False).encode()


def verify_manifest(manifest: dict[str, Any], public_key: bytes) -> bool:
    """True if ``manifest["signature"]`` signs the canonical bytes of the JSON object ``manifest`` (as read from
    ``manifest.json``) under the raw Ed25519 ``public_key``."""
    signature = manifest.get(SIGNATURE_KEY)
    if not isinstance(signature, str):
        return False
    try:
        raw = bytes.fromhex(signature)
        data = canonical_manifest_bytes(manifest)
    except (ValueError, TypeError):
        return False
    return signing.verify_bytes(data, raw, public_key)


def read_checkpoint_manifest(data: bytes, public_key: bytes) -> CheckpointManifest:
    """The manifest in ``data`` (the bytes of a ``manifest.json``), refused with :class:`CheckpointManifestError`
    unless it is signed by the raw Ed25519 ``public_key`` and every field has its type."""
    try:
        manifest = json.loads(data)
    except ValueError as e:  # also a UnicodeDecodeError
        raise CheckpointManifestError(f"not a checkpoint manifest: not JSON ({e})") from None
    if not isinstance(manifest, dict):
        raise CheckpointManifestError("not a checkpoint manifest: not a JSON object")
    if not verify_manifest(manifest, public_key):
        raise CheckpointManifestError("the manifest's signature does not verify under the coordinator's key "
                                      f"{public_key.hex()[:16]}…")
    try:
        return CheckpointManifest.model_validate(manifest)
    except ValidationError as e:
        problems = "; ".join(f"{'.'.join(str(p) for p in err['loc']) or 'manifest'}: {err['msg']}"
                             for err in e.errors())
        raise CheckpointManifestError(f"not a checkpoint manifest: {problems}") from None


def manifest_to_bytes(manifest: dict[str, Any]) -> bytes:
    """How ``manifest.json`` is written: indented for people, the signature does not depend on it."""
    return (json.dumps(manifest, indent=2, sort_keys=True, ensure_ascii=False, allow_nan=False) + "\n").encode()


def sign_checkpoint_manifest(fields: dict[str, Any], key: Ed25519PrivateKey) -> tuple[CheckpointManifest, bytes]:
    """The signed manifest of ``fields`` (JSON values of every :class:`CheckpointManifest` field but ``signature``)
    and the bytes of its ``manifest.json``; :class:`CheckpointManifestError` names a field that is wrong.

    The manifest returned is read back from those bytes by :func:`read_checkpoint_manifest`: what the writer
    holds is what every reader will get.
    """
    signed = {**fields, SIGNATURE_KEY: signing.sign_bytes(canonical_manifest_bytes(fields), key).hex()}
    data = manifest_to_bytes(signed)
    return read_checkpoint_manifest(data, signing.public_bytes(key)), data


def verify_folder(folder: str | Path, public_key: bytes) -> CheckpointManifest | None:
    """The checkpoint folder's manifest if it is signed by ``public_key`` and every file it lists is there with its
    size and sha256; else None."""
    try:
        manifest = read_checkpoint_manifest((Path(folder) / CHECKPOINT_MANIFEST_NAME).read_bytes(), public_key)
    except (OSError, CheckpointManifestError) as e:
        logger.info("%s: %s", folder, e)
        return None
    for entry in manifest.files:
        path = Path(folder) / entry.path
        if not path.is_file() or path.stat().st_size != entry.size or sha256_file(path) != entry.sha256:
            logger.info("%s: %s is not the file its manifest lists", folder, entry.path)
            return None
    return manifest
