"""`omi-node download` against a real coordinator's HTTP port: verification, refusals, Range and resume.

The checkpoints are written by the checkpointer's own writer (`write_checkpoint` + `Checkpoints.publish`) into a
state dir that a real `omi-coordinator serve` (no swarm) then serves; the swarm side is in test_checkpoints.py.
"""

import hashlib
import json
import re
import threading
import urllib.request

import pytest
import torch
from coordinator_helpers import TcpRelay
from omi.coordinator.checkpointer import write_checkpoint
from omi.coordinator.checkpoints import CHECKPOINTS_DIR, folder_name
from omi.coordinator.core import Coordinator
from omi.models import build_model
from omi.protos import signing
from omi.protos.manifest import verify_manifest
from processes import ROOT, ServeProcess, fast_run, kill_group, run_node, wait_until

pytestmark = [pytest.mark.slow]

WEIGHTS = "unet/diffusion_pytorch_model.safetensors"


def publish_checkpoints(state_dir, run_file, rounds, model="unet-digits-16", run_id="digits"):
    """Write and list checkpoints of the run at ``rounds`` the way the checkpointer does."""
    coordinator = Coordinator.open(state_dir)
    coordinator.checkpoints.state_dir = state_dir
    coordinator.runs.create(run_file.read_text(), start=True)
    spec = coordinator.runs.spec_for_nodes(run_id)
    unet, scheduler = build_model(model)
    for round_number in rounds:
        with torch.no_grad():
            for p in unet.parameters():
                p.add_(0.01 * round_number)
        folder, manifest = write_checkpoint(unet, scheduler, spec=spec, round_number=round_number,
                                            checkpoints=coordinator.checkpoints,
                                            run_folder=coordinator.checkpoints.run_folder(run_id),
                                            key=coordinator.key, preview=model in ("unet-digits-16", "sana-digits"))
        coordinator.checkpoints.publish(run_id, round_number, folder, manifest)
    coordinator.close()
    return signing.public_bytes(coordinator.key)


@pytest.fixture
def served(tmp_path):
    run_file = tmp_path / "run.toml"
    run_file.write_text(fast_run(checkpoints=dict(every_rounds=1, keep=5)))
    state = tmp_path / "coordinator"
    key = publish_checkpoints(state, run_file, [1, 2])
    server = ServeProcess(state, tmp_path / "coordinator.log", run_file=run_file, extra=("--swarm-host", ""))
    yield server, key
    kill_group(server.proc)


def sha256(path):
    return hashlib.sha256(path.read_bytes()).hexdigest()


def test_download_verifies_and_loads_with_stock_diffusers(served, tmp_path):
    server, key = served
    listed = json.loads(urllib.request.urlopen(f"{server.http}/runs/digits/checkpoints").read())
    assert [c["round"] for c in listed] == [1, 2]
    assert listed[-1]["url"] == f"{server.http}/runs/digits/checkpoints/2"

    out = tmp_path / "out"
    result = run_node("download", "digits", "--checkpoint", "latest", "--out", out, "--coordinator", server.address)
    assert result.returncode == 0, result.stdout + result.stderr
    manifest = json.loads((out / "manifest.json").read_text())
    assert manifest["round"] == 2 and verify_manifest(manifest, key)
    for entry in manifest["files"]:
        assert sha256(out / entry["path"]) == entry["sha256"]
    assert not list(out.rglob("*.part"))

    from diffusers import DDPMPipeline
    pipeline = DDPMPipeline.from_pretrained(out)
    images = pipeline(batch_size=1, num_inference_steps=2, output_type="np").images
    assert images.shape == (1, 16, 16, 1) and images.std() > 0

    # Range: a suffix of the weights, byte for byte
    weights = (out / WEIGHTS).read_bytes()
    request = urllib.request.Request(f"{server.http}/runs/digits/checkpoints/2/{WEIGHTS}",
                                     headers={"Range": "bytes=100-"})
    with urllib.request.urlopen(request) as response:
        assert response.status == 206 and response.read() == weights[100:]
    # only files the manifest lists are served, and unknown checkpoints are 404
    for path in ["../../../coordinator_key.pem", "nothing.bin", "../1/manifest.json"]:
        with pytest.raises(urllib.error.HTTPError) as e:
            urllib.request.urlopen(f"{server.http}/runs/digits/checkpoints/2/{path}")
        assert e.value.code == 404
    with pytest.raises(urllib.error.HTTPError):
        urllib.request.urlopen(f"{server.http}/runs/digits/checkpoints/7/manifest.json")

    # a pinned key and --http without gRPC work too; the wrong pinned key is refused
    result = run_node("download", "digits", "--checkpoint", "1", "--out", tmp_path / "one", "--http", server.http,
                      "--coordinator-key", key.hex())
    assert result.returncode == 0 and json.loads((tmp_path / "one" / "manifest.json").read_text())["round"] == 1
    other = signing.public_bytes(signing.generate_key()).hex()
    result = run_node("download", "digits", "--out", tmp_path / "two", "--http", server.http,
                      "--coordinator-key", other)
    assert result.returncode == 1 and "signature" in result.stdout
    assert not (tmp_path / "two" / "manifest.json").exists()


