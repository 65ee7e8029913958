"""A text-to-image run's shards fetched per assignment: a real `omi-coordinator serve` hands nodes the data set as a
URL pinned by its manifest's sha256; a node fetches only the shards it reads, checks them, caches them under a
bound; a bad shard, a wrong manifest and an unreachable coordinator give clear errors."""

import hashlib
import json
import urllib.error
import urllib.request

import pytest
import torch
from omi.models import data_cache
from omi.models.data import DataSourceError, open_source
from omi.models.latent_source import LatentShardSource
from omi.node.client import CoordinatorClient
from omi.protos import signing
from processes import ROOT, ServeProcess, free_port, kill_group

pytestmark = [pytest.mark.slow, pytest.mark.usefixtures("one_torch_thread")]


@pytest.fixture
def served(captioned_digits, tmp_path):  # per test: conftest reaps every process a test leaves
    root = tmp_path
    run_file = root / "run.toml"
    text = (ROOT / "examples/runs/digits-captioned.toml").read_text()
    run_file.write_text(text.replace('source = "manifest:data/digits-captioned"',
                                     f'source = "manifest:{captioned_digits}"'))
    server = ServeProcess(root / "coordinator", root / "coordinator.log", run_file=run_file,
                          extra=("--swarm-host", ""))
    yield server
    kill_group(server.proc)


def test_a_node_fetches_only_the_shards_it_reads_and_checks_them(served, captioned_digits, tmp_path, monkeypatch):
    monkeypatch.setattr(data_cache, "FETCH_BACKOFF", 0.05)
    spec = CoordinatorClient(served.address, signing.generate_key(), attempts=3).get_run_spec("digits-captioned")
    manifest_bytes = (captioned_digits / "manifest.json").read_bytes()
    url = f"{served.http}/runs/digits-captioned/data"
    assert spec.data.source == f"manifest:{url}#sha256:{hashlib.sha256(manifest_bytes).hexdigest()}"

    monkeypatch.setenv("OMI_SWARM_CACHE", str(tmp_path))
    source = open_source(spec.data)  # as a node opens its run's data: cached under $OMI_SWARM_CACHE/data
    local = LatentShardSource(captioned_digits, 64, 32)
    dataset = json.loads(manifest_bytes)
    shards, opened = dataset["shards"], dataset["null_caption"]["bytes"]
    assert len(source) == 1797 and source.fetched_bytes == opened, "opening fetches the manifest and empty prompt"
    batch = source.get(list(range(5 * 64, 5 * 64 + 8)))  # work shard 5: samples 320-383, prepared shard 5
    assert source.fetched_bytes == opened + shards[5]["bytes"]
    assert sorted(p.name for p in (tmp_path / "data").rglob("*.tar")) == ["shard-000005.tar"]
    expected = local.get(list(range(5 * 64, 5 * 64 + 8)))
    assert torch.equal(batch.latents, expected.latents) and torch.equal(batch.embeds, expected.embeds)
    total = sum(s["bytes"] for s in shards)
    print(f"\nfetched {source.fetched_bytes} of the data set's {total} bytes to train a work shard")
    assert source.fetched_bytes * 20 < total

    # a bounded cache keeps the most recently used shards only
    bounded = LatentShardSource(spec.data.source.removeprefix("manifest:"), 64, 32, cache_dir=tmp_path / "small",
                                max_cache_bytes=shards[0]["bytes"] + 1)
    bounded.get([0])
    bounded.get([64])
    assert sorted(p.name for p in (tmp_path / "small").rglob("*.tar")) == ["shard-000001.tar"]

    # only the data set's files are served
    for path in ["../../parts/vae/config.json", "progress.json", "shards/shard-999999.tar"]:
        with pytest.raises(urllib.error.HTTPError) as e:
            urllib.request.urlopen(f"{url}/{path}")
        assert e.value.code == 404


def test_a_changed_shard_a_wrong_manifest_and_no_coordinator_are_clear_errors(served, captioned_digits, tmp_path,
                                                                              monkeypatch):
    monkeypatch.setattr(data_cache, "FETCH_BACKOFF", 0.05)
    url = f"{served.http}/runs/digits-captioned/data"
    with pytest.raises(DataSourceError, match="not the one the run names"):
        LatentShardSource(f"{url}#sha256:{'0' * 64}", 64, 32, cache_dir=tmp_path / "a")
    with pytest.raises(DataSourceError, match="cannot fetch the data set's manifest"):
        LatentShardSource(f"http://127.0.0.1:{free_port()}/runs/x/data", 64, 32, cache_dir=tmp_path / "b")

    source = LatentShardSource(url, 64, 32, cache_dir=tmp_path / "c")
    shard = captioned_digits / "shards" / "shard-000007.tar"
    original = shard.read_bytes()
    try:
        shard.write_bytes(original[:100] + bytes([original[100] ^ 0xFF]) + original[101:])
        with pytest.raises(DataSourceError, match="cannot fetch shards/shard-000007.tar .*does not match"):
            source.get([7 * 64])
        assert not list((tmp_path / "c").rglob("shard-000007.tar*")), "nothing unverified is kept"
    finally:
        shard.write_bytes(original)
    assert len(source.get([7 * 64])) == 1, "once the server has the right bytes again, the same source recovers"
