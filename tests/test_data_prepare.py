"""Data preparation (``omi-data prepare``): licensed samples in, latent shards with a manifest and data card out;
refused samples counted, an interrupted run resumed, a changed shard caught, the shards read back as training data,
frozen parts named by a hub id resolved in a local hub cache (offline: nothing is downloaded) and pinned to a commit."""

import hashlib
import json
import os
import shutil
import subprocess
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import numpy as np
import pytest
import torch
from omi.models import text_to_image as t2i
from omi.models.data import DataSourceError, digit_caption, open_source
from omi.models.latent_source import LatentShardSource
from omi.models.prepare import prepare
from omi.models.prepare_input import PreparationError
from omi.models.toy_parts import save_frozen_parts
from omi.protos import pb
from omi.protos.dataset import DataCard, ManifestError, parse_manifest, read_manifest
from PIL import Image
from processes import BIN

pytestmark = pytest.mark.usefixtures("one_torch_thread")

CARD = DataCard(source="drawn by the test", license_terms="as each sample says")


@pytest.fixture(scope="module")
def parts_folder(tmp_path_factory):
    """Untrained toy parts: enough to check what preparation writes (fitting the autoencoder is not needed)."""
    return save_frozen_parts(t2i.build_frozen_parts("sana-digits", seed=0), tmp_path_factory.mktemp("parts"))


def _image(path, value):
    Image.fromarray(np.full((40, 40), value, dtype=np.uint8), mode="L").save(path)


@pytest.fixture
def folder(tmp_path):
    """Nine samples: six usable, three refused (no licence, a licence we do not know, an image that does not decode),
    one without a caption (refused) and one whose licence comes from --license."""
    root = tmp_path / "images"
    root.mkdir()
    licenses = ["CC0-1.0", "cc-by-4.0", "CC-BY-4.0", "public domain", "CC0", None, "all rights reserved"]
    for i, license_id in enumerate(licenses):
        _image(root / f"img{i}.png", 20 * i)
        meta = {"caption": f"a grey square number {i}"}
        if license_id:
            meta["license"] = license_id
        (root / f"img{i}.json").write_text(json.dumps(meta))
    (root / "broken.png").write_bytes(b"\x89PNG not really")
    (root / "broken.json").write_text(json.dumps({"caption": "broken", "license": "CC0-1.0"}))
    _image(root / "nocaption.png", 7)
    (root / "nocaption.json").write_text(json.dumps({"license": "CC0-1.0"}))
    _image(root / "plain.png", 99)
    (root / "plain.txt").write_text("a plain square\n")
    return root


def test_a_folder_becomes_shards_with_a_manifest_licence_tally_and_data_card(folder, parts_folder, tmp_path):
    out = tmp_path / "data"
    manifest = prepare(str(folder), parts_folder, out, model="sana-digits", card=CARD, shard_size=4, batch_size=3,
                       default_license="CC0-1.0")
    assert manifest.samples == 7 and [s.samples for s in manifest.shards] == [4, 3]
    assert manifest.licenses == {"CC0-1.0": 4, "CC-BY-4.0": 2, "PDM-1.0": 1}
    assert manifest.refused == {"unknown licence 'all rights reserved'": 1, "image does not decode": 1,
                                "no caption": 1}
    assert manifest.latent_shape == [4, 8, 8] and manifest.caption_width == 64
    assert read_manifest(out) == manifest
    card = (out / "DATA_CARD.md").read_text()
    assert "drawn by the test" in card and "| CC0-1.0 | 4 |" in card and "| no caption | 1 |" in card
    assert not (out / "progress.json").exists()

    source = LatentShardSource(out, shard_size=3, resolution=32)
    assert len(source) == 7 and source.num_shards == 3
    batch = source.get([0, 5])
    assert batch.latents.shape == (2, 4, 8, 8) and batch.embeds.shape[-1] == 64
    # what was stored is what the frozen parts make of the first image and its caption (float16 storage)
    parts = t2i.load_frozen_parts(parts_folder)
    image = torch.from_numpy(np.asarray(Image.open(folder / "img0.png").convert("L").resize((32, 32)))).float()
    expected = t2i.encode_images(parts.vae, (image / 127.5 - 1)[None, None])
    assert torch.allclose(batch.latents[0], expected[0], atol=2e-3 * expected.abs().max())
    caption = t2i.encode_captions(parts, ["a grey square number 0"])[0]
    assert source.caption(0) == "a grey square number 0"
    assert torch.allclose(batch.embeds[0, :caption.shape[0]], caption, rtol=1e-2, atol=1e-2)
    assert int(batch.mask[0].sum()) == caption.shape[0]
    assert isinstance(open_source(pb.DataSpec(source=f"manifest:{out}", shard_size=3, resolution=32)),
                      LatentShardSource)


