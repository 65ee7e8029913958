"""Data preparation: licensed image-caption samples -> webdataset shards of latents and caption embeddings.

The data working group's pipeline (``omi-data prepare``). Input is ``builtin:digits``, an image folder or webdataset
tars, each sample with a caption and a licence (:mod:`omi.models.prepare_input`).

Samples without a known licence (:data:`omi.protos.dataset.KNOWN_LICENSES`), without a caption, or whose image does
not decode are refused and counted by reason. The rest are encoded in batches with the frozen parts (the
autoencoder's latents, the text encoder's caption embedding exactly as a stock ``SanaPipeline`` call embeds a
prompt) and written as ``shards/shard-NNNNNN.tar``, each sample ``KEY.latent.npy`` (float16 ``(C, h, w)``),
``KEY.caption.npy`` (float16 ``(tokens, width)``) and ``KEY.json`` (caption, licence, source, attribution).

Resumable: after each shard, ``progress.json`` records the shards written (with sha256) and how far into the input
they reach; a second run with the same input and parts checks those shards and carries on after them. The last
step writes ``manifest.json`` (:class:`omi.protos.dataset.DatasetManifest`) and ``DATA_CARD.md``
(:mod:`omi.models.data_card`).
"""

import io
import json
import logging
import os
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import torch
import webdataset as wds
from omi.models import text_to_image as t2i
from omi.models.data import DIGIT_PROMPTS
from omi.models.data_card import DIGITS_CARD, data_card_markdown
from omi.models.prepare_input import PreparationError, RawSample, read_input
from omi.protos.dataset import (
    DATA_CARD_NAME,
    DATASET_MANIFEST_NAME,
    DataCard,
    DatasetManifest,
    FileRef,
    Parts,
    Shard,
    normalize_license,
    shard_name,
)
from omi.protos.files import sha256_file

logger = logging.getLogger(__name__)

PROGRESS_NAME = "progress.json"
PREVIEW_PROMPTS = 16  # distinct captions the manifest names for previews
NULL_CAPTION_NAME = "null_caption.npy"


@dataclass
class _Progress:
    """What ``progress.json`` keeps between runs."""

    input: str
    parts_sha256: str
    model: str
    shard_size: int
    position: int = 0  # input samples consumed by the shards written
    shards: list[Shard] = field(default_factory=list)
    refused: dict[str, int] = field(default_factory=dict)

    def save(self, out: Path) -> None:
        data = dict(input=self.input, parts_sha256=self.parts_sha256, model=self.model, shard_size=self.shard_size,
                    position=self.position, shards=[s.model_dump() for s in self.shards], refused=self.refused)
        tmp = out / (PROGRESS_NAME + ".tmp")
        tmp.write_text(json.dumps(data, indent=1))
        os.replace(tmp, out / PROGRESS_NAME)


def _resume(out: Path, fresh: _Progress) -> _Progress:
    """The progress of an earlier run into ``out`` (its shards checked), or ``fresh``."""
    path = out / PROGRESS_NAME
    if not path.is_file():
        if (out / DATASET_MANIFEST_NAME).exists():
            raise PreparationError(f"{out} already holds a finished data set ({DATASET_MANIFEST_NAME}); use a new "
                                   "folder")
        return fresh
    data = json.loads(path.read_text())
    for key in ("input", "parts_sha256", "model", "shard_size"):
        if data[key] != getattr(fresh, key):
            raise PreparationError(f"{out} holds a preparation of another {key.replace('_', ' ')} "
                                   f"({data[key]!r}, not {getattr(fresh, key)!r}); use a new folder")
    done = _Progress(**{**data, "shards": [Shard(**s) for s in data["shards"]]})
    for shard in done.shards:
        file = out / shard.file
        if not file.is_file() or sha256_file(file) != shard.sha256:
            raise PreparationError(f"{file} is missing or changed since it was written (sha256); "
                                   "remove the folder and prepare again")
    logger.info("resuming %s: %d shards written, %d input samples done", out, len(done.shards), done.position)
    return done


