"""Data sources on data the tests make themselves: shard split, determinism, corrupt images skipped and counted."""

import io
import logging
import tarfile

import numpy as np
import pytest
import torch
from omi.models import DataSourceError, open_source
from omi.protos import pb
from PIL import Image

pytestmark = pytest.mark.usefixtures("one_torch_thread")  # conftest: tiny models run fastest on one thread


def png_bytes(value: int, size=(20, 12)) -> bytes:
    buffer = io.BytesIO()
    Image.fromarray(np.full((size[1], size[0], 3), value, np.uint8)).save(buffer, format="PNG")
    return buffer.getvalue()


def spec(source: str, shard_size=3, resolution=8) -> pb.DataSpec:
    return pb.DataSpec(source=source, shard_size=shard_size, resolution=resolution)


def test_builtin_digits():
    source = open_source(spec("builtin:digits", shard_size=64, resolution=16))
    assert (len(source), source.num_shards, source.skipped) == (1797, 29, 0)
    assert source.shard_range(0) == (0, 64) and source.shard_range(28) == (1792, 1797)
    batch = source.get([5, 1796])
    assert batch.shape == (2, 1, 16, 16) and batch.dtype == torch.float32
    assert float(batch.min()) >= -1 and float(batch.max()) <= 1 and float(batch.max()) > 0.5
    assert torch.equal(batch, open_source(spec("builtin:digits", resolution=16)).get([5, 1796]))
    rgb = open_source(spec("builtin:digits", resolution=32), channels=3).get([0])
    assert rgb.shape == (1, 3, 32, 32) and torch.equal(rgb[:, 0], rgb[:, 2])
    with pytest.raises(IndexError, match="shard 29 out of range"):
        source.shard_range(29)
    with pytest.raises(IndexError, match="sample 1797 out of range"):
        source.get([1797])
    with pytest.raises(DataSourceError, match="unknown builtin data source 'cifar'"):
        open_source(spec("builtin:cifar"))


def test_image_folder(tmp_path, caplog):
    folder = tmp_path / "images"
    (folder / "sub").mkdir(parents=True)
    for i in range(6):
        (folder / ("sub" if i >= 4 else "") / f"img{i}.png").write_bytes(png_bytes(40 * i))
    (folder / "img2b.jpg").write_bytes(b"\xff\xd8 this is not a jpeg")
    (folder / "notes.txt").write_text("not an image")
    with caplog.at_level(logging.WARNING):
        source = open_source(spec(f"imagefolder:{folder}"))
    assert (len(source), source.skipped, source.num_shards) == (6, 1, 2)
    assert "skipped 1 corrupt image(s) of 7" in caplog.text and "img2b.jpg" in caplog.text
    assert [source.shard_range(i) for i in range(2)] == [(0, 3), (3, 6)]
    batch = source.get(range(6))
    assert batch.shape == (6, 3, 8, 8)
    # sorted path order; each image is one flat colour, centre-cropped from 20x12 to square and resized
    expected = torch.tensor([40 * i for i in range(6)], dtype=torch.float32) / 127.5 - 1
    assert torch.allclose(batch.mean(dim=(1, 2, 3)), expected, atol=1e-6)
    assert torch.equal(open_source(spec(f"imagefolder:{folder}")).get([4, 1]), batch[[4, 1]])
    gray = open_source(spec(f"imagefolder:{folder}", resolution=4), channels=1).get([0])
    assert gray.shape == (1, 1, 4, 4)


def test_image_folder_missing_or_empty_is_an_error_naming_the_path(tmp_path):
    with pytest.raises(DataSourceError, match=str(tmp_path / "nowhere")):
        open_source(spec(f"imagefolder:{tmp_path / 'nowhere'}"))
    (tmp_path / "empty").mkdir()
    (tmp_path / "empty" / "broken.png").write_bytes(b"nope")
    with pytest.raises(DataSourceError, match=f"{tmp_path / 'empty'} holds no readable images"):
        open_source(spec(f"imagefolder:{tmp_path / 'empty'}"))


def write_tar(path, samples):
    with tarfile.open(path, "w") as tar:
        for name, data in samples:
            info = tarfile.TarInfo(name)
            info.size = len(data)
            tar.addfile(info, io.BytesIO(data))


def test_webdataset_shards(tmp_path, caplog):
    # two tar shards in the webdataset layout: image plus optional cls/json; one image in the second is corrupt
    write_tar(tmp_path / "part-000.tar", [
        (f"s{i:03d}.{ext}", data) for i in range(4)
        for ext, data in (("png", png_bytes(10 * i)), ("cls", str(i % 2).encode()))])
    write_tar(tmp_path / "part-001.tar", [
        (f"s{i:03d}.{ext}", data) for i in range(4, 8)
        for ext, data in (("png", b"garbage" if i == 6 else png_bytes(10 * i)), ("json", b'{"caption": "x"}'))])
    with caplog.at_level(logging.WARNING):
        source = open_source(spec(f"webdataset:{tmp_path}/part-{{000..001}}.tar", shard_size=4))
    assert (len(source), source.skipped, source.num_shards) == (7, 1, 2)
    assert "skipped 1 corrupt image(s) of 8" in caplog.text and "part-001.tar:s006" in caplog.text
    assert source.shard_range(1) == (4, 7)
    means = source.get(range(7)).mean(dim=(1, 2, 3))
    expected = torch.tensor([0, 10, 20, 30, 40, 50, 70], dtype=torch.float32) / 127.5 - 1
    assert torch.allclose(means, expected, atol=1e-6)
    by_glob = open_source(spec(f"webdataset:{tmp_path}/part-*.tar", shard_size=4))
    assert torch.equal(by_glob.get([6, 0]), source.get([6, 0]))


def test_webdataset_missing_shards_are_an_error_naming_the_path(tmp_path):
    with pytest.raises(DataSourceError, match=str(tmp_path / "gone-0.tar")):
        open_source(spec(f"webdataset:{tmp_path}/gone-{{0..1}}.tar"))
    with pytest.raises(DataSourceError, match="matches no tar files"):
        open_source(spec(f"webdataset:{tmp_path}/*.tar"))
    write_tar(tmp_path / "bad.tar", [("a.png", b"x"), ("b.png", b"y")])
    with pytest.raises(DataSourceError, match="holds no readable images"):
        open_source(spec(f"webdataset:{tmp_path}/bad.tar"))


def test_unknown_source_kind():
    with pytest.raises(DataSourceError, match="unknown data source kind 'hdf5'"):
        open_source(spec("hdf5:/data"))
