"""The checkpoint manifest (``manifest.json``): canonical bytes and the coordinator's Ed25519 signature over them.

Shared by the coordinator's checkpointer (which signs) and ``omi-node download`` (which verifies). A manifest is a
JSON object; its canonical bytes are the UTF-8 JSON of the object without its ``signature`` key, keys sorted, no
whitespace. ``signature`` is the hex Ed25519 signature of those bytes, so any edit of any other key (a hash, a
size, the epoch, a contributor) breaks it, whatever the file's formatting.

>>> from omi.protos import signing
>>> key = signing.generate_key()
>>> manifest = sign_manifest({"run_id": "digits", "epoch": 5, "files": []}, key)
>>> verify_manifest(manifest, signing.public_bytes(key))
True
>>> verify_manifest({**manifest, "epoch": 6}, signing.public_bytes(key))
False
"""

import hashlib
import json
import logging
from pathlib import Path
from typing import Any

from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PrivateKey
from omi.protos import signing

logger = logging.getLogger(__name__)

MANIFEST_FILENAME = "manifest.json"
MANIFEST_FORMAT = "omi-checkpoint-v1"
SIGNATURE_KEY = "signature"
HASH_CHUNK = 1 << 20  # bytes read at a time when hashing a file


def canonical_manifest_bytes(manifest: dict[str, Any]) -> bytes:
    """UTF-8 JSON of ``manifest`` without its signature: sorted keys, no whitespace."""
    body = {k: v for k, v in manifest.items() if k != SIGNATURE_KEY}
    return json.dumps(body, sort_keys=True, separators=(",", ":"), ensure_ascii=False, allow_nan=False).encode()


def sign_manifest(manifest: dict[str, Any], key: Ed25519PrivateKey) -> dict[str, Any]:
    """A copy of ``manifest`` with ``signature`` set to the hex signature of its canonical bytes."""
    return {**manifest, SIGNATURE_KEY: signing.sign_bytes(canonical_manifest_bytes(manifest), key).hex()}


def verify_manifest(manifest: dict[str, Any], public_key: bytes) -> bool:
    """True if ``manifest["signature"]`` signs its canonical bytes under the raw Ed25519 ``public_key``."""
    signature = manifest.get(SIGNATURE_KEY)
    if not isinstance(signature, str):
        return False
    try:
        raw = bytes.fromhex(signature)
        data = canonical_manifest_bytes(manifest)
    except (ValueError, TypeError):
        return False
    return signing.verify_bytes(data, raw, public_key)


def manifest_to_bytes(manifest: dict[str, Any]) -> bytes:
    """How ``manifest.json`` is written: indented for people, the signature does not depend on it."""
    return (json.dumps(manifest, indent=2, sort_keys=True, ensure_ascii=False, allow_nan=False) + "\n").encode()


def sha256_file(path: Path) -> str:
    """Hex sha256 of a file, read in chunks."""
    digest = hashlib.sha256()
    with open(path, "rb") as f:
        while chunk := f.read(HASH_CHUNK):
            digest.update(chunk)
    return digest.hexdigest()


def verify_folder(folder: Path, public_key: bytes) -> dict | None:
    """The checkpoint folder's manifest if it is signed by ``public_key`` and every file it lists is there with its
    size and sha256; else None."""
    try:
        manifest = json.loads((Path(folder) / MANIFEST_FILENAME).read_bytes())
    except (OSError, ValueError):
        return None
    if not isinstance(manifest, dict) or not verify_manifest(manifest, public_key):
        return None
    for entry in manifest.get("files", []):
        path = Path(folder) / entry["path"]
        if not path.is_file() or path.stat().st_size != entry["size"] or sha256_file(path) != entry["sha256"]:
            return None
    return manifest