def _write_shard(out: Path, shard_id: int, rows: list[dict]) -> Shard:
    file = out / shard_name(shard_id)
    file.parent.mkdir(parents=True, exist_ok=True)
    tmp = file.with_suffix(".tar.tmp")
    with wds.TarWriter(str(tmp)) as writer:
        for row in rows:
            writer.write(row)
    os.replace(tmp, file)
    licenses: dict[str, int] = {}
    for row in rows:
        licenses[row["json"]["license"]] = licenses.get(row["json"]["license"], 0) + 1
    return Shard(id=shard_id, file=shard_name(shard_id), sha256=sha256_file(file), bytes=file.stat().st_size,
                 samples=len(rows), licenses=licenses)


def prepare(
    where: str,
    parts_source: str | Path,
    out: str | Path,
    *,
    model: str,
    name: str = "",
    card: DataCard | None = None,
    shard_size: int = 256,
    batch_size: int = 32,
    default_license: str | None = None,
    device: str | torch.device = "cpu",
    on_sample: Callable[[int], None] | None = None,
) -> DatasetManifest:
    """Prepare a data set into ``out`` (see the module docstring); returns its manifest.

    :param where: ``builtin:digits``, an image folder, or a tar pattern
    :param parts_source: the frozen parts of ``model``: a folder with ``vae/``, ``text_encoder/``, ``tokenizer/``, or
        a hub id (``ORG/NAME`` or ``ORG/NAME@REVISION``, see :func:`~omi.models.text_to_image.resolve_parts`), which
        the manifest records pinned to the commit used
    :param model: the text-to-image registry model the data is for (resolution, channels, latent shape)
    :param card: the data card (``builtin:digits`` has its own)
    :param shard_size: samples per shard (the last one may be shorter)
    :param batch_size: samples encoded together
    :param default_license: the licence of samples whose metadata names none
    :param on_sample: called with the number of input samples consumed, for a progress bar
    """
    config = t2i.latent_config(model)
    if shard_size <= 0 or batch_size <= 0:
        raise PreparationError(f"shard_size and batch_size must be > 0, got {shard_size} and {batch_size}")
    if where == "builtin:digits":
        card = card or DIGITS_CARD
    if card is None:
        raise PreparationError("a data card is needed: say where the images come from and what the licences allow")
    out = Path(out).expanduser()
    try:
        parts_folder, pinned = t2i.resolve_parts(parts_source)
    except t2i.PartsNotFoundError as e:
        raise PreparationError(str(e)) from e
    out.mkdir(parents=True, exist_ok=True)
    parts = t2i.load_frozen_parts(parts_folder)
    parts.vae.to(device)
    progress = _resume(out, _Progress(input=where, parts_sha256=t2i.parts_hash(parts_folder), model=model,
                                      shard_size=shard_size))
    null = t2i.null_caption(parts)
    np.save(out / NULL_CAPTION_NAME, null.numpy().astype(np.float16))

    rows: list[dict] = []
    embedded: dict[str, torch.Tensor] = {}  # caption -> embedding: a repeated caption is encoded once
    pending: list[tuple[RawSample, torch.Tensor]] = []
    refused = dict(progress.refused)
    position = progress.position

    def refuse(reason: str) -> None:
        refused[reason] = refused.get(reason, 0) + 1

    def encode() -> None:
        images = torch.stack([pixels for _, pixels in pending]).to(torch.float32) / 127.5 - 1
        latents = t2i.encode_images(parts.vae, images)
        new = sorted({sample.caption for sample, _ in pending} - set(embedded))
        embedded.update(zip(new, t2i.encode_captions(parts, new), strict=True))
        captions = [embedded[sample.caption] for sample, _ in pending]
        for (sample, _), latent, caption in zip(pending, latents, captions, strict=True):
            rows.append({"__key__": f"{len(progress.shards) * shard_size + len(rows):09d}",
                         "latent.npy": latent.numpy().astype(np.float16),
                         "caption.npy": caption.numpy().astype(np.float16),
                         "json": dict(key=sample.key, caption=sample.caption, license=sample.license,
                                      source=sample.source, attribution=sample.attribution)})
        pending.clear()

    def close_shard(consumed: int) -> None:
        nonlocal rows
        progress.shards.append(_write_shard(out, len(progress.shards), rows))
        progress.position, progress.refused = consumed, dict(refused)
        progress.save(out)
        rows = []

    consumed = 0
    for consumed, sample in enumerate(read_input(where, resolution=config.resolution, channels=config.channels,
                                                 default_license=default_license), start=1):
        if consumed <= position:
            continue
        if on_sample:
            on_sample(consumed)
        license_id = normalize_license(sample.license)
        if license_id is None:
            refuse("no licence" if not sample.license else f"unknown licence {sample.license.strip()!r}")
            continue
        if not sample.caption:
            refuse("no caption")
            continue
        try:
            pixels = sample.image()
        except Exception as e:  # PIL raises many types on corrupt data
            logger.warning("refused %s: image does not decode (%s)", sample.key, type(e).__name__)
            refuse("image does not decode")
            continue
        sample.license = license_id
        pending.append((sample, pixels))
        if len(pending) >= min(batch_size, shard_size - len(rows)):
            encode()
            if len(rows) == shard_size:
                close_shard(consumed)
    if pending:
        encode()
    if rows:
        close_shard(consumed)
    if not progress.shards:
        raise PreparationError(f"no sample of {where} could be used (refused: {refused or 'none read'})")

    licenses: dict[str, int] = {}
    for shard in progress.shards:
        for license_id, count in shard.licenses.items():
            licenses[license_id] = licenses.get(license_id, 0) + count
    latent_shape = list(np.load(io.BytesIO(_first_member(out / progress.shards[0].file, ".latent.npy"))).shape)
    manifest = DatasetManifest(
        name=name or Path(where.replace("builtin:", "")).name or "data", model=model, resolution=config.resolution,
        channels=config.channels, latent_shape=latent_shape, caption_width=int(null.shape[-1]),
        parts=Parts(source=pinned, sha256=progress.parts_sha256),
        null_caption=FileRef(file=NULL_CAPTION_NAME, sha256=sha256_file(out / NULL_CAPTION_NAME),
                             bytes=(out / NULL_CAPTION_NAME).stat().st_size),
        shards=progress.shards, licenses=licenses, refused=refused, card=card,
        preview_prompts=(list(DIGIT_PROMPTS) if where == "builtin:digits"
                         else _first_captions(out, progress.shards, PREVIEW_PROMPTS)),
    )
    (out / DATASET_MANIFEST_NAME).write_text(manifest.model_dump_json(indent=1))
    (out / DATA_CARD_NAME).write_text(data_card_markdown(manifest))
    (out / PROGRESS_NAME).unlink()
    logger.info("prepared %s: %d samples in %d shards, %d refused", out, manifest.samples, len(manifest.shards),
                sum(refused.values()))
    return manifest


def _first_captions(out: Path, shards: list[Shard], count: int) -> list[str]:
    """The first ``count`` distinct captions of the shards, in data order."""
    import tarfile

    captions: list[str] = []
    for shard in shards:
        with tarfile.open(out / shard.file) as tar:
            for member in tar.getmembers():
                if member.name.endswith(".json"):
                    caption = json.loads(tar.extractfile(member).read())["caption"]
                    if caption not in captions:
                        captions.append(caption)
                        if len(captions) == count:
                            return captions
    return captions


def _first_member(tar_path: Path, suffix: str) -> bytes:
    import tarfile

    with tarfile.open(tar_path) as tar:
        member = next(m for m in tar.getmembers() if m.name.endswith(suffix))
        return tar.extractfile(member).read()
