"""The dataset manifest: what a prepared text-to-image data set holds, where its shards are and what licences cover it.

``omi-data prepare`` writes it (``manifest.json`` beside the shards); the coordinator reads only this file to count a
run's shards and samples, nodes fetch the shards it lists and check their sha256, and every checkpoint's manifest
names the shards and the licence tally of what was trained. No torch here: reading a manifest is cheap.

>>> manifest = DatasetManifest(name="digits", model="sana-digits", resolution=32, channels=1,
...     latent_shape=[4, 8, 8], caption_width=64, parts=Parts(source="built:sana-digits:0", sha256="0" * 64),
...     null_caption=FileRef(file="null_caption.npy", sha256="1" * 64, bytes=10),
...     shards=[Shard(id=0, file="shards/shard-000000.tar", sha256="2" * 64, bytes=100, samples=64,
...                   licenses={"CC-BY-4.0": 64})],
...     licenses={"CC-BY-4.0": 64}, card=DataCard(source="UCI digits", license_terms="CC BY 4.0"))
>>> parse_manifest(manifest.model_dump_json()).samples
64
>>> parse_manifest('{"format": "omi-dataset-v1"}')  # doctest: +ELLIPSIS
Traceback (most recent call last):
...
omi.protos.dataset.ManifestError: not a dataset manifest: name: Field required; ...
"""

import json
import re
from pathlib import Path
from typing import Annotated, Literal

from omi.protos.files import RelativePath, Sha256
from pydantic import BaseModel, ConfigDict, Field, ValidationError, model_validator

FORMAT = "omi-dataset-v1"
DATASET_MANIFEST_NAME = "manifest.json"
DATA_CARD_NAME = "DATA_CARD.md"  # the data card for people, beside the manifest

_STRICT = ConfigDict(extra="forbid", allow_inf_nan=False)
Count = Annotated[int, Field(ge=0)]

# Licences a sample may carry (SPDX ids, plus the Public Domain Mark): each one allows training and redistributing
# a model, some with attribution (kept per sample in its metadata). Anything else is refused at preparation.
KNOWN_LICENSES: dict[str, str] = {
    "CC0-1.0": "public domain dedication",
    "PDM-1.0": "public domain (Public Domain Mark)",
    "CC-BY-2.0": "attribution",
    "CC-BY-3.0": "attribution",
    "CC-BY-4.0": "attribution",
    "CC-BY-SA-3.0": "attribution, share-alike",
    "CC-BY-SA-4.0": "attribution, share-alike",
}
_LICENSE_ALIASES = {"cc0": "CC0-1.0", "public-domain": "PDM-1.0", "public domain": "PDM-1.0", "pdm": "PDM-1.0"}


def normalize_license(text: str | None) -> str | None:
    """The SPDX id of a licence as a sample's metadata spells it, or ``None`` if it is not a known one.

    >>> normalize_license("cc-by-4.0"), normalize_license("CC0"), normalize_license("all rights reserved")
    ('CC-BY-4.0', 'CC0-1.0', None)
    """
    if not text or not text.strip():
        return None
    text = text.strip()
    by_lower = {name.lower(): name for name in KNOWN_LICENSES}
    return by_lower.get(text.lower()) or _LICENSE_ALIASES.get(text.lower())


class ManifestError(ValueError):
    """A dataset manifest that cannot be used; the message says which field and why."""


class FileRef(BaseModel):
    """A file of the data set, by its path relative to the manifest, its sha256 and its size."""

    model_config = _STRICT
    file: RelativePath
    sha256: Sha256
    bytes: Count


class Shard(FileRef):
    """One webdataset tar of latents, caption embeddings and metadata."""

    id: Count
    samples: Annotated[int, Field(gt=0)]
    licenses: dict[str, Count]  # licence -> samples of this shard under it


class Parts(BaseModel):
    """The frozen autoencoder, text encoder and tokenizer the latents and embeddings were made with."""

    model_config = _STRICT
    source: str = Field(min_length=1)  # a folder, a hub id pinned to its commit (ORG/NAME@COMMIT), built:<model>:<seed>
    sha256: Sha256  # over their weight and config files (see omi.models.text_to_image.parts_hash)


