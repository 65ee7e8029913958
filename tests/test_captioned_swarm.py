"""A text-to-image run end to end, all real processes on loopback: `omi-coordinator serve` opens the prepared
captioned digits (reading only their manifest), two `omi-node join` volunteers fetch only the shards they are
assigned over HTTP and train Sana in DiLoCo rounds, the coordinator's checkpointer writes a signed checkpoint that
names the data shards and their licences, and `omi-node download` gives a folder a stock diffusers ``SanaPipeline``
loads and prompts."""

import hashlib
import json

import pytest
from omi.node.client import CoordinatorClient
from omi.protos import pb, signing
from omi.protos.dataset import DATASET_MANIFEST_NAME, parse_manifest
from omi.protos.manifest import verify_manifest
from processes import ROOT, NodeProcess, ServeProcess, kill_group, run_node, wait_until

pytestmark = [pytest.mark.slow]

RUN_ID = "digits-captioned"
# the example run, sized for 2 shared cores: rounds of 4 inner steps, a checkpoint every round with a 4-cell preview
SIZED = {
    "inner_steps = 20": "inner_steps = 4",
    "segment_steps = 2": "segment_steps = 2",
    "matchmaking_time = 3.0": "matchmaking_time = 2.0",
    "averaging_timeout = 30.0": "averaging_timeout = 20.0",
    "every_rounds = 5": "every_rounds = 1",
    "preview_samples = 16": "preview_samples = 4",
    "heartbeat_interval = 5.0": "heartbeat_interval = 1.0",
    "heartbeat_timeout = 30.0": "heartbeat_timeout = 6.0",
}


@pytest.fixture
def run_file(captioned_digits, tmp_path):
    text = (ROOT / "examples/runs/digits-captioned.toml").read_text()
    text = text.replace('source = "manifest:data/digits-captioned"', f'source = "manifest:{captioned_digits}"')
    for old, new in SIZED.items():
        assert old in text, old  # the example changed: size this test again
        text = text.replace(old, new)
    path = tmp_path / "run.toml"
    path.write_text(text)
    return path


@pytest.mark.timeout(420)
def test_volunteers_fetch_only_their_shards_and_the_checkpoint_is_a_stock_sana_pipeline(run_file, captioned_digits,
                                                                                         tmp_path):
    server = ServeProcess(tmp_path / "coordinator", tmp_path / "coordinator.log", run_file=run_file)
    client = CoordinatorClient(server.address, signing.generate_key(), attempts=3)
    spec = client.get_run_spec(RUN_ID)
    assert spec.data.source.startswith(f"manifest:{server.http}/")  # nodes get the data set as a pinned URL

    caches = [tmp_path / f"cache-{i}" for i in range(2)]
    nodes = [NodeProcess(server.address, tmp_path / f"node-{i}", "--max-rounds", 2, env={"OMI_SWARM_CACHE": str(cache)})
             for i, cache in enumerate(caches)]
    for node in nodes:
        assert node.wait(timeout=300) == 0, node.output()[-3000:]
    contributions = server.contributions(RUN_ID)
    assert {c.node_id for c in contributions} and all(c.samples > 0 for c in contributions)

    # each volunteer fetched only shards of the data set (each checked against the manifest), not the data set
    manifest_bytes = (captioned_digits / DATASET_MANIFEST_NAME).read_bytes()
    manifest = parse_manifest(manifest_bytes)
    data_set_bytes = sum(s.bytes for s in manifest.shards)
    for cache in caches:
        [folder] = (cache / "data").iterdir()  # the data set's folder in the node's cache
        fetched = {p.relative_to(folder).as_posix(): p for p in folder.rglob("*.tar")}
        assert fetched, f"{cache} fetched nothing"
        assert set(fetched) <= {s.file for s in manifest.shards}
        assert len(fetched) < len(manifest.shards) / 2
        assert sum(p.stat().st_size for p in fetched.values()) < data_set_bytes / 2
        for name, path in fetched.items():
            assert path.read_bytes() == (captioned_digits / name).read_bytes()

    # the checkpointer wrote a checkpoint of the swarm's state, with the data it trained on in its signed manifest
    wait_until(lambda: client.list_checkpoints(RUN_ID), 120, "a checkpoint of the text-to-image run")
    out = tmp_path / "latest"
    result = run_node("download", RUN_ID, "--out", out, "--coordinator", server.address, timeout=120)
    assert result.returncode == 0, result.stdout + result.stderr
    signed = json.loads((out / "manifest.json").read_text())
    assert verify_manifest(signed, spec.coordinator_public_key)
    assert {f["path"].split("/")[0] for f in signed["files"]} >= {"transformer", "vae", "text_encoder", "tokenizer",
                                                                  "scheduler", "preview.png"}
    data = signed["data"]
    assert data["dataset"] == manifest.name and data["shards"]
    assert data["manifest_sha256"] == hashlib.sha256(manifest_bytes).hexdigest()
    assert {(s["file"], s["sha256"]) for s in data["shards"]} <= {(s.file, s.sha256) for s in manifest.shards}
    assert sum(data["licenses"].values()) == sum(s["samples"] for s in data["shards"])
    assert len(signed["preview_prompts"]) == 4 and (out / "preview.png").stat().st_size > 0

    # the two volunteers averaged together, as the coordinator saw it. Only they and its witness average in this
    # run, and the witness joins one group a round: both sending tensor bytes in round r puts them in one group.
    # That group's outer step applied shows in θ_{r+1}: one θ, not θ_r, as both started round r + 1 from it or
    # as the coordinator's checkpoint of round r + 1 holds it (the same hash: omi.models.params_hash)
    by_round: dict[int, dict[str, pb.Contribution]] = {}
    for c in contributions:
        by_round.setdefault(c.round, {})[c.node_id] = c
    theta = {r: {c.params_hash.hex() for c in reports.values()} for r, reports in by_round.items()}
    theta.setdefault(signed["round"], set()).add(signed["params_hash"])
    together = [r for r, reports in by_round.items() if len(reports) == 2 and len(theta[r]) == 1
                and all(c.bytes_sent > 0 for c in reports.values())
                and len(theta.get(r + 1, ())) == 1 and theta[r + 1] != theta[r]]
    assert together, [(c.round, c.node_id[:8], c.params_hash.hex()[:8], c.bytes_sent) for c in contributions]

    # no code of ours from here on: a stock pipeline loads the checkpoint and draws from a prompt
    import torch
    from diffusers import SanaPipeline

    pipe = SanaPipeline.from_pretrained(out)
    image = pipe("a handwritten digit seven", num_inference_steps=2, height=32, width=32,
                 use_resolution_binning=False, generator=torch.Generator().manual_seed(0)).images[0]
    assert image.size == (32, 32)
    kill_group(server.proc)