def test_flipped_byte_or_edited_manifest_is_refused(served, tmp_path):
    server, _ = served
    folder = server.state_dir / "checkpoints" / "digits" / "round-00000002"
    weights = folder / WEIGHTS
    data = bytearray(weights.read_bytes())
    data[len(data) // 2] ^= 0x01
    weights.write_bytes(bytes(data))
    out = tmp_path / "flipped"
    result = run_node("download", "digits", "--checkpoint", "2", "--out", out, "--coordinator", server.address)
    assert result.returncode == 1 and "refused" in result.stdout, result.stdout + result.stderr
    assert not (out / "manifest.json").exists() and not (out / WEIGHTS).exists()
    assert (out / (WEIGHTS + ".corrupt")).exists()  # kept, marked, never under the real name

    manifest_path = server.state_dir / "checkpoints" / "digits" / "round-00000001" / "manifest.json"
    manifest = json.loads(manifest_path.read_text())
    manifest["total_samples"] += 1000
    manifest_path.write_text(json.dumps(manifest, indent=2))
    out = tmp_path / "edited"
    result = run_node("download", "digits", "--checkpoint", "1", "--out", out, "--coordinator", server.address)
    assert result.returncode == 1 and "signature" in result.stdout, result.stdout + result.stderr
    assert not out.exists() or not any(out.iterdir())


def test_interrupted_download_resumes(served, tmp_path):
    server, key = served
    proxy = TcpRelay(f"127.0.0.1:{server.http_port}", rate=1_000_000)  # the 3.8 MB weights take ~4 s
    out = tmp_path / "out"
    import subprocess

    from processes import BIN
    download = subprocess.Popen([str(BIN / "omi-node"), "download", "digits", "--checkpoint", "2", "--out", str(out),
                                 "--http", f"http://127.0.0.1:{proxy.port}", "--coordinator-key", key.hex()],
                                stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
    part = out / (WEIGHTS + ".part")
    wait_until(lambda: download.poll() is not None or (part.exists() and part.stat().st_size > 1_000_000), 60,
               "1 MB of the weights downloaded", 0.05)
    assert download.poll() is None, download.stdout.read()
    kill_group(server.proc)  # the coordinator goes away mid-transfer
    proxy.cut()
    output, _ = download.communicate(timeout=60)
    assert download.returncode == 3 and "resume" in output, output
    assert not (out / "manifest.json").exists() and not (out / WEIGHTS).exists()
    partial = part.stat().st_size

    restarted = ServeProcess(server.state_dir, tmp_path / "restarted.log", grpc_port=server.grpc_port,
                             http_port=server.http_port, run_file=tmp_path / "run.toml", extra=("--swarm-host", ""))
    try:
        result = run_node("download", "digits", "--checkpoint", "2", "--out", out, "--http", restarted.http,
                          "--coordinator-key", key.hex())
    finally:
        kill_group(restarted.proc)
    assert result.returncode == 0, result.stdout + result.stderr
    manifest = json.loads((out / "manifest.json").read_text())
    entry = next(e for e in manifest["files"] if e["path"] == WEIGHTS)
    assert sha256(out / WEIGHTS) == entry["sha256"] and not part.exists()
    fetched_mib = float(re.search(r"([\d.]+) MiB\s+fetched", result.stdout).group(1))
    assert fetched_mib * 2**20 < entry["size"] - partial + 2**20 * 0.2, (fetched_mib, partial, entry["size"])


def test_a_file_longer_than_the_manifest_says_is_refused_at_its_size(tmp_path):
    # a server that sends 4 MiB for a 10-byte entry used to have all of it written before the size check
    import http.server
    import os
    from functools import partial

    from omi.models.fetch import DownloadError, fetch_file

    served = tmp_path / "served"
    served.mkdir()
    (served / "big.bin").write_bytes(os.urandom(4 << 20))
    server = http.server.ThreadingHTTPServer(("127.0.0.1", 0), partial(http.server.SimpleHTTPRequestHandler,
                                                                      directory=str(served)))
    threading.Thread(target=server.serve_forever, daemon=True).start()
    try:
        target = tmp_path / "out" / "big.bin"
        target.parent.mkdir()
        head = (served / "big.bin").read_bytes()[:10]
        with pytest.raises(DownloadError, match="more of big.bin than the 10 bytes"):
            fetch_file(f"http://127.0.0.1:{server.server_address[1]}/big.bin", target, 10,
                        hashlib.sha256(head).hexdigest(), lambda n: None)
    finally:
        server.shutdown()
        server.server_close()
    assert not target.exists() and (tmp_path / "out" / "big.bin.corrupt").stat().st_size == 10


def test_latest_older_than_a_round_verified_before_is_refused(tmp_path):
    # issue 12 point 12: `latest` accepted an older signed manifest (a rollback by a mirror or a man in the middle)
    import http.server
    import shutil
    from functools import partial

    from omi.node.download import DownloadError, SeenCheckpoints, download_checkpoint

    run_file = tmp_path / "run.toml"
    run_file.write_text(fast_run(checkpoints=dict(every_rounds=1, keep=5)))
    state = tmp_path / "coordinator"
    key = publish_checkpoints(state, run_file, [1, 2])
    site = tmp_path / "site" / "runs" / "digits" / "checkpoints"
    site.mkdir(parents=True)
    for round_number in (1, 2):
        shutil.copytree(state / CHECKPOINTS_DIR / "digits" / folder_name(round_number), site / str(round_number))
    shutil.copytree(site / "2", site / "latest")
    server = http.server.ThreadingHTTPServer(("127.0.0.1", 0), partial(http.server.SimpleHTTPRequestHandler,
                                                                      directory=str(tmp_path / "site")))
    threading.Thread(target=server.serve_forever, daemon=True).start()
    url = f"http://127.0.0.1:{server.server_address[1]}/runs/digits/checkpoints/latest"
    seen = SeenCheckpoints(tmp_path / "home" / "checkpoints-seen.json")
    try:
        assert download_checkpoint(url, "digits", tmp_path / "a", key, seen=seen, progress=False).round == 2
        shutil.rmtree(site / "latest")
        shutil.copytree(site / "1", site / "latest")  # the mirror now serves round 1 as latest: validly signed
        with pytest.raises(DownloadError, match="older than round 2 verified before"):
            download_checkpoint(url, "digits", tmp_path / "b", key, seen=seen, progress=False)
        assert not (tmp_path / "b").exists()
        # asked for by number, the old one is still there for whoever wants it; without memory, latest takes it
        assert download_checkpoint(url.replace("latest", "1"), "digits", tmp_path / "c", key, round_number=1, seen=seen,
                                   progress=False).round == 1
        assert seen.newest(key, "digits") == 2
        assert download_checkpoint(url, "digits", tmp_path / "d", key, progress=False).round == 1
    finally:
        server.shutdown()
        server.server_close()


def test_a_text_to_image_checkpoint_names_its_data_before_any_shard_was_trained(captioned_digits, tmp_path):
    """Provenance: the signed manifest names the data set (its manifest's sha256) and the shards trained from, none
    before the first contribution."""
    data = captioned_digits
    run_file = tmp_path / "run.toml"
    text = (ROOT / "examples/runs/digits-captioned.toml").read_text()
    run_file.write_text(text.replace('source = "manifest:data/digits-captioned"', f'source = "manifest:{data}"'))
    state = tmp_path / "coordinator"
    key = publish_checkpoints(state, run_file, [1], model="sana-digits", run_id="digits-captioned")
    manifest = json.loads((state / CHECKPOINTS_DIR / "digits-captioned" / folder_name(1) / "manifest.json")
                          .read_text())
    assert verify_manifest(manifest, key)
    assert {f["path"].split("/")[0] for f in manifest["files"]} >= {"transformer", "vae", "text_encoder",
                                                                    "tokenizer", "preview.png"}
    provenance = manifest["data"]
    dataset = json.loads((data / "manifest.json").read_text())
    assert provenance["manifest_sha256"] == sha256(data / "manifest.json")
    assert provenance["dataset"] == dataset["name"]
    # no contribution is in the ledger yet: no shard was trained from, no licence counted (a checkpoint of a run
    # that trained, downloaded and loaded in a stock SanaPipeline: tests/test_captioned_swarm.py)
    assert provenance["shards"] == [] and provenance["licenses"] == {}
