"""Data sources named in the RunSpec: ``builtin:digits``, ``imagefolder:PATH``, ``webdataset:PATTERN``, and
``manifest:FOLDER`` (a prepared text-to-image data set of latents and caption embeddings).

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
import hashlib
import io
import json
import logging
import math
import os
import tarfile
import time
from collections.abc import Sequence
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F
import webdataset as wds
from omi.protos import pb
from omi.protos.data_ref import DataRef, DataRefError
from omi.protos.dataset import DATASET_MANIFEST_NAME
from omi.protos.files import sha256_file
from PIL import Image
from webdataset.shardlists import expand_urls

logger = logging.getLogger(__name__)

IMAGE_EXTENSIONS = (".jpg", ".jpeg", ".png", ".webp")
_WDS_IMAGE_KEYS = ("png", "jpg", "jpeg", "webp")


class DataSourceError(ValueError):
    """A data source that cannot be used: missing, empty, or not what its name says; the message names the path."""


def _parsed(text: str) -> DataRef:
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


DATA_CACHE_BYTES = 10 << 30  # default bound of a node's cache of fetched shards
FETCH_ATTEMPTS = 3  # tries over the coordinator and the mirrors before a shard is given up
FETCH_BACKOFF = 1.0  # seconds before the second try; doubled each time
MAX_MANIFEST_BYTES = 64 << 20


def cache_root() -> Path:
    """The project's cache folder: ``$OMI_SWARM_CACHE``, else ``~/.cache/omi-swarm``."""
    return Path(os.environ.get("OMI_SWARM_CACHE", Path.home() / ".cache" / "omi-swarm"))


def data_cache_dir(cache_dir: str | Path | None = None) -> Path:
    """Where fetched data sets are cached: ``cache_dir``, else ``data/`` under :func:`cache_root`."""
    return Path(cache_dir) if cache_dir is not None else cache_root() / "data"


def _url_cache_folder(url: str, cache_dir: str | Path | None = None) -> Path:
    """The cache folder of the data set at ``url`` (its base URL, no trailing slash)."""
    return data_cache_dir(cache_dir) / hashlib.sha256(url.encode()).hexdigest()[:16]


def fetched_manifest(ref: DataRef, cache_dir: str | Path | None = None) -> tuple[str, bytes] | None:
    """``(base URL, manifest bytes)`` of the ``manifest:URL[#sha256:PIN]`` data set ``ref`` as this machine fetched
    it last (opening a :class:`LatentShardSource` caches it); None if never fetched, if it is not the pinned one, or
    if ``ref`` is no URL. Reads nothing over the network."""
    if ref.url is None:
        return None
    try:
        data = (_url_cache_folder(ref.url, cache_dir) / DATASET_MANIFEST_NAME).read_bytes()
    except OSError:
        return None
    if ref.pinned_sha256 and hashlib.sha256(data).hexdigest() != ref.pinned_sha256:
        return None
    return ref.url, data


