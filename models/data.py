"""Data sources named in the RunSpec: ``builtin:digits``, ``imagefolder:PATH``, ``webdataset:PATTERN``, and
``manifest:FOLDER`` (a prepared text-to-image data set of latents and caption embeddings,
:mod:`omi.models.latent_source`).

Every source is a fixed, ordered list of samples: sample index -> image tensor ``(C, H, W)`` in ``[-1, 1]`` is
deterministic, and the list splits into numbered shards of ``shard_size`` consecutive samples (the last one may be
shorter). Corrupt images are found when the source is opened, skipped (they get no index) and counted in
``source.skipped`` and one log line; an empty or missing source raises :class:`DataSourceError` naming the path.

>>> from omi.protos import pb
>>> source = open_source(pb.DataSpec(source="builtin:digits", shard_size=64, resolution=16))
>>> len(source), source.num_shards, source.shard_range(28)
(1797, 29, (1792, 1797))
>>> batch = source.get([0, 1, 2])
>>> tuple(batch.shape), float(batch.min()) >= -1, float(batch.max()) <= 1
((3, 1, 16, 16), True, True)
"""

import glob
import io
import logging
import math
import os
from collections.abc import Sequence
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F
import webdataset as wds
from omi.protos import pb
from omi.protos.data_ref import DataRef, DataRefError
from PIL import Image
from webdataset.shardlists import expand_urls

logger = logging.getLogger(__name__)

IMAGE_EXTENSIONS = (".jpg", ".jpeg", ".png", ".webp")
_WDS_IMAGE_KEYS = ("png", "jpg", "jpeg", "webp")


class DataSourceError(ValueError):
    """A data source that cannot be used: missing, empty, or not what its name says; the message names the path."""


def parse_source(text: str) -> DataRef:
    """The data source ``text`` parsed; :class:`DataSourceError` (with the parser's reason) if it is malformed."""
    try:
        return DataRef.parse(text)
    except DataRefError as e:
        raise DataSourceError(str(e)) from None


def load_image(data: bytes | str | Path, resolution: int, channels: int) -> torch.Tensor:
    """Decode an image, resize its shorter side to ``resolution`` and centre-crop: uint8 ``(C, R, R)``.

    Raises whatever PIL raises on a corrupt image (callers decide whether to skip it).
    """
    with Image.open(io.BytesIO(data) if isinstance(data, bytes) else data) as image:
        image.load()
        image = image.convert("L" if channels == 1 else "RGB")
    width, height = image.size
    scale = resolution / min(width, height)
    size = (max(resolution, round(width * scale)), max(resolution, round(height * scale)))
    if size != image.size:
        image = image.resize(size, Image.Resampling.BICUBIC)
    left, top = (size[0] - resolution) // 2, (size[1] - resolution) // 2
    image = image.crop((left, top, left + resolution, top + resolution))
    array = np.asarray(image, dtype=np.uint8).reshape(resolution, resolution, channels)
    return torch.from_numpy(array.copy()).permute(2, 0, 1)


def _to_unit_range(pixels: torch.Tensor) -> torch.Tensor:
    """uint8 [0, 255] -> float32 [-1, 1]."""
    return pixels.to(torch.float32) / 127.5 - 1.0