def test_an_interrupted_preparation_resumes_after_its_last_shard(folder, parts_folder, tmp_path):
    out = tmp_path / "data"

    def stop_at(n):
        if n == 7:
            raise KeyboardInterrupt

    with pytest.raises(KeyboardInterrupt):
        prepare(str(folder), parts_folder, out, model="sana-digits", card=CARD, shard_size=2, batch_size=2,
                default_license="CC0-1.0", on_sample=stop_at)
    progress = json.loads((out / "progress.json").read_text())
    first = out / progress["shards"][0]["file"]
    written = {s["file"]: (out / s["file"]).stat().st_mtime_ns for s in progress["shards"]}
    assert len(written) >= 2

    seen = []
    manifest = prepare(str(folder), parts_folder, out, model="sana-digits", card=CARD, shard_size=2, batch_size=2,
                       default_license="CC0-1.0", on_sample=seen.append)
    assert min(seen) > progress["position"], "samples of finished shards are not read again"
    assert {f: (out / f).stat().st_mtime_ns for f in written} == written, "finished shards are kept as they were"
    assert manifest.samples == 7 and manifest.refused["no caption"] == 1 and sum(manifest.refused.values()) == 3
    assert first.is_file()

    with pytest.raises(PreparationError, match="already holds a finished data set"):
        prepare(str(folder), parts_folder, out, model="sana-digits", card=CARD, shard_size=2)


def test_a_changed_shard_is_caught_when_resuming_and_when_training(folder, parts_folder, tmp_path):
    out = tmp_path / "data"
    with pytest.raises(KeyboardInterrupt):
        prepare(str(folder), parts_folder, out, model="sana-digits", card=CARD, shard_size=2, batch_size=2,
                default_license="CC0-1.0", on_sample=lambda n: (_ for _ in ()).throw(KeyboardInterrupt) if n == 6
                else None)
    shard = out / "shards" / "shard-000000.tar"
    data = bytearray(shard.read_bytes())
    data[600] ^= 0xFF
    shard.write_bytes(bytes(data))
    with pytest.raises(PreparationError, match="changed since it was written"):
        prepare(str(folder), parts_folder, out, model="sana-digits", card=CARD, shard_size=2,
                default_license="CC0-1.0")
    with pytest.raises(PreparationError, match="another shard size"):
        prepare(str(folder), parts_folder, out, model="sana-digits", card=CARD, shard_size=3,
                default_license="CC0-1.0")

    done = tmp_path / "done"
    prepare(str(folder), parts_folder, done, model="sana-digits", card=CARD, shard_size=4, default_license="CC0-1.0")
    source = LatentShardSource(done, shard_size=4, resolution=32)
    shard = done / "shards" / "shard-000001.tar"
    shard.write_bytes(shard.read_bytes()[:-10])
    source.get([0])
    with pytest.raises(DataSourceError, match="does not match the manifest's sha256"):
        source.get([5])
    with pytest.raises(DataSourceError, match="prepared at 32 px, the run asks for 16"):
        LatentShardSource(done, shard_size=4, resolution=16)


def test_bad_input_is_refused_with_a_clear_error_and_nothing_written(parts_folder, folder, tmp_path):
    with pytest.raises(PreparationError, match="not a frozen-parts folder"):
        prepare(str(folder), tmp_path, tmp_path / "a", model="sana-digits", card=CARD)
    with pytest.raises(PreparationError, match="a data card is needed"):
        prepare(str(folder), parts_folder, tmp_path / "b", model="sana-digits")
    with pytest.raises(PreparationError, match="is not builtin:digits, an image folder, or tar files"):
        prepare(str(tmp_path / "nowhere"), parts_folder, tmp_path / "c", model="sana-digits", card=CARD)
    only_bad = tmp_path / "bad"
    only_bad.mkdir()
    _image(only_bad / "x.png", 3)
    (only_bad / "x.txt").write_text("a caption but no licence")
    with pytest.raises(PreparationError, match="no sample of .* could be used .*'no licence': 1"):
        prepare(str(only_bad), parts_folder, tmp_path / "e", model="sana-digits", card=CARD)
    with pytest.raises(ValueError, match="unknown text-to-image model"):
        prepare(str(folder), parts_folder, tmp_path / "f", model="unet-digits-16", card=CARD)