class LatentShardSource(DataSource):
    """A prepared text-to-image data set (``omi-data prepare``): latents and caption embeddings, read by shard.

    Opening reads only the manifest; a prepared shard is read (and its sha256 checked) the first time one of its
    samples is asked for, and at most ``cache_shards`` of them stay in memory. From a URL (``http://coordinator/runs/
    RUN/data``, as the coordinator hands a run to nodes, with ``#sha256:`` pinning the manifest) only the shards
    asked for are fetched: resumably, sha256-checked, from the coordinator or the manifest's mirrors, with retries,
    into a disk cache kept under ``max_cache_bytes`` (least recently used shards go first). ``get`` returns a
    :class:`~omi.models.flow.LatentBatch`; the run's work shards (``shard_size``) are independent of the
    prepared ones.

    :param where: the data set's folder (``manifest.json``, ``shards/``, ``null_caption.npy``) or base URL, with
        ``#sha256:HEX`` pinning its manifest; or the parsed ``manifest:`` source
    :param cache_dir: where a fetched data set is cached (default :func:`data_cache_dir`)
    :param max_cache_bytes: bound of the shard files cached on disk
    """

    def __init__(self, where: str | Path | DataRef, shard_size: int, resolution: int, *, cache_shards: int = 8,
                 cache_dir: str | Path | None = None, max_cache_bytes: int = DATA_CACHE_BYTES):
        from omi.protos.dataset import ManifestError, parse_manifest

        ref = where if isinstance(where, DataRef) else _parsed(f"manifest:{where}")
        assert ref.is_manifest, f"{ref} is not a prepared data set"
        self.url = ref.url or ""
        self.max_cache_bytes = max_cache_bytes
        if self.url:  # fetched over HTTP into a cache folder of its own
            self.folder = _url_cache_folder(self.url, cache_dir)
            self.folder.mkdir(parents=True, exist_ok=True)
            manifest_bytes = self._fetch_manifest()
        else:
            self.folder = ref.folder
            path = self.folder / DATASET_MANIFEST_NAME
            if not path.is_file():
                raise DataSourceError(f"no dataset manifest at {path}")
            manifest_bytes = path.read_bytes()
        if ref.pinned_sha256 and hashlib.sha256(manifest_bytes).hexdigest() != ref.pinned_sha256:
            raise DataSourceError(f"{ref.where}: the manifest is not the one the run names (sha256 differs)")
        try:
            self.manifest = parse_manifest(manifest_bytes)
        except ManifestError as e:
            raise DataSourceError(f"{ref.where}: {e}") from e
        if self.url:
            (self.folder / DATASET_MANIFEST_NAME).write_bytes(manifest_bytes)
        super().__init__(str(ref), shard_size, resolution, self.manifest.channels)
        if resolution != self.manifest.resolution:
            raise DataSourceError(f"{self.folder}: prepared at {self.manifest.resolution} px, the run asks for "
                                  f"{resolution}")
        self.starts = np.cumsum([0] + [shard.samples for shard in self.manifest.shards])
        self.cache_shards = cache_shards
        self.fetched_bytes = 0  # bytes this source downloaded
        self._parts = None  # the frozen parts, once asked for
        self._shards: dict[int, list[tuple[torch.Tensor, torch.Tensor, dict]]] = {}
        self.null = torch.from_numpy(np.load(self._checked(self.manifest.null_caption)).astype(np.float32))

    def _fetch_manifest(self) -> bytes:
        from omi.models.fetch import DownloadError, open_url

        last = None
        for attempt in range(FETCH_ATTEMPTS):
            try:
                with open_url(f"{self.url}/{DATASET_MANIFEST_NAME}") as response:
                    data = response.read(MAX_MANIFEST_BYTES + 1)
                if len(data) > MAX_MANIFEST_BYTES:
                    raise DataSourceError(f"{self.url}/{DATASET_MANIFEST_NAME} is larger than {MAX_MANIFEST_BYTES} "
                                          "bytes")
                return data
            except DownloadError as e:
                last = e
                if e.exit_code == 4:
                    break
                time.sleep(FETCH_BACKOFF * 2**attempt)
        cached = self.folder / DATASET_MANIFEST_NAME
        if cached.is_file():
            logger.warning("%s unreachable (%s): using the manifest fetched before", self.url, last)
            return cached.read_bytes()
        raise DataSourceError(f"cannot fetch the data set's manifest from {self.url}: {last}")

    def _fetch(self, ref) -> None:
        """Download one file of the data set into the cache (resumed, sha256-checked), from the coordinator or a
        mirror, retrying; then keep the cache under its size bound."""
        from omi.models.fetch import DownloadError, fetch_file

        bases = [self.url, *(mirror.rstrip("/") for mirror in self.manifest.mirrors)]
        target = self.folder / ref.file
        target.parent.mkdir(parents=True, exist_ok=True)
        errors = []
        for attempt in range(FETCH_ATTEMPTS):
            for base in bases:
                try:
                    self.fetched_bytes += fetch_file(f"{base}/{ref.file}", target, ref.bytes, ref.sha256,
                                                     lambda n: None)
                    logger.info("fetched %s from %s (%d bytes)", ref.file, base, ref.bytes)
                    self._evict(keep=target)
                    return
                except DownloadError as e:
                    errors.append(f"{base}: {e}")
                    target.with_name(target.name + ".corrupt").unlink(missing_ok=True)
            time.sleep(FETCH_BACKOFF * 2**attempt)
        raise DataSourceError(f"cannot fetch {ref.file} ({FETCH_ATTEMPTS} tries): {errors[-1]}")

    def _evict(self, keep: Path) -> None:
        """Delete the least recently used shard files until the cache holds at most ``max_cache_bytes``."""
        files = sorted((p for p in (self.folder / "shards").glob("*.tar") if p != keep),
                       key=lambda p: p.stat().st_mtime)
        total = sum(p.stat().st_size for p in files) + keep.stat().st_size
        while files and total > self.max_cache_bytes:
            oldest = files.pop(0)
            total -= oldest.stat().st_size
            oldest.unlink()
            logger.info("data cache over %d bytes: removed %s", self.max_cache_bytes, oldest.name)

    def __len__(self) -> int:
        return int(self.starts[-1])

    def _checked(self, ref) -> io.BytesIO:
        path = self.folder / ref.file
        if self.url and not path.is_file():
            self._fetch(ref)
        if not path.is_file():
            raise DataSourceError(f"{path} is missing")
        data = path.read_bytes()
        if hashlib.sha256(data).hexdigest() != ref.sha256:
            if not self.url:
                raise DataSourceError(f"{path} does not match the manifest's sha256: corrupt or changed")
            path.unlink()  # a cached copy that changed on disk: fetch it again
            self._fetch(ref)
            data = path.read_bytes()
        os.utime(path)  # recently used: the cache keeps it longest
        return io.BytesIO(data)

    def _shard(self, shard_id: int) -> list[tuple[torch.Tensor, torch.Tensor, dict]]:
        if shard_id not in self._shards:
            ref = self.manifest.shards[shard_id]
            samples: dict[str, dict] = {}
            with tarfile.open(fileobj=self._checked(ref)) as tar:
                for member in tar.getmembers():
                    key, _, kind = member.name.partition(".")
                    samples.setdefault(key, {})[kind] = tar.extractfile(member).read()
            rows = [(torch.from_numpy(np.load(io.BytesIO(s["latent.npy"])).astype(np.float32)),
                     torch.from_numpy(np.load(io.BytesIO(s["caption.npy"])).astype(np.float32)),
                     json.loads(s["json"])) for _, s in sorted(samples.items())]
            if len(rows) != ref.samples:
                raise DataSourceError(f"{self.folder / ref.file}: {len(rows)} samples, the manifest says {ref.samples}")
            while len(self._shards) >= self.cache_shards:
                self._shards.pop(next(iter(self._shards)))
            self._shards[shard_id] = rows
        return self._shards[shard_id]

    def _row(self, index: int) -> tuple[torch.Tensor, torch.Tensor, dict]:
        shard_id = int(np.searchsorted(self.starts, index, side="right")) - 1
        return self._shard(shard_id)[index - int(self.starts[shard_id])]

    def get(self, indices):
        """The samples at ``indices`` as one :class:`~omi.models.flow.LatentBatch`."""
        from omi.models.flow import LatentBatch

        rows = [self._row(i) for i in self._indices(indices)]
        return LatentBatch.collate(torch.stack([r[0] for r in rows]), [r[1] for r in rows], self.null)

    def frozen_parts(self):
        """The autoencoder, text encoder and tokenizer the data was prepared with (for sampling and checkpoints),
        refused unless their files hash to the manifest's ``parts.sha256``; checked and loaded once per source."""
        if self._parts is None:
            self._parts = self._load_frozen_parts()
        return self._parts

    def _load_frozen_parts(self):
        from omi.models.text_to_image import PartsNotFoundError, load_frozen_parts, parts_hash, resolve_parts

        source = self.manifest.parts.source
        beside = Path(source).expanduser()
        if not beside.is_absolute():
            beside = self.folder / beside
        try:
            # a relative folder beside the data set first; otherwise the source as it was given to preparation (a
            # folder, or a hub id pinned to a commit); the hash below decides whether what was found is theirs
            where, _ = resolve_parts(beside if beside.exists() else source)
        except PartsNotFoundError as e:
            raise DataSourceError(f"the frozen parts of {self.folder}: {e}") from e
        if parts_hash(where) != self.manifest.parts.sha256:
            raise DataSourceError(f"the frozen parts at {where} are not the ones {self.folder} was prepared with "
                                  "(sha256 differs)")
        return load_frozen_parts(where)

    def provenance(self, work_shards: list[list[int]]) -> dict:
        """What a checkpoint trained on, for its signed manifest: the data set (its manifest's sha256), the prepared
        shards holding the samples of the run's work shards (``[first, last]`` runs of ids, as the ledger gives
        them) with their sha256, and the licence tally of those prepared shards (exact when the run's shard size is
        the data set's, a superset of the samples trained otherwise)."""
        touched: set[int] = set()
        for first, last in work_shards:
            for work_shard in range(first, last + 1):
                if work_shard < self.num_shards:
                    start, end = self.shard_range(work_shard)
                    lo = int(np.searchsorted(self.starts, start, side="right")) - 1
                    hi = int(np.searchsorted(self.starts, end - 1, side="right")) - 1
                    touched.update(range(lo, hi + 1))
        shards = [self.manifest.shards[i] for i in sorted(touched)]
        licenses: dict[str, int] = {}
        for shard in shards:
            for name, count in shard.licenses.items():
                licenses[name] = licenses.get(name, 0) + count
        return dict(dataset=self.manifest.name, manifest_sha256=sha256_file(self.folder / DATASET_MANIFEST_NAME),
                    shards=[dict(id=s.id, file=s.file, sha256=s.sha256, samples=s.samples) for s in shards],
                    licenses=licenses)

    def caption(self, index: int) -> str:
        """The caption of a sample, as it was written."""
        return self._row(index)[2]["caption"]


def open_source(data: pb.DataSpec, *, channels: int | None = None) -> DataSource:
    """Open the data source a RunSpec's DataSpec names.

    :param data: source, shard size and resolution from the RunSpec
    :param channels: image channels the model takes; default 1 for ``builtin:digits``, 3 otherwise
    """
    ref = _parsed(data.source)
    shard_size, resolution = int(data.shard_size), int(data.resolution)
    if ref.kind == "builtin":
        if ref.where != "digits":
            raise DataSourceError(f"unknown builtin data source '{ref.where}' (known: digits)")
        return DigitsSource(shard_size, resolution, channels or 1)
    if ref.kind == "imagefolder":
        return ImageFolderSource(ref.where, shard_size, resolution, channels or 3)
    if ref.kind == "webdataset":
        return WebDatasetSource(ref.where, shard_size, resolution, channels or 3)
    return LatentShardSource(ref, shard_size, resolution)  # the parse leaves no other kind than manifest
