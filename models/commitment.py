"""Commitment to a node's micro-batch records: canonical bytes and a SHA-256 Merkle tree (RFC 6962 shape).

A node sends only the Merkle root with its Contribution; when the auditor picks micro-batches, the node (or the
validator's recomputation) is checked against that root, so records cannot be changed after the fact.

>>> import torch
>>> records = [MicroBatchRecord(i, 32, 0.5, 1.0, torch.zeros(4)) for i in range(5)]
>>> root = merkle_root(records)
>>> verify_proof(root, records[3], merkle_proof(records, 3))
True
>>> verify_proof(root, records[2], merkle_proof(records, 3))
False
"""

import hashlib
import logging
import struct
from dataclasses import dataclass

import torch
from omi.models.microbatch import MicroBatchRecord

logger = logging.getLogger(__name__)

RECORD_MAGIC = b"omi-mbr-v1"
# Domain separation (RFC 6962): a leaf can never be mistaken for an inner node.
_LEAF, _NODE = b"\x00", b"\x01"


def record_bytes(record: MicroBatchRecord) -> bytes:
    """Canonical bytes of a record: magic, index u32, samples u32, loss f64, grad_norm f64, sketch f32[] (LE)."""
    sketch = record.sketch.detach().to("cpu", torch.float32).contiguous().reshape(-1)
    return (
        RECORD_MAGIC
        + struct.pack("<IIddI", record.index, record.samples, record.loss, record.grad_norm, sketch.numel())
        + sketch.numpy().astype("<f4").tobytes()
    )


def leaf_hash(leaf: MicroBatchRecord | bytes) -> bytes:
    """Hash of one leaf: a record, or its canonical bytes."""
    data = record_bytes(leaf) if isinstance(leaf, MicroBatchRecord) else bytes(leaf)
    return hashlib.sha256(_LEAF + data).digest()


def _node_hash(left: bytes, right: bytes) -> bytes:
    return hashlib.sha256(_NODE + left + right).digest()


def _split(n: int) -> int:
    """Largest power of two smaller than n (n >= 2): RFC 6962's split, so no leaf is ever duplicated."""
    k = 1
    while k * 2 < n:
        k *= 2
    return k


def _root(hashes: list[bytes]) -> bytes:
    if len(hashes) == 1:
        return hashes[0]
    k = _split(len(hashes))
    return _node_hash(_root(hashes[:k]), _root(hashes[k:]))


def merkle_root(records: list[MicroBatchRecord | bytes]) -> bytes:
    """Merkle root over the records in order; the root of no records is SHA-256 of nothing."""
    if not records:
        return hashlib.sha256(b"").digest()
    return _root([leaf_hash(r) for r in records])


@dataclass(frozen=True)
class MerkleProof:
    """The audit path of one leaf: sibling hashes from the leaf up, each with the side it sits on."""

    index: int  # the leaf's position
    size: int  # number of leaves in the tree
    siblings: tuple[tuple[str, bytes], ...]  # ("L" | "R", hash), leaf level first


def merkle_proof(records: list[MicroBatchRecord | bytes], i: int) -> MerkleProof:
    """The proof that ``records[i]`` is under ``merkle_root(records)``."""
    if not 0 <= i < len(records):
        raise IndexError(f"leaf {i} out of range for {len(records)} records")
    hashes = [leaf_hash(r) for r in records]
    siblings = [(side, _root(hashes[lo:hi])) for side, lo, hi in _path(i, len(hashes))]
    return MerkleProof(index=i, size=len(records), siblings=tuple(siblings))


def _path(index: int, size: int) -> list[tuple[str, int, int]]:
    """Side and leaf range of every sibling subtree on the way from leaf ``index`` up to the root."""
    path: list[tuple[str, int, int]] = []
    lo, hi = 0, size
    # Walk down from the root, remembering the sibling subtree at each split; the proof lists them bottom-up.
    while hi - lo > 1:
        k = _split(hi - lo)
        if index - lo < k:
            path.append(("R", lo + k, hi))
            hi = lo + k
        else:
            path.append(("L", lo, lo + k))
            lo = lo + k
    return list(reversed(path))


def verify_proof(root: bytes, leaf: MicroBatchRecord | bytes, proof: MerkleProof) -> bool:
    """True when ``leaf`` (a record or its canonical bytes) sits at ``proof.index`` of the tree under ``root``.

    The sides in the proof must be the ones that position implies, so a proof cannot move a leaf elsewhere.
    """
    if not 0 <= proof.index < proof.size:
        return False
    expected_sides = [side for side, _, _ in _path(proof.index, proof.size)]
    if [side for side, _ in proof.siblings] != expected_sides:
        return False
    current = leaf_hash(leaf)
    for side, sibling in proof.siblings:
        current = _node_hash(sibling, current) if side == "L" else _node_hash(current, sibling)
    return current == root