class DataSource:
    """An ordered list of images split into numbered shards.

    :param name: the RunSpec ``source`` string it was opened from
    :param shard_size: samples per shard
    :param resolution: side of the square images it returns
    :param channels: image channels it returns (1 grayscale, 3 RGB)
    """

    def __init__(self, name: str, shard_size: int, resolution: int, channels: int):
        if shard_size <= 0 or resolution <= 0 or channels not in (1, 3):
            raise DataSourceError(f"{name}: bad shard_size={shard_size}, resolution={resolution} "
                                  f"or channels={channels} (must be > 0, > 0, 1 or 3)")
        self.name, self.shard_size, self.resolution, self.channels = name, shard_size, resolution, channels
        self.skipped = 0  # corrupt images left out when the source was opened

    def __len__(self) -> int:
        raise NotImplementedError

    def _load(self, index: int) -> torch.Tensor:
        """One sample as a float32 ``(C, R, R)`` tensor in [-1, 1]."""
        raise NotImplementedError

    @property
    def num_shards(self) -> int:
        return math.ceil(len(self) / self.shard_size)

    def shard_range(self, shard_id: int) -> tuple[int, int]:
        """First (inclusive) and last (exclusive) sample index of a shard."""
        if not 0 <= shard_id < self.num_shards:
            raise IndexError(f"{self.name}: shard {shard_id} out of range (0..{self.num_shards - 1})")
        start = shard_id * self.shard_size
        return start, min(start + self.shard_size, len(self))

    def _indices(self, indices: Sequence[int] | torch.Tensor) -> list[int]:
        """``indices`` as ints, refused if empty or out of range."""
        indices = [int(i) for i in (indices.tolist() if isinstance(indices, torch.Tensor) else indices)]
        if not indices:
            raise ValueError("no sample indices given")
        for i in indices:
            if not 0 <= i < len(self):
                raise IndexError(f"{self.name}: sample {i} out of range (0..{len(self) - 1})")
        return indices

    def get(self, indices: Sequence[int] | torch.Tensor) -> torch.Tensor:
        """The samples at ``indices`` as one float32 ``(N, C, R, R)`` tensor in [-1, 1]."""
        return torch.stack([self._load(i) for i in self._indices(indices)])

    def _log_skipped(self, total: int, examples: list[str]) -> None:
        if self.skipped:
            logger.warning("%s: skipped %d corrupt image(s) of %d (e.g. %s)", self.name, self.skipped, total,
                           ", ".join(examples[:3]))

    def __repr__(self) -> str:
        return (f"{type(self).__name__}({self.name!r}, samples={len(self)}, shards={self.num_shards}, "
                f"resolution={self.resolution}, channels={self.channels}, skipped={self.skipped})")


DIGIT_WORDS = ("zero", "one", "two", "three", "four", "five", "six", "seven", "eight", "nine")


def digit_caption(label: int) -> str:
    """The caption of a digit's label (the captioned digits' text, and the prompts that score a text-to-image model).

    >>> digit_caption(7)
    'a handwritten digit seven'
    """
    return f"a handwritten digit {DIGIT_WORDS[int(label)]}"


DIGIT_PROMPTS = tuple(digit_caption(label) for label in range(10))


class DigitsSource(DataSource):
    """scikit-learn's bundled 8x8 digits (1,797 images, 0..16), upscaled bilinearly to ``resolution``."""

    def __init__(self, shard_size: int, resolution: int, channels: int = 1):
        super().__init__("builtin:digits", shard_size, resolution, channels)
        from sklearn.datasets import load_digits

        digits = load_digits()
        images = torch.tensor(digits.images, dtype=torch.float32).unsqueeze(1) / 16.0  # (1797, 1, 8, 8) in [0, 1]
        if resolution != 8:
            images = F.interpolate(images, size=(resolution, resolution), mode="bilinear", align_corners=False)
        self.images = (images.clamp(0, 1) * 2 - 1).expand(-1, channels, -1, -1).contiguous()
        self.labels = torch.tensor(digits.target, dtype=torch.int64)

    def __len__(self) -> int:
        return self.images.shape[0]

    def _load(self, index: int) -> torch.Tensor:
        return self.images[index]


class ImageFolderSource(DataSource):
    """Every jpg/png/webp under a folder (recursively), in sorted path order, decoded on demand."""

    def __init__(self, path: str | Path, shard_size: int, resolution: int, channels: int = 3):
        super().__init__(f"imagefolder:{path}", shard_size, resolution, channels)
        self.root = Path(path).expanduser()
        if not self.root.is_dir():
            raise DataSourceError(f"image folder {self.root} does not exist or is not a directory")
        candidates = sorted(p for p in self.root.rglob("*") if p.suffix.lower() in IMAGE_EXTENSIONS and p.is_file())
        # Decode every image once now, so a corrupt file is skipped here and never shifts indices later.
        self.files: list[Path] = []
        bad: list[str] = []
        for file in candidates:
            try:
                load_image(file, resolution, channels)
                self.files.append(file)
            except Exception as e:  # PIL raises many types on corrupt data
                bad.append(f"{file.relative_to(self.root)} ({type(e).__name__})")
        self.skipped = len(bad)
        self._log_skipped(len(candidates), bad)
        if not self.files:
            raise DataSourceError(f"image folder {self.root} holds no readable images "
                                  f"({', '.join(IMAGE_EXTENSIONS)}; {len(bad)} corrupt)")

    def __len__(self) -> int:
        return len(self.files)

    def _load(self, index: int) -> torch.Tensor:
        try:
            return _to_unit_range(load_image(self.files[index], self.resolution, self.channels))
        except Exception as e:
            raise DataSourceError(f"{self.files[index]} became unreadable after the source was opened: {e}") from e