class DataCard(BaseModel):
    """What a user needs to know to trust the data (the data working group's card)."""

    model_config = _STRICT
    source: str = Field(min_length=1)  # where the images come from
    license_terms: str = Field(min_length=1)  # what the licences allow and require
    filtering: str = ""  # what was left out, and why
    caption_origin: str = ""  # who or what wrote the captions


class DatasetManifest(BaseModel):
    """``manifest.json`` of a prepared data set."""

    model_config = _STRICT
    format: Literal["omi-dataset-v1"] = FORMAT
    name: str = Field(min_length=1)
    model: str = Field(min_length=1)  # the registry model whose frozen parts made it (omi.models.text_to_image)
    resolution: Annotated[int, Field(gt=0)]  # side of the images, in pixels
    channels: Literal[1, 3]
    latent_shape: list[Annotated[int, Field(gt=0)]] = Field(min_length=3, max_length=3)  # (C, h, w)
    caption_width: Annotated[int, Field(gt=0)]  # width of a caption embedding
    parts: Parts
    null_caption: FileRef  # the empty prompt's embedding (for caption dropout)
    shards: list[Shard] = Field(min_length=1)
    licenses: dict[str, Count]  # licence -> samples
    refused: dict[str, Count] = {}  # reason -> samples left out
    card: DataCard
    preview_prompts: list[str] = []  # captions of the data set that previews and the dashboard draw from
    mirrors: list[str] = []  # base URLs that serve the same files (tried after the coordinator)

    @property
    def samples(self) -> int:
        return sum(shard.samples for shard in self.shards)

    @model_validator(mode="after")
    def _consistent(self) -> "DatasetManifest":
        ids = [shard.id for shard in self.shards]
        if ids != list(range(len(ids))):
            raise ValueError(f"shard ids must be 0..{len(ids) - 1} in order, got {ids[:5]}...")
        unknown = sorted(set(self.licenses) - set(KNOWN_LICENSES))
        if unknown:
            raise ValueError(f"unknown licences {unknown} (known: {', '.join(KNOWN_LICENSES)})")
        tally: dict[str, int] = {}
        for shard in self.shards:
            if sum(shard.licenses.values()) != shard.samples:
                raise ValueError(f"shard {shard.id}: licences cover {sum(shard.licenses.values())} of "
                                 f"{shard.samples} samples")
            for name, count in shard.licenses.items():
                tally[name] = tally.get(name, 0) + count
        if tally != {k: v for k, v in self.licenses.items() if v}:
            raise ValueError(f"licence tally {self.licenses} does not match the shards' {tally}")
        return self


def parse_manifest(text: str | bytes) -> DatasetManifest:
    """A manifest from its JSON, or :class:`ManifestError` naming what is wrong."""
    try:
        return DatasetManifest.model_validate(json.loads(text))
    except json.JSONDecodeError as e:
        raise ManifestError(f"not a dataset manifest: not JSON ({e})") from e
    except ValidationError as e:
        problems = "; ".join(f"{'.'.join(str(p) for p in err['loc']) or 'manifest'}: {err['msg']}"
                             for err in e.errors())
        raise ManifestError(f"not a dataset manifest: {problems}") from e


def read_manifest(path: str | Path) -> DatasetManifest:
    """``manifest.json`` from a file (or the folder holding it)."""
    path = Path(path).expanduser()
    if path.is_dir():
        path = path / DATASET_MANIFEST_NAME
    if not path.is_file():
        raise ManifestError(f"no dataset manifest at {path}")
    return parse_manifest(path.read_bytes())


def shard_name(shard_id: int) -> str:
    """The path of a shard inside the data set."""
    return f"shards/shard-{shard_id:06d}.tar"


def is_shard_name(text: str) -> bool:
    return re.fullmatch(r"shards/shard-\d{6}\.tar", text) is not None
