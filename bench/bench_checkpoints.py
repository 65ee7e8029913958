"""Checkpoint write time and download throughput for ``unet-64`` on loopback, against a plain copy of the same bytes.

    .venv/bin/python -m bench.bench_checkpoints            # writes the "checkpoints" section of docs/benchmarks.md

1. write: ``write_checkpoint`` (diffusers ``save_pretrained`` + sha256 of every file + signed manifest + fsync +
   rename; no preview grid, which is sampling, not I/O) against ``shutil.copyfile`` + fsync of the same files;
2. download: ``omi-node download``'s ``download_checkpoint`` from a real ``omi-coordinator serve`` over loopback HTTP
   (hashing while it writes, then rename) against the same plain copy.
"""

import logging
import os
import shutil
import socket
import subprocess
import sys
import tempfile
import time
import urllib.request
from pathlib import Path

from omi.coordinator.checkpointer import write_checkpoint
from omi.coordinator.core import Coordinator
from omi.models import build_model
from omi.node.download import download_checkpoint
from omi.protos import signing

from bench.report import write_section

logger = logging.getLogger(__name__)

MODEL = "unet-64"
REPEATS = 3
RUN = '[run]\nid = "bench"\nmodel = "unet-64"\n[data]\nresolution = 64\n[checkpoints]\nkeep = 10\n'


def plain_copy(source: Path, target: Path) -> float:
    """Seconds to copy every file of ``source`` to ``target`` and fsync them."""
    started = time.perf_counter()
    for path in sorted(source.rglob("*")):
        if path.is_file():
            out = target / path.relative_to(source)
            out.parent.mkdir(parents=True, exist_ok=True)
            shutil.copyfile(path, out)
            fd = os.open(out, os.O_RDONLY)
            os.fsync(fd)
            os.close(fd)
    return time.perf_counter() - started


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def main() -> None:
    logging.basicConfig(level=logging.WARNING)
    work = Path(tempfile.mkdtemp(prefix="bench-checkpoints-"))
    state = work / "state"
    coordinator = Coordinator.open(state)  # checkpoint folders under state/checkpoints
    coordinator.runs.create(RUN, start=True)
    spec = coordinator.runs.spec_for_nodes("bench")
    model, scheduler = build_model(MODEL)
    writes, copies = [], []
    for round_number in range(1, REPEATS + 1):
        started = time.perf_counter()
        folder, manifest = write_checkpoint(model, scheduler, spec=spec, round_number=round_number, key=coordinator.key,
                                            run_folder=coordinator.checkpoints.run_folder("bench"),
                                            checkpoints=coordinator.checkpoints, preview=False)
        writes.append(time.perf_counter() - started)
        coordinator.checkpoints.publish("bench", round_number, folder, manifest)
        copies.append(plain_copy(folder, work / f"copy-{round_number}"))
    size = sum(entry.size for entry in manifest.files)
    key = signing.public_bytes(coordinator.key)
    coordinator.close()

    http_port, grpc_port = free_port(), free_port()
    server = subprocess.Popen([Path(sys.executable).parent / "omi-coordinator", "serve", "--state-dir", state,
                               "--grpc", f"127.0.0.1:{grpc_port}", "--http", f"127.0.0.1:{http_port}",
                               "--swarm-host", "", "--no-validator", "--log-level", "WARNING"])
    try:
        base = f"http://127.0.0.1:{http_port}"
        deadline = time.monotonic() + 60
        while True:
            try:
                urllib.request.urlopen(f"{base}/healthz", timeout=1)
                break
            except OSError:
                assert time.monotonic() < deadline, "serve did not come up"
                time.sleep(0.2)
        downloads = []
        for i in range(REPEATS):
            result = download_checkpoint(f"{base}/runs/bench/checkpoints/{REPEATS}", "bench", work / f"dl-{i}", key,
                                         progress=False)
            downloads.append(result.seconds)
    finally:
        server.terminate()
        server.wait(timeout=30)
    shutil.rmtree(work, ignore_errors=True)

    mib = size / 2**20
    write, copy, download = min(writes), min(copies), min(downloads)
    rows = [
        ("checkpoint write (save_pretrained + sha256 + signed manifest + fsync + rename)", write),
        ("plain copy of the same files (+ fsync)", copy),
        ("download over loopback HTTP (sha256 while writing, signature check)", download),
    ]
    table = "| operation | best of 3 | MiB/s | vs plain copy |\n|---|---|---|---|\n" + "\n".join(
        f"| {name} | {seconds:.2f} s | {mib / seconds:.0f} | {seconds / copy:.2f}× |" for name, seconds in rows)
    body = (f"`{MODEL}`: {len(manifest.files)} files, {mib:.0f} MiB (float32 safetensors). "
            f"`python -m bench.bench_checkpoints`; the preview grid is not included (it is sampling, not I/O).\n\n"
            f"{table}\n\nAll runs: write {', '.join(f'{s:.2f}' for s in writes)} s; copy "
            f"{', '.join(f'{s:.2f}' for s in copies)} s; download {', '.join(f'{s:.2f}' for s in downloads)} s.")
    print(body)
    write_section("checkpoints", "Checkpoints: write and download (unet-64, loopback)", body)


if __name__ == "__main__":
    main()