def expand_pattern(pattern: str) -> list[str]:
    """Tar shard paths of a webdataset pattern: braces (``shard-{000..009}.tar``) or a glob (``shards/*.tar``)."""
    if any(c in pattern for c in "*?["):
        return sorted(glob.glob(os.path.expanduser(pattern)))
    return [os.path.expanduser(url) for url in expand_urls(pattern)]


class WebDatasetSource(DataSource):
    """Samples of tar shards in the webdataset layout (``KEY.png|jpg|webp`` plus optional ``KEY.json``/``KEY.cls``).

    The shards are read once through ``webdataset`` when the source is opened; images are decoded, resized and
    kept in memory as uint8 (``C*R*R`` bytes per sample, 12 KiB at 64x64 RGB), which gives random access by index.
    """

    def __init__(self, pattern: str, shard_size: int, resolution: int, channels: int = 3):
        super().__init__(f"webdataset:{pattern}", shard_size, resolution, channels)
        self.urls = expand_pattern(pattern)
        if not self.urls:
            raise DataSourceError(f"webdataset pattern {pattern} matches no tar files")
        missing = [url for url in self.urls if not os.path.isfile(url)]
        if missing:
            raise DataSourceError(f"webdataset shard {missing[0]} does not exist (pattern {pattern})")
        pixels: list[torch.Tensor] = []
        self.keys: list[str] = []
        bad: list[str] = []
        total = 0
        for url in self.urls:
            dataset = wds.WebDataset(url, shardshuffle=False, empty_check=False, nodesplitter=None,
                                     workersplitter=None)
            try:
                for sample in dataset:
                    total += 1
                    key = f"{os.path.basename(url)}:{sample['__key__']}"
                    image_key = next((k for k in _WDS_IMAGE_KEYS if k in sample), None)
                    try:
                        if image_key is None:
                            raise ValueError("no image in sample")
                        pixels.append(load_image(sample[image_key], resolution, channels))
                        self.keys.append(key)
                    except Exception as e:  # PIL raises many types on corrupt data
                        bad.append(f"{key} ({type(e).__name__})")
            except DataSourceError:
                raise
            except Exception as e:
                raise DataSourceError(f"webdataset shard {url} cannot be read: {e}") from e
        self.skipped = len(bad)
        self._log_skipped(total, bad)
        if not pixels:
            raise DataSourceError(f"webdataset pattern {pattern} holds no readable images ({len(bad)} corrupt)")
        self.pixels = torch.stack(pixels)

    def __len__(self) -> int:
        return self.pixels.shape[0]

    def _load(self, index: int) -> torch.Tensor:
        return _to_unit_range(self.pixels[index])


def open_source(data: pb.DataSpec, *, channels: int | None = None) -> DataSource:
    """Open the data source a RunSpec's DataSpec names.

    :param data: source, shard size and resolution from the RunSpec
    :param channels: image channels the model takes; default 1 for ``builtin:digits``, 3 otherwise
    """
    ref = parse_source(data.source)
    shard_size, resolution = int(data.shard_size), int(data.resolution)
    if ref.kind == "builtin":
        if ref.where != "digits":
            raise DataSourceError(f"unknown builtin data source '{ref.where}' (known: digits)")
        return DigitsSource(shard_size, resolution, channels or 1)
    if ref.kind == "imagefolder":
        return ImageFolderSource(ref.where, shard_size, resolution, channels or 3)
    if ref.kind == "webdataset":
        return WebDatasetSource(ref.where, shard_size, resolution, channels or 3)
    from omi.models.latent_source import LatentShardSource  # it builds on this module's DataSource

    return LatentShardSource(ref, shard_size, resolution)  # the parse leaves no other kind than manifest