def test_a_manifest_that_does_not_add_up_is_refused(folder, parts_folder, tmp_path):
    prepare(str(folder), parts_folder, tmp_path / "data", model="sana-digits", card=CARD, shard_size=4,
            default_license="CC0-1.0")
    good = json.loads((tmp_path / "data" / "manifest.json").read_text())
    for change, message in [
        (lambda m: m["shards"][0].update(file="../../etc/passwd"), "relative path inside the manifest's folder"),
        (lambda m: m["shards"][0].update(sha256="abc"), "sha256"),
        (lambda m: m["licenses"].update({"CC0-1.0": 99}), "does not match the shards'"),
        (lambda m: m["shards"][1].update(id=5), "shard ids must be 0..1"),
        (lambda m: m["shards"][0]["licenses"].update({"CC0-1.0": 40}), "licences cover"),
        (lambda m: m.update(licenses={**m["licenses"], "WTFPL": 0}), "unknown licences"),
    ]:
        bad = json.loads(json.dumps(good))
        change(bad)
        with pytest.raises(ManifestError, match=message):
            parse_manifest(json.dumps(bad))
    with pytest.raises(ManifestError, match="not JSON"):
        parse_manifest(b"\x00")


def cli(*args) -> subprocess.CompletedProcess:
    return subprocess.run([BIN / "omi-data", *map(str, args)], capture_output=True, text=True, timeout=120,
                          env={**os.environ, "COLUMNS": "300"})  # rich wraps at the terminal width


def test_the_command_line_prepares_and_shows_a_data_set(folder, parts_folder, tmp_path):
    out = tmp_path / "data"
    with ThreadPoolExecutor(3) as pool:  # three CLI starts side by side (each imports torch and diffusers)
        prepared = pool.submit(cli, "prepare", str(folder), "--parts", str(parts_folder), "--out", str(out),
                               "--shard-size", "4", "--license", "CC0-1.0", "--card-source", "the test",
                               "--card-license-terms", "CC0 and CC BY", "--device", "cpu")
        missing = pool.submit(cli, "prepare", str(folder), "--parts", str(tmp_path), "--out",
                              str(tmp_path / "x"), "--card-source", "x")
        not_a_data_set = pool.submit(cli, "show", str(folder))
        result = prepared.result()
    assert result.returncode == 0, result.stderr + result.stdout
    assert "7 samples in 2 shards" in result.stdout and "3 refused" in result.stdout
    shown = cli("show", str(out))
    assert shown.returncode == 0 and "| CC0-1.0 | 4 |" in shown.stdout
    assert missing.result().returncode == 2 and "not a frozen-parts folder" in missing.result().stdout
    assert not_a_data_set.result().returncode == 2


def test_data_provenance_names_the_prepared_shards_of_the_work_shards_trained(folder, parts_folder, tmp_path):
    prepare(str(folder), parts_folder, tmp_path / "data", model="sana-digits", card=CARD, shard_size=2,
            default_license="CC0-1.0")
    source = LatentShardSource(tmp_path / "data", shard_size=3, resolution=32)
    dataset = json.loads((tmp_path / "data" / "manifest.json").read_text())
    # prepared shards hold samples 0-1, 2-3, 4-5, 6; work shard 0 (samples 0-2) lies in prepared shards 0 and 1,
    # work shard 2 (sample 6) in prepared shard 3
    provenance = source.provenance([[0, 0], [2, 2]])
    assert [s["id"] for s in provenance["shards"]] == [0, 1, 3]
    assert [s["sha256"] for s in provenance["shards"]] == [dataset["shards"][i]["sha256"] for i in (0, 1, 3)]
    tally = {}
    for i in (0, 1, 3):
        for name, count in dataset["shards"][i]["licenses"].items():
            tally[name] = tally.get(name, 0) + count
    assert provenance["licenses"] == tally and sum(tally.values()) == 5
    assert provenance["manifest_sha256"] == hashlib.sha256((tmp_path / "data" / "manifest.json").read_bytes()
                                                           ).hexdigest()


HUB_REPO = "omi-test/tiny-sana-parts"  # made up: only the test's hub cache holds it
HUB_COMMIT = "0123456789abcdef0123456789abcdef01234567"


