"""The checkpoint manifest's one reader and writer: published manifests still verify, malformed ones name their field.

In-process; the download of a real checkpoint is tests/test_download.py.
"""

import hashlib
import json
import re

import pytest
from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PrivateKey
from omi.protos import signing
from omi.protos.manifest import (
    CHECKPOINT_MANIFEST_NAME,
    MANIFEST_FORMAT,
    MANIFEST_FORMAT_V1,
    CheckpointManifestError,
    canonical_manifest_bytes,
    read_checkpoint_manifest,
    sign_checkpoint_manifest,
    verify_folder,
)

KEY = Ed25519PrivateKey.from_private_bytes(bytes(range(32)))
PUBLIC = signing.public_bytes(KEY)
FIELDS = dict(  # every field the checkpointer writes, the optional ones included
    format=MANIFEST_FORMAT, run_id="digits-captioned", model="sana-digits", round=3, total_samples=1536,
    loss=0.4821, created_at_ms=1765000000000, params_hash="ab" * 32,
    files=[dict(path="preview.png", size=1234, sha256="cd" * 32),
           dict(path="transformer/config.json", size=10, sha256="ef" * 32)],
    contributors=[dict(node_id="n1", display_name="Zoë ✓", samples=1024, verified_samples=512)],
    data_shards=[[0, 2], [5, 5]], data_source="manifest:data/digits-captioned", coordinator_public_key=PUBLIC.hex(),
    data=dict(dataset="digits", manifest_sha256="12" * 32, licenses={"CC-BY-4.0": 64},
              shards=[dict(id=0, file="shards/shard-000000.tar", sha256="34" * 32, samples=64)]),
    preview_prompts=["a zero", "a one"], preview_columns=2, state_hash="56" * 32,
)
# FIELDS as an omi-checkpoint-v1 manifest, which named the round "epoch", and its signature under KEY by the writer
# before the manifest had a type (commit 7a7e202's sign_manifest); Ed25519 signatures are deterministic, so the writer
# of today must give exactly this one.
PUBLISHED_V1 = {**{k: v for k, v in FIELDS.items() if k != "round"}, "format": MANIFEST_FORMAT_V1, "epoch": 3}
SIGNED_BEFORE = ("e0a51465dcdb0f6ea52add5940bfac8ab378aaa68335cf7165508b90a3a9f78ab4a80a68d2e8337496a6598a88901d11a7"
                 "4ff9180db387d68f6f7bac78414c09")


def signed(fields: dict) -> bytes:
    """``fields`` signed as the writer signs, whatever they hold (the writer itself refuses a malformed manifest)."""
    return json.dumps({**fields, "signature": signing.sign_bytes(canonical_manifest_bytes(fields), KEY).hex()}
                      ).encode()


def test_a_manifest_published_before_still_verifies_and_the_writer_writes_the_same_bytes():
    published = (json.dumps({**PUBLISHED_V1, "signature": SIGNED_BEFORE}, indent=2, sort_keys=True,
                            ensure_ascii=False) + "\n").encode()
    manifest = read_checkpoint_manifest(published, PUBLIC)  # a v1 manifest's "epoch" is read as its round
    assert (manifest.round, manifest.contributors[0].display_name, manifest.data.shards[0].id) == (3, "Zoë ✓", 0)
    assert sign_checkpoint_manifest(PUBLISHED_V1, KEY) == (manifest, published)
    assert read_checkpoint_manifest(sign_checkpoint_manifest(FIELDS, KEY)[1], PUBLIC).round == 3
    optional = ("data", "preview_prompts", "preview_columns", "state_hash")
    plain = read_checkpoint_manifest(signed({k: v for k, v in FIELDS.items() if k not in optional}), PUBLIC)
    assert (plain.data, plain.preview_prompts, plain.preview_columns, plain.state_hash) == (None, None, None, None)


@pytest.mark.parametrize("change, field", [
    ({"round": "3"}, "round"),
    ({"loss": "0.48"}, "loss"),
    ({"params_hash": None}, "params_hash"),
    ({"files": [dict(path="../../coordinator_key.pem", size=1, sha256="cd" * 32)]}, "files.0.path"),
    ({"files": [dict(path="/etc/passwd", size=1, sha256="cd" * 32)]}, "files.0.path"),
    ({"files": [dict(path=CHECKPOINT_MANIFEST_NAME, size=1, sha256="cd" * 32)]}, "files"),
    ({"files": [dict(path="preview.png", size=1)]}, "files.0.sha256"),
    ({"contributors": [dict(node_id="n1", samples=1, verified_samples=0)]}, "contributors.0.display_name"),
    ({"data_shards": [[0]]}, "data_shards.0"),
    ({"format": "omi-checkpoint-v3"}, "format"),
    ({"epoch": 3}, "epoch"),  # only a v1 manifest names the round so
    ({"surprise": 1}, "surprise"),
])
def test_a_malformed_manifest_is_refused_naming_its_field(change, field):
    with pytest.raises(CheckpointManifestError, match=rf"^not a checkpoint manifest: {re.escape(field)}: "):
        read_checkpoint_manifest(signed({**FIELDS, **change}), PUBLIC)
    with pytest.raises(CheckpointManifestError, match=re.escape(field)):
        sign_checkpoint_manifest({**FIELDS, **change}, KEY)


def test_a_missing_field_is_named():
    with pytest.raises(CheckpointManifestError, match=r"^not a checkpoint manifest: created_at_ms: Field required"):
        read_checkpoint_manifest(signed({k: v for k, v in FIELDS.items() if k != "created_at_ms"}), PUBLIC)


def test_an_edited_a_foreign_or_an_unsigned_manifest_is_refused():
    _, data = sign_checkpoint_manifest(FIELDS, KEY)
    edited = data.replace(b'"total_samples": 1536', b'"total_samples": 2536')
    assert edited != data
    unsigned = json.dumps(FIELDS).encode()
    for bad, public_key in [(edited, PUBLIC), (data, signing.public_bytes(signing.generate_key())), (unsigned, PUBLIC)]:
        with pytest.raises(CheckpointManifestError, match="signature does not verify"):
            read_checkpoint_manifest(bad, public_key)
    for not_json in (b"{", b"\xff", b"[1, 2]"):
        with pytest.raises(CheckpointManifestError, match="^not a checkpoint manifest: not"):
            read_checkpoint_manifest(not_json, PUBLIC)


def test_a_folder_verifies_only_with_every_file_it_lists(tmp_path):
    (tmp_path / "unet").mkdir()
    (tmp_path / "unet" / "weights.bin").write_bytes(b"weights")
    files = [dict(path="unet/weights.bin", size=7, sha256=hashlib.sha256(b"weights").hexdigest())]
    (tmp_path / CHECKPOINT_MANIFEST_NAME).write_bytes(sign_checkpoint_manifest({**FIELDS, "files": files}, KEY)[1])
    assert verify_folder(tmp_path, PUBLIC).files[0].path == "unet/weights.bin"
    (tmp_path / "unet" / "weights.bin").write_bytes(b"weightz")
    assert verify_folder(tmp_path, PUBLIC) is None
    (tmp_path / "unet" / "weights.bin").unlink()
    assert verify_folder(tmp_path, PUBLIC) is None
