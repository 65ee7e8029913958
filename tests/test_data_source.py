"""The RunSpec's data-source text parsed in one place: each kind, a pinned URL, and malformed texts refused."""

from pathlib import Path

import pytest
from omi.protos.data_ref import DataRef, DataRefError
from omi.protos.runspec import RunSpecError, parse_runspec

PIN = "0123456789abcdef" * 4


@pytest.mark.parametrize(
    "text, kind, where",
    [
        ("builtin:digits", "builtin", "digits"),
        ("imagefolder:/data/cats", "imagefolder", "/data/cats"),
        ("webdataset:/data/part-{000..009}.tar", "webdataset", "/data/part-{000..009}.tar"),
        ("manifest:data/digits-captioned", "manifest", "data/digits-captioned"),
        ("imagefolder:C:/images", "imagefolder", "C:/images"),  # only the first ':' ends the kind
    ],
)
def test_each_kind_parses_and_gives_its_text_back(text, kind, where):
    ref = DataRef.parse(text)
    assert (ref.kind, ref.where, ref.pinned_sha256, ref.is_url, ref.url) == (kind, where, None, False, None)
    assert ref.is_manifest == (kind == "manifest")
    assert str(ref) == text
    assert DataRef.parse(str(ref)) == ref


def test_a_manifest_folder_is_on_this_machine_and_other_kinds_have_no_folder():
    assert DataRef.parse("manifest:~/digits").folder == Path.home() / "digits"
    assert DataRef.parse(f"manifest:/srv/digits#sha256:{PIN}").folder == Path("/srv/digits")
    assert DataRef.parse("imagefolder:/data/cats").folder is None
    assert DataRef.parse("builtin:digits").folder is None


def test_a_pinned_manifest_url():
    text = f"manifest:http://127.0.0.1:8080/runs/demo/data/#sha256:{PIN}"
    ref = DataRef.parse(text)
    assert (ref.kind, ref.where, ref.pinned_sha256) == ("manifest", "http://127.0.0.1:8080/runs/demo/data/", PIN)
    assert ref.is_manifest and ref.is_url and ref.folder is None
    assert ref.url == "http://127.0.0.1:8080/runs/demo/data"  # without the trailing slash
    assert str(ref) == text
    assert str(DataRef("manifest", "http://127.0.0.1:8080/runs/demo/data", PIN)) == \
        f"manifest:http://127.0.0.1:8080/runs/demo/data#sha256:{PIN}"
    unpinned = DataRef.parse("manifest:https://mirror.example.org/digits")
    assert unpinned.is_url and unpinned.pinned_sha256 is None and str(unpinned) == "manifest:https://mirror.example.org/digits"


@pytest.mark.parametrize(
    "text, error",
    [
        ("", "must be builtin:NAME, imagefolder:PATH, webdataset:PATTERN or manifest:FOLDER"),
        ("digits", "data source 'digits' must be builtin:NAME"),
        ("imagefolder", "data source 'imagefolder' must be"),
        ("imagefolder:", "data source 'imagefolder:' must be"),
        ("manifest:#sha256:" + PIN, "must be builtin:NAME"),
        ("hdf5:/data", r"unknown data source kind 'hdf5' in 'hdf5:/data' \(known: builtin, imagefolder, webdataset"),
        ("ftp://host/data", "unknown data source kind 'ftp'"),
        ("Manifest:/data", "unknown data source kind 'Manifest'"),
        ("manifest:/data#sha256:", "the pin of data source .* must be 64 lowercase hex characters"),
        ("manifest:/data#sha256:abc", "must be 64 lowercase hex characters"),
        ("manifest:/data#sha256:" + PIN.upper(), "must be 64 lowercase hex characters"),
        ("manifest:/data#sha256:" + PIN + "0", "must be 64 lowercase hex characters"),
        ("imagefolder:/data#sha256:" + PIN, "only a manifest data source is pinned"),
    ],
)
def test_malformed_texts_are_refused_with_what_is_wrong(text, error):
    with pytest.raises(DataRefError, match=error):
        DataRef.parse(text)


def test_a_data_ref_built_directly_is_checked_as_a_parsed_one():
    with pytest.raises(DataRefError, match="unknown data source kind 'hdf5'"):
        DataRef("hdf5", "/data")
    with pytest.raises(DataRefError, match="only a manifest data source is pinned"):
        DataRef("webdataset", "/data/*.tar", PIN)
    with pytest.raises(DataRefError, match="must be builtin:NAME"):
        DataRef("builtin", "")


@pytest.mark.parametrize("source", ["imagefolder:", f"manifest:/data#sha256:{PIN[:10]}", "hdf5:/data"])
def test_the_runspec_refuses_what_the_parser_refuses(source):
    base = '[run]\nid = "demo"\nmodel = "unet-digits-16"\n'
    with pytest.raises(RunSpecError, match=r"data\.source.*Input should be builtin:NAME, imagefolder:PATH"):
        parse_runspec(base + f"[data]\nsource = '{source}'\n")
    assert parse_runspec(base + f"[data]\nsource = 'manifest:/data#sha256:{PIN}'\n").data.source == \
        f"manifest:/data#sha256:{PIN}"