@pytest.fixture
def hub_cache(parts_folder, tmp_path, monkeypatch):
    """A hub cache whose ``HUB_REPO`` main is the toy parts, laid out as huggingface_hub writes one
    (``models--ORG--NAME/refs/main`` names the commit, ``snapshots/<commit>/`` links each file to ``blobs/``), with
    the hub offline: nothing is fetched. Returns the snapshot folder."""
    from huggingface_hub import constants

    repo = tmp_path / "hub" / "models--omi-test--tiny-sana-parts"
    for file in sorted(p for p in parts_folder.rglob("*") if p.is_file()):
        data = file.read_bytes()
        blob = repo / "blobs" / hashlib.sha256(data).hexdigest()
        blob.parent.mkdir(parents=True, exist_ok=True)
        blob.write_bytes(data)
        link = repo / "snapshots" / HUB_COMMIT / file.relative_to(parts_folder)
        link.parent.mkdir(parents=True, exist_ok=True)
        link.symlink_to(os.path.relpath(blob, link.parent))
    (repo / "refs").mkdir()
    (repo / "refs" / "main").write_text(HUB_COMMIT)
    # huggingface_hub reads its environment at import: the constants for this process, the variables for commands
    monkeypatch.setattr(constants, "HF_HUB_CACHE", str(tmp_path / "hub"))
    monkeypatch.setattr(constants, "HF_HUB_OFFLINE", True)
    monkeypatch.setenv("HF_HUB_CACHE", str(tmp_path / "hub"))
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    return repo / "snapshots" / HUB_COMMIT


def test_parts_named_by_a_hub_id_are_pinned_to_their_commit_and_loaded_from_it(folder, hub_cache, tmp_path):
    out = tmp_path / "data"
    manifest = prepare(str(folder), HUB_REPO, out, model="sana-digits", card=CARD, shard_size=4,
                       default_license="CC0-1.0")
    assert manifest.parts.source == f"{HUB_REPO}@{HUB_COMMIT}"
    assert manifest.parts.sha256 == t2i.parts_hash(hub_cache) and manifest.samples == 7

    # main moves on after preparation: the data set still gets the commit it was prepared with
    (hub_cache.parent.parent / "refs" / "main").write_text("f" * 40)
    parts = LatentShardSource(out, shard_size=4, resolution=32).frozen_parts()
    assert Path(parts.source).resolve() == hub_cache.resolve()
    assert parts.vae.config.latent_channels == 4

    tampered = hub_cache / "tokenizer" / "tokenizer.json"
    tampered.write_bytes(tampered.read_bytes() + b" ")  # still valid JSON; written through the link, into the blob
    with pytest.raises(DataSourceError, match="not the ones .* was prepared with"):
        LatentShardSource(out, shard_size=4, resolution=32).frozen_parts()
    shutil.rmtree(hub_cache)
    with pytest.raises(DataSourceError, match="not in the hub cache") as refused:
        LatentShardSource(out, shard_size=4, resolution=32).frozen_parts()
    assert f"'{HUB_REPO}@{HUB_COMMIT}'" in str(refused.value)


def test_a_hub_id_the_cache_lacks_offline_is_a_clear_error(folder, hub_cache, tmp_path):
    with pytest.raises(PreparationError, match="'omi-test/absent': no such folder here, and as a hub id it is not in "
                                               "the hub cache .* run once online"):
        prepare(str(folder), "omi-test/absent", tmp_path / "a", model="sana-digits", card=CARD)
    with pytest.raises(t2i.PartsNotFoundError, match="not in the hub cache"):
        t2i.resolve_parts(f"{HUB_REPO}@{'e' * 40}")  # a commit the cache does not hold
    with pytest.raises(t2i.PartsNotFoundError, match="not valid .*pass a local folder"):
        t2i.resolve_parts("no//such parts")
    assert not (tmp_path / "a").exists()
    result = cli("prepare", str(folder), "--parts", "omi-test/absent", "--out", str(tmp_path / "b"),
                 "--card-source", "x")
    assert result.returncode == 2 and "as a hub id it is not in the hub cache" in result.stdout
    assert "Traceback" not in result.stdout + result.stderr


def test_the_digits_get_their_captions():
    assert digit_caption(0) == "a handwritten digit zero" and digit_caption(9) == "a handwritten digit nine"
