"""libp2p identities for benchmarks that register many volunteers, cached on disk.

A registration proves a libp2p key (one peer id, one node: ``omi.protos.peer_ids``), and an RSA-2048 key takes
~50 ms to make: 10,000 volunteers would spend minutes on keys before the load starts. The keys are made once, in
parallel, and kept in ``~/.cache/omi-swarm/bench-peer-identities.bin`` (length-prefixed identity files' bytes).
"""

import multiprocessing
import os
from pathlib import Path

from omi.protos.peer_ids import new_identity

CACHE = Path(os.environ.get("XDG_CACHE_HOME", Path.home() / ".cache")) / "omi-swarm" / "bench-peer-identities.bin"


def _read(path: Path) -> list[bytes]:
    data, found, position = path.read_bytes() if path.exists() else b"", [], 0
    while position + 4 <= len(data):
        length = int.from_bytes(data[position:position + 4], "big")
        if position + 4 + length > len(data):
            break  # a write cut short: the rest is made again
        found.append(data[position + 4:position + 4 + length])
        position += 4 + length
    return found


def _make(_: int) -> bytes:
    return new_identity()


def identities(count: int) -> list[bytes]:
    """``count`` distinct libp2p identities (identity files' bytes), made once and cached."""
    cached = _read(CACHE)
    if len(cached) < count:
        missing = count - len(cached)
        print(f"making {missing} libp2p identities (once; cached in {CACHE}) ...", flush=True)
        with multiprocessing.get_context("spawn").Pool() as pool:
            made = pool.map(_make, range(missing), chunksize=64)
        CACHE.parent.mkdir(parents=True, exist_ok=True)
        with CACHE.open("ab") as f:
            for identity in made:
                f.write(len(identity).to_bytes(4, "big") + identity)
        cached += made
    return cached[:count]
